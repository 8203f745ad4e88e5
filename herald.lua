-- herald's demo configuration. Every setting is described in README.md.
listen     = { host = "127.0.0.1", port = 8080 }
web_root   = "web"
access_log = "logs/access.log"
publish_token = nil

limits = { max_message = 1048576, send_queue = 4194304, max_connections = 100000 }

routes = {
  { path = "/ws",   kind = "pubsub" },              -- the generic JSON protocol
  { path = "/sub/", kind = "raw", publish = true }, -- /sub/<channel>: payloads as published
  { path = "/echo", kind = "echo" },
}
