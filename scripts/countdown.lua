-- countdown.lua: the server counts down from 10 at random intervals, then sends "BOOM!".
--
-- Protocol (text messages):
--   connect to /countdown       the count starts at once: "10", "9", ..., "1", "BOOM!",
--                               each number less than a second after the one before
--   send anything after BOOM!   the count starts again (messages during a count are ignored)
--
-- Shows per-client state in client.data and a chain of one-shot timers, cancelled in close.

local FROM = 10

-- Send n, and schedule n - 1 (or the BOOM) after a random pause under a second.
local function tick(client, n)
  if n == 0 then
    client:send("BOOM!")
    client.data.timer = nil
    return
  end
  client:send(tostring(n))
  local pause = 0.05 + math.random() * 0.9  -- 0.05 to 0.95 seconds
  client.data.timer = herald.timer(pause, function() tick(client, n - 1) end)
end

return {
  open = function(client)
    tick(client, FROM)  -- sent right after the handshake
  end,

  message = function(client)
    if not client.data.timer then
      tick(client, FROM)
    end
  end,

  close = function(client)
    if client.data.timer then
      client.data.timer:cancel()
    end
  end,
}
