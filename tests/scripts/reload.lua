-- reload.lua: a script the reload tests rewrite with another version string.
local VERSION = "v1"

-- herald.state survives reloads; locals and load-time timers belong to one version.
herald.state.loads = (herald.state.loads or 0) + 1
local loads = herald.state.loads

herald.every(0.05, function()
  herald.publish("ticks", VERSION)
end)

return {
  open = function(client)
    client.data.joined = VERSION
    client:subscribe("traffic")
  end,

  message = function(client, data)
    client:send(VERSION .. " " .. data .. " joined=" .. client.data.joined .. " loads=" .. loads)
  end,

  deliver = function(channel, data)
    return VERSION .. ":" .. data
  end,
}
