-- chat.lua: chat rooms with nicknames, join and leave notices, and who is here.
--
-- Connect to /chat?room=<room>&nick=<nickname>
--   room: 1-64 of A-Z a-z 0-9 _ - . : (default "lobby"); nick: up to 32 characters (default
--   "guest-<id>"). A nickname already used in the room gets a number: "ann (2)".
--
-- Client -> server, text:
--   {"type":"message","text":"hello"}  say something to the room (plain text that is not JSON
--                                      is taken as the text)
--   {"type":"who"}                     ask who is here
-- Server -> client, JSON text ("time" is Unix time in milliseconds):
--   {"type":"welcome","room":"lobby","nick":"ann","nicks":["ann","bob"]}  to you, on joining
--   {"type":"join","nick":"bob","nicks":["ann","bob"],"time":...}         to the room
--   {"type":"leave","nick":"bob","nicks":["ann"],"time":...}              to the room
--   {"type":"message","nick":"ann","text":"hello","time":...}             to the room
--   {"type":"who","nicks":["ann","bob"]}                                  to you
--   {"type":"error","error":"..."}                                        to you
--
-- Each room is the channel "chat:<room>", so other routes can read it too (/ws, /sub/chat:lobby).

local MAX_TEXT = 4000  -- bytes per message

-- room -> { [client] = true }. Rebuilt from the clients' data whenever the script (re)loads,
-- so a reload keeps everyone in their room.
local rooms = {}
for _, client in ipairs(herald.clients()) do
  local room = client.data.room
  if room then
    rooms[room] = rooms[room] or {}
    rooms[room][client] = true
  end
end

local function now_ms()
  return math.floor(herald.now() * 1000)
end

local function nicks(room)
  local list = {}
  for client in pairs(rooms[room] or {}) do
    list[#list + 1] = client.data.nick
  end
  table.sort(list)
  return list
end

local function nick_taken(room, nick)
  for client in pairs(rooms[room] or {}) do
    if client.data.nick == nick then return true end
  end
  return false
end

-- Tell everyone in the room (the channel's subscribers).
local function broadcast(room, msg)
  herald.publish("chat:" .. room, msg)
end

-- The nickname asked for, cleaned up: UTF-8, no control characters, at most 32 characters.
local function clean_nick(nick, client)
  nick = (nick or ""):gsub("%c", "")
  if not utf8.len(nick) then return nil end
  if utf8.len(nick) > 32 then nick = nick:sub(1, utf8.offset(nick, 33) - 1) end
  if nick == "" then nick = "guest-" .. client.id end
  return nick
end

return {
  open = function(client, request)
    local room = request.query.room or ""
    if room == "" then room = "lobby" end
    if not room:match("^[%w_%-%.:]+$") or #room > 64 then
      return false, "room names are 1 to 64 of A-Z a-z 0-9 _ - . :"
    end
    local nick = clean_nick(request.query.nick, client)
    if not nick then
      return false, "the nickname must be UTF-8"
    end
    local base, n = nick, 1
    while nick_taken(room, nick) do
      n = n + 1
      nick = base .. " (" .. n .. ")"
    end

    client.data.room, client.data.nick = room, nick
    rooms[room] = rooms[room] or {}
    rooms[room][client] = true
    client:subscribe("chat:" .. room)
    local here = nicks(room)
    client:send({ type = "welcome", room = room, nick = nick, nicks = here })
    broadcast(room, { type = "join", nick = nick, nicks = here, time = now_ms() })
  end,

  message = function(client, data, is_binary)
    if is_binary then
      client:send({ type = "error", error = "send text" })
      return
    end
    local room = client.data.room
    local msg = herald.json.decode(data)
    if type(msg) ~= "table" then
      msg = { type = "message", text = data }  -- plain text
    end
    if msg.type == "who" then
      client:send({ type = "who", nicks = nicks(room) })
    elseif msg.type == "message" and type(msg.text) == "string" and msg.text ~= "" then
      if #msg.text > MAX_TEXT then
        client:send({ type = "error", error = "a message is at most " .. MAX_TEXT .. " bytes" })
        return
      end
      broadcast(room, { type = "message", nick = client.data.nick, text = msg.text, time = now_ms() })
    else
      client:send({ type = "error", error = 'send {"type":"message","text":"..."} or {"type":"who"}' })
    end
  end,

  close = function(client)
    local room = client.data.room
    if not (room and rooms[room]) then return end
    rooms[room][client] = nil
    if next(rooms[room]) == nil then
      rooms[room] = nil  -- the last one left: nobody to tell
      return
    end
    broadcast(room, { type = "leave", nick = client.data.nick, nicks = nicks(room), time = now_ms() })
  end,
}
