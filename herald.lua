-- herald's demo configuration. Every setting is described in README.md.
listen     = { host = "127.0.0.1", port = 8080 }
web_root   = "web"
access_log = "logs/access.log"
tail       = { { path = "logs/access.log", channel = "log:access" } } -- the log demo's feed
publish_token = nil

limits = { max_message = 1048576, send_queue = 4194304, max_connections = 100000 }

routes = {
  { path = "/ws",   kind = "pubsub" },              -- the generic JSON protocol
  { path = "/sub/", kind = "raw", publish = true }, -- /sub/<channel>: payloads as published
  { path = "/echo", kind = "echo" },
  { path = "/sse/", kind = "sse" },                 -- /sse/<channel>: Server-Sent Events
  -- Lua routes (docs/lua.md): each script's protocol is described at its top.
  { path = "/echo-lua",  script = "scripts/echo.lua" },      -- echo, as a script
  { path = "/chat",      script = "scripts/chat.lua" },      -- ?room=&nick=: rooms, who is here
  { path = "/draw",      script = "scripts/draw.lua" },      -- ?room=: shared canvas with history
  { path = "/log",       script = "scripts/logstream.lua" },  -- the access log, parsed
  { path = "/dashboard", script = "scripts/dashboard.lua" }, -- the broker's figures each second
  { path = "/countdown", script = "scripts/countdown.lua" }, -- 10 .. 1, BOOM!
}

-- Channels that keep their last messages, so clients can resume where they were: chat rooms, and
-- the front page's "news" (a page that reconnects gets what was published meanwhile).
history = {
  { prefix = "chat:", length = 100, age = 3600 },
  { prefix = "news",  length = 100, age = 3600 },
}
