-- Shared by the scripts that look at a live output stream (prepended to them).

-- The fields of a stream's newest entry, {} when there is none.
local function newest_fields(key)
  local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  return newest and newest[2] or {}
end
