-- logstream.lua: a live view of an access log, each line parsed into fields.
--
-- herald's tail source publishes every line appended to logs/access.log to the channel
-- "log:access" (see `tail` in herald.lua). Clients of this route subscribe to it, and deliver
-- parses each line once, however many clients watch, into one JSON object:
--   {"time":"2026-11-21T14:36:04+00:00","client":"127.0.0.1","user":"-","method":"GET",
--    "path":"/stats","protocol":"HTTP/1.1","status":200,"bytes":387,"referrer":"-",
--    "agent":"curl/7.88.1"}
-- from the combined log format:
--   127.0.0.1 - - [21/Nov/2026:14:36:04 +0000] "GET /stats HTTP/1.1" 200 387 "-" "curl/7.88.1"
-- bytes is 0 when the log says "-". A line in another format arrives as {"raw":"<the line>"}.
--
-- Protocol: connect to /log (or /log?channel=log:<name> for another tailed file whose channel
-- starts with "log:"); nothing is read from clients.

local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6,
                 Jul = 7, Aug = 8, Sep = 9, Oct = 10, Nov = 11, Dec = 12 }

-- "21/Nov/2026:14:36:04 +0000" -> "2026-11-21T14:36:04+00:00" (what JavaScript's Date reads)
local function iso_time(t)
  local d, mon, y, hms, sign, zh, zm = t:match("^(%d%d?)/(%a%a%a)/(%d%d%d%d):(%d%d:%d%d:%d%d) ([+-])(%d%d)(%d%d)$")
  if not d or not MONTHS[mon] then
    return t
  end
  return string.format("%s-%02d-%02dT%s%s%s:%s", y, MONTHS[mon], tonumber(d), hms, sign, zh, zm)
end

-- Undo the log's escapes (\" \\ \xNN); text that would not be UTF-8 is left escaped.
local function unescape(s)
  if not s:find("\\", 1, true) then
    return s
  end
  local out, i = {}, 1
  while true do
    local j = s:find("\\", i, true)
    if not j then
      out[#out + 1] = s:sub(i)
      break
    end
    out[#out + 1] = s:sub(i, j - 1)
    local hex = s:match("^x(%x%x)", j + 1)
    if hex then
      out[#out + 1] = string.char(tonumber(hex, 16))
      i = j + 4
    else
      out[#out + 1] = s:sub(j + 1, j + 1)
      i = j + 2
    end
  end
  local text = table.concat(out)
  return utf8.len(text) and text or s
end

-- The quoted field starting at position i of line: its text and the position after it.
local function quoted(line, i)
  if line:sub(i, i) ~= '"' then
    return nil
  end
  local j = i + 1
  while true do
    local k = line:find('[\\"]', j)
    if not k then
      return nil
    end
    if line:sub(k, k) == '"' then
      return unescape(line:sub(i + 1, k - 1)), k + 1
    end
    j = k + 2  -- an escaped character
  end
end

-- One combined-format line as a table, or nil.
local function parse(line)
  local client, user, time, at = line:match("^(%S+) %S+ (%S+) %[([^%]]+)%] ()")
  if not client then
    return nil
  end
  local request, after = quoted(line, at)
  if not request then
    return nil
  end
  local status, bytes, at2 = line:match("^ (%d%d%d) (%S+) ()", after)
  if not status then
    return nil
  end
  local referrer, after2 = quoted(line, at2)
  local agent = after2 and quoted(line, after2 + 1)
  if not agent then
    return nil
  end
  local method, path, protocol = request:match("^(%S+) (%S+) ?(%S*)$")
  return {
    time = iso_time(time),
    client = client,
    user = user,
    method = method or "",
    path = path or request,
    protocol = protocol or "",
    status = tonumber(status),
    bytes = tonumber(bytes) or 0,
    referrer = referrer,
    agent = agent,
  }
end

return {
  open = function(client, request)
    local channel = request.query.channel or "log:access"
    if channel:sub(1, 4) ~= "log:" then
      return false, "channel must start with log:"
    end
    client:subscribe(channel)  -- raises an error (a 500) for an invalid name
  end,

  deliver = function(channel, line)
    line = line:gsub("[\r\n]+$", "")
    return parse(line) or { raw = line }
  end,
}
