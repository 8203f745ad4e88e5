-- draw.lua: a shared canvas per room. Strokes from one browser appear in every other, and a late
-- joiner gets the picture drawn so far.
--
-- Connect to /draw?room=<room>  (1-64 of A-Z a-z 0-9 _ - . :, default "default")
--
-- Client -> server, JSON text:
--   {"type":"stroke","points":[[x,y],[x,y],...],"color":"#1e90ff","width":4}
--       1 to 1000 points of two numbers each (the page chooses the units); color a CSS color of
--       up to 32 characters (default "#000"); width from 0.1 to 200 (default 2)
--   {"type":"clear"}   wipe the room's canvas
-- Server -> client, JSON text:
--   {"type":"welcome","id":7,"room":"default","strokes":42}   first, to you: your client id and
--                                                              how many strokes follow
--   then the room's strokes so far, oldest first, each as below
--   {"type":"stroke","id":3,"points":[[x,y],...],"color":"#1e90ff","width":4}
--       id is the client that drew it (the page can skip its own, already drawn)
--   {"type":"clear","id":3}
--   {"type":"error","error":"..."}
--
-- The history of each room is bounded (MAX_STROKES strokes, MAX_BYTES bytes: the oldest go first)
-- and kept in herald.state, so a reload of the script keeps the pictures.

local MAX_STROKES = 2000
local MAX_BYTES = 2 * 1024 * 1024
local MAX_POINTS = 1000
local MAX_ROOMS = 100  -- rooms with a history; past it, the one drawn in least recently goes

-- room -> { strokes = { json text, ... }, bytes = n, used = time of the last stroke }
herald.state.rooms = herald.state.rooms or {}
local rooms = herald.state.rooms

local function history(room)
  local h = rooms[room]
  if not h then
    local count, oldest = 0, nil
    for name, other in pairs(rooms) do
      count = count + 1
      if not oldest or other.used < rooms[oldest].used then oldest = name end
    end
    if count >= MAX_ROOMS then rooms[oldest] = nil end
    h = { strokes = {}, bytes = 0, used = herald.now() }
    rooms[room] = h
  end
  return h
end

-- Keep a stroke (as the JSON text sent) in the room's history, within the bounds.
local function remember(room, text)
  local h = history(room)
  h.strokes[#h.strokes + 1] = text
  h.bytes = h.bytes + #text
  h.used = herald.now()
  while #h.strokes > MAX_STROKES or h.bytes > MAX_BYTES do
    h.bytes = h.bytes - #table.remove(h.strokes, 1)
  end
end

local function is_number(v, limit)
  return type(v) == "number" and v == v and v >= -limit and v <= limit
end

-- A checked copy of a stroke from a client, or nil and what is wrong with it.
local function check_stroke(msg, id)
  local points = msg.points
  if type(points) ~= "table" or #points < 1 or #points > MAX_POINTS then
    return nil, "points must be a list of 1 to " .. MAX_POINTS .. " [x, y] pairs"
  end
  local copy = {}
  for i, p in ipairs(points) do
    if type(p) ~= "table" or not is_number(p[1], 1e6) or not is_number(p[2], 1e6) then
      return nil, "point " .. i .. " is not a pair of numbers"
    end
    copy[i] = { p[1], p[2] }
  end
  local color = msg.color or "#000"
  if type(color) ~= "string" or #color > 32 or not color:match("^[#%w%(%)%.,%% ]+$") then
    return nil, "color must be a CSS color"
  end
  local width = msg.width or 2
  if not is_number(width, 200) or width < 0.1 then
    return nil, "width must be a number from 0.1 to 200"
  end
  return { type = "stroke", id = id, points = copy, color = color, width = width }
end

return {
  open = function(client, request)
    local room = request.query.room or ""
    if room == "" then room = "default" end
    if not room:match("^[%w_%-%.:]+$") or #room > 64 then
      return false, "room names are 1 to 64 of A-Z a-z 0-9 _ - . :"
    end
    client.data.room = room
    local strokes = rooms[room] and rooms[room].strokes or {}
    client:send({ type = "welcome", id = client.id, room = room, strokes = #strokes })
    for _, text in ipairs(strokes) do
      client:send(text)
    end
    client:subscribe("draw:" .. room)  -- after the replay, so nothing comes twice
  end,

  message = function(client, data)
    local room = client.data.room
    local msg = herald.json.decode(data)
    if type(msg) ~= "table" then
      client:send({ type = "error", error = "send JSON: a stroke or a clear" })
    elseif msg.type == "stroke" then
      local stroke, err = check_stroke(msg, client.id)
      if not stroke then
        client:send({ type = "error", error = err })
        return
      end
      local text = herald.json.encode(stroke)
      remember(room, text)
      herald.publish("draw:" .. room, text)
    elseif msg.type == "clear" then
      rooms[room] = nil
      herald.publish("draw:" .. room, { type = "clear", id = client.id })
    else
      client:send({ type = "error", error = 'unknown type: expected "stroke" or "clear"' })
    end
  end,
}
