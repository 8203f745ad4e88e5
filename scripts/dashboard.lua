-- dashboard.lua: the broker's own figures, once a second, for the dashboard page.
--
-- Every second this script publishes the broker's /stats figures to the channel "dashboard", as
-- one JSON object: every /stats field ("connections", "messages_in", "routes", ...) plus
--   "type":  "stats"
--   "time":  Unix time in milliseconds
--   "rates": per-second rates over the last second of
--            messages_in, messages_out, bytes_in, bytes_out, http_requests, connections_total
--
-- Protocol: connect to /dashboard. You are subscribed to "dashboard" and get the latest figures
-- at once, then a new set every second. Nothing is read from clients. Any other route can read
-- the same channel too (e.g. /sub/dashboard).
--
-- Shows a timer started when the script loads (a reload replaces it), herald.stats(), and
-- publishing only while someone listens.

local CHANNEL = "dashboard"
local RATES = { "messages_in", "messages_out", "bytes_in", "bytes_out", "http_requests",
                "connections_total" }

local previous, previous_time  -- the last sample, for the rates
local latest                   -- the last figures sent, as JSON text, for clients joining

local function sample()
  local now = herald.now()
  local figures = herald.stats()
  figures.type = "stats"
  figures.time = math.floor(now * 1000)
  figures.rates = {}
  for _, name in ipairs(RATES) do
    local rate = 0
    if previous and now > previous_time then
      rate = (figures[name] - previous[name]) / (now - previous_time)
    end
    figures.rates[name] = math.floor(rate * 10 + 0.5) / 10  -- one decimal
  end
  previous, previous_time = figures, now
  latest = herald.json.encode(figures)
  if herald.channel(CHANNEL).subscribers > 0 then
    herald.publish(CHANNEL, latest)
  end
end

herald.every(1, sample)

return {
  open = function(client)
    client:subscribe(CHANNEL)
    if latest then
      client:send(latest)
    end
  end,
}
