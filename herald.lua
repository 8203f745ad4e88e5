-- herald's demo configuration. Every setting is described in README.md.
listen     = { host = "127.0.0.1", port = 8080 }
web_root   = "web"
access_log = "logs/access.log"
tail       = { { path = "logs/access.log", channel = "log:access" } } -- the log demo's feed
publish_token = nil

limits = { max_message = 1048576, send_queue = 4194304, max_connections = 100000 }

-- deflate = true: the route's WebSocket clients may negotiate permessage-deflate. It is on where
-- messages are JSON (figures, strokes, a drawing's history, log rows): browsers take it, and the
-- dashboard's 4 KB of figures a second go as under 1 KB; messages under 256 bytes go as they are.
-- Off on /echo (outside conformance suites test it plainly), on /sub/ (payloads as published,
-- often compact or binary already; the fan-out benchmarks' route), and where messages are tiny.
routes = {
  { path = "/ws",   kind = "pubsub", deflate = true }, -- the generic JSON protocol
  { path = "/sub/", kind = "raw", publish = true },    -- /sub/<channel>: payloads as published
  { path = "/echo", kind = "echo" },
  { path = "/sse/", kind = "sse" },                    -- /sse/<channel>: Server-Sent Events
  -- Lua routes (docs/lua.md): each script's protocol is described at its top.
  { path = "/echo-lua",  script = "scripts/echo.lua" },                      -- echo, as a script
  { path = "/chat",      script = "scripts/chat.lua", deflate = true },      -- ?room=&nick=
  { path = "/draw",      script = "scripts/draw.lua", deflate = true },      -- ?room=: a canvas
  { path = "/log",       script = "scripts/logstream.lua", deflate = true }, -- the access log
  { path = "/dashboard", script = "scripts/dashboard.lua", deflate = true }, -- figures each second
  { path = "/countdown", script = "scripts/countdown.lua" },                 -- 10 .. 1, BOOM!
}

-- Channels that keep their last messages, so clients can resume where they were: chat rooms, and
-- the front page's "news" (a page that reconnects gets what was published meanwhile).
history = {
  { prefix = "chat:", length = 100, age = 3600 },
  { prefix = "news",  length = 100, age = 3600 },
}
