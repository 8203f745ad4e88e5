-- authz.lua: the authorize script of the built-in routes in test_authorize.py.
--
-- open:      ?refuse=<reason> refuses the handshake; ?user=<name> is kept in client.data.user.
-- authorize: by channel name:
--   public:*   anyone, for anything
--   user:<n>   only the client whose ?user= is <n>
--   ro:*       subscribe only
--   pat:*      only as a pattern ("subscribe_pattern")
--   fail:*     raises an error;  loop:*  never returns;  method:*  calls client:send (not allowed)
--   count:*    refuses, telling how many clients closed so far ("closed=<n>")
--   anything else: refused without a reason
-- close:     counts closed clients in herald.state.closed.

herald.state.closed = herald.state.closed or 0

return {
  open = function(client, request)
    if request.query.refuse then
      return false, request.query.refuse
    end
    client.data.user = request.query.user
  end,

  authorize = function(client, action, channel)
    local kind, rest = channel:match("^(%w+):(.*)$")
    if kind == "public" then
      return true
    elseif kind == "user" then
      if client.data.user == rest then
        return true
      end
      return false, "user channels are for their user"
    elseif kind == "ro" then
      return action == "subscribe", "read-only channel"
    elseif kind == "pat" then
      return action == "subscribe_pattern", "only as a pattern"
    elseif kind == "fail" then
      error("authorize failed on purpose")
    elseif kind == "loop" then
      while true do end
    elseif kind == "method" then
      client:send("hello")
    elseif kind == "count" then
      return false, "closed=" .. herald.state.closed
    end
    return false
  end,

  close = function(client, code, reason)
    herald.state.closed = herald.state.closed + 1
  end,
}
