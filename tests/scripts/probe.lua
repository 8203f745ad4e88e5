-- probe.lua: a test route that reports what its hooks receive and misbehaves on request.
--
-- open:    ?refuse=<reason> refuses; ?fail=open raises; ?loop=open never returns; ?sub=<ch>
--          subscribes; ?watch=1 subscribes to "events" (where close hooks report); ?failclose=1
--          makes this client's close hook raise after reporting. Otherwise it sends
--          {"hook":"open", ...what it got...}.
-- message: "!<command> <args>" runs a command (see below); anything else is reported back as
--          {"hook":"message","data":...,"is_binary":...} (binary data is reported by length, then
--          sent back as binary).
-- deliver: by channel: "drop" -> nil, "upper" -> upper case, "json" -> a table, "fail" raises,
--          "loop" never returns, "bin" -> bytes that are not UTF-8, "text" -> forced text,
--          "events" and "plain" unchanged, anything else -> "[<channel>] <data>".
-- close:   publishes {"hook":"close","id":..,"code":..,"reason":..,"connected":..} to "events".

local json = herald.json
local deliveries = 0

local commands = {}

function commands.error() error("message failed on purpose") end
function commands.errortable() error({ code = 7 }) end
function commands.loop() while true do end end
function commands.pcallloop()
  while true do pcall(function() while true do end end) end
