-- Lease up to `limit` due entries of the notification outbox to `token`; returns their
-- entries (JSON), earliest first. An id whose entry is gone is dropped.
-- Argument layout: OutboxKeys and ClaimNotificationsArgs in redis_scripts.py.
local due_key, entries_key, claims_key = unpack(KEYS)
local now, limit, lease_until, token = unpack(ARGV)

local claimed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', due_key, '-inf', now, 'LIMIT', 0, limit)) do
  local entry = redis.call('HGET', entries_key, id)
  if entry then
    redis.call('ZADD', due_key, lease_until, id)
    redis.call('HSET', claims_key, id, token)
    claimed[#claimed + 1] = entry
  else
    redis.call('ZREM', due_key, id)
    redis.call('HDEL', claims_key, id)
  end
end
return claimed
