-- herald's configuration for the fan-out benchmark (bench/compare.sh passes --port).
-- The per-address and per-client limits are lifted: every benchmark client comes from 127.0.0.x,
-- and the /ws publisher sends as fast as it can.
listen = { host = "127.0.0.1", port = 8080 }
web_root = nil
access_log = nil
limits = {
  max_message = 1048576,
  send_queue = 16777216,
  max_connections = 200000,
  max_connections_per_ip = 200000,
  message_rate = 100000000,
  http_timeout = 300,
}
routes = {
  { path = "/ws", kind = "pubsub" },
  { path = "/sub/", kind = "raw" },
}