end
function commands.alloc()
  local t = {}
  while true do t[#t + 1] = string.rep("x", 4096) .. #t end
end
function commands.bigstring() return string.rep("x", 1 << 30) end
function commands.exit() os.exit(3) end

function commands.timer(client, seconds)
  herald.timer(tonumber(seconds), function(handle)
    client:send({ timer = "fired", handle = tostring(handle) })
  end)
end

function commands.every(client, seconds, times)
  local n, limit = 0, tonumber(times)
  herald.every(tonumber(seconds), function(handle)
    n = n + 1
    client:send({ every = n })
    if n == limit then
      client:send({ every = "done", cancelled = handle:cancel(), again = handle:cancel() })
    end
  end)
end

function commands.cancel(client)
  local t = herald.timer(0.05, function() client:send({ timer = "cancelled timer fired" }) end)
  local first, second = t:cancel(), t:cancel()
  herald.timer(0.2, function() client:send({ timer = "after", first = first, second = second }) end)
end

function commands.timererror(client)
  herald.timer(0, function() error("timer failed on purpose") end)
  herald.timer(0.05, function() client:send({ timer = "still alive" }) end)
end

function commands.everyerror(client)
  local runs = 0
  herald.every(0.02, function(handle)
    runs = runs + 1
    if runs == 3 then
      handle:cancel()
      client:send({ every_error_runs = runs })
    end
    error("every failed on purpose")
  end)
end

function commands.badtimer(client)
  local ok, err = pcall(herald.every, 0, function() end)
  client:send({ ok = ok, err = err })
end

function commands.sub(client, channel) client:send({ result = client:subscribe(channel) }) end
function commands.unsub(client, channel) client:send({ result = client:unsubscribe(channel) }) end
function commands.badsub(client)
  local ok, err = pcall(client.subscribe, client, "bad name!")
  client:send({ ok = ok, err = err })
end

function commands.pub(client, channel, data)
  local seq, n = herald.publish(channel, data or "")
  client:send({ seq = seq, subscribers = n })
end
function commands.pubtable(client, channel)
  local seq = herald.publish(channel, { a = 1, list = { "x", "y" } })
  client:send({ seq = seq })
end
function commands.channel(client, channel) client:send(herald.channel(channel)) end

function commands.close(client, code, reason)
  client:close(tonumber(code), reason)
  client:send("after close")  -- a no-op: nil, "closed"
end
function commands.badclose(client)
  local ok, err = pcall(client.close, client, 1005)
  client:send({ ok = ok, err = err })
end

function commands.data(client, key, value)
  if key then client.data[key] = value end
  client:send({ data = client.data, id = client.id, addr = client.addr })
end

function commands.clients(client)
  local ids = {}
  for _, c in ipairs(herald.clients()) do ids[#ids + 1] = c.id end
  table.sort(ids)
  client:send({ clients = ids, me = herald.client(client.id) == client, none = herald.client(-1) == nil })
end

function commands.stats(client)
  local s = herald.stats()
  client:send({ connections = s.connections, integer = math.type(s.connections) })
end

function commands.json(client)
  local v = json.decode('{"n":3,"f":1.5,"list":[1,2,{"deep":4}],"nothing":null}')
  local bad, err = json.decode("{nope")
  client:send({ n = math.type(v.n), f = v.f, deep = math.type(v.list[3].deep),
                null = v.nothing == json.null, bad = bad == nil, err = type(err) })
end

function commands.sendbinary(client) client:send("\0\1\2\255", true) end
function commands.sendbadtext(client)
  local ok, err = pcall(client.send, client, "\255", false)
  client:send({ ok = ok, err = err })
end
function commands.deliveries(client) client:send({ deliveries = deliveries }) end
function commands.readonly(client)
  local ok, err = pcall(function() client.id = 5 end)
  client.nick = "custom field"
  client:send({ ok = ok, err = err, nick = client.nick })
end
function commands.log(client, level)
  herald.log(level, "probe says", 42, true)
  client:send({ logged = level })
end
function commands.print(client)
  print("printed", "by", "probe")
  client:send({ printed = true })
end
function commands.zombie(client)
  -- keep this client in a global and use it after its connection is gone
  zombie = client
  client:send({ zombie = "kept" })
end
function commands.usezombie(client)
  local a, b = zombie:send("hello?")
  local c, d = zombie:subscribe("x")
  local e, f = zombie:close()
  client:send({ send = { a, b }, subscribe = { c, d }, close = { e, f }, connected = zombie.connected,
                data = zombie.data.name })
end

return {
  open = function(client, request)
    local q = request.query
    if q.refuse then return false, q.refuse end
    if q.fail == "open" then error("open failed on purpose") end
    if q.loop == "open" then while true do end end
    client.data.name = q.name
    client.data.failclose = q.failclose
    if q.sub then client:subscribe(q.sub) end
    if q.watch then client:subscribe("events") end
    client:send({ hook = "open", id = client.id, addr = client.addr, path = request.path,
                  query = q, headers = request.headers, connected = client.connected,
                  route = herald.route })
  end,

  message = function(client, data, is_binary)
    local cmd, rest = data:match("^!(%w+)%s*(.*)$")
    if cmd and not is_binary then
      local args = {}
      for word in rest:gmatch("%S+") do args[#args + 1] = word end
      local fn = commands[cmd]
      if not fn then error("unknown command " .. cmd) end
      return fn(client, table.unpack(args))
    end
    if is_binary then
      client:send({ hook = "message", length = #data, is_binary = true })
      client:send(data, true)
    else
      client:send({ hook = "message", data = data, is_binary = is_binary })
    end
  end,

  deliver = function(channel, data, seq)
    deliveries = deliveries + 1
    if channel == "drop" then return nil end
    if channel == "upper" then return data:upper() end
    if channel == "json" then return { channel = channel, data = data, seq = seq } end
    if channel == "fail" then error("deliver failed on purpose") end
    if channel == "loop" then while true do end end
    if channel == "bin" then return "\0\1\2\255" end
    if channel == "text" then return data, false end
    if channel == "events" or channel == "plain" then return data end
    return "[" .. channel .. "] " .. data
  end,

  close = function(client, code, reason)
    herald.publish("events", { hook = "close", id = client.id, code = code, reason = reason,
                               connected = client.connected, name = client.data.name })
    if client.data.failclose then error("close failed on purpose") end
  end,
}
