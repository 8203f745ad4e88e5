-- echo.lua: every message comes back to its sender unchanged, text as text and binary as binary.
--
-- The smallest useful route: one hook. Try it at /echo-lua in the demo configuration.

return {
  message = function(client, data, is_binary)
    client:send(data, is_binary)
  end,
}
