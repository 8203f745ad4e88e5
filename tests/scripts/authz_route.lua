-- authz_route.lua: a script route with an authorize hook, for test_authorize.py.
--
-- open:      subscribes the client to each channel of ?sub=a,b and sends
--            {"hook":"open","results":[{"channel":..,"ok":..,"err":..}, ...]}.
-- message:   subscribes to the channel named by the message and sends {"hook":"message",...}.
-- authorize: "public:*" allowed, "fail" raises, anything else refused with a reason.

local function try(client, channel)
  local ok, err = client:subscribe(channel)
  return { channel = channel, ok = ok, err = err }
end

return {
  open = function(client, request)
    local results = {}
    for channel in (request.query.sub or ""):gmatch("[^,]+") do
      results[#results + 1] = try(client, channel)
    end
    client:send({ hook = "open", results = results })
  end,

  message = function(client, data)
    local r = try(client, data)
    r.hook = "message"
    client:send(r)
  end,

  authorize = function(client, action, channel)
    if channel:sub(1, 7) == "public:" then
      return true
    end
    if channel == "fail" then
      error("authorize failed on purpose")
    end
    return false, "only public: channels here"
  end,
}
