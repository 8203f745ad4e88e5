-- fan.lua: every client subscribes to "fan"; deliver numbers its calls, so subscribers can see
-- that it ran once per message (every subscriber gets the same number).
local calls = 0

return {
  open = function(client)
    client:subscribe("fan")
  end,

  deliver = function(channel, data)
    calls = calls + 1
    return data .. " (delivery " .. calls .. ")"
  end,
}
