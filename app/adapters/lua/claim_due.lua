-- Lease up to `limit` due entries of scheduled_tasks; returns id, task document pairs.
-- Argument layout: ClaimKeys and ClaimArgs in redis_scripts.py.
local due_key, claims_key = unpack(KEYS)
local prefix, now, limit, lease_until, token = unpack(ARGV)

local ids = redis.call('ZRANGEBYSCORE', due_key, '-inf', now, 'LIMIT', 0, limit)
local claimed = {}
for i, id in ipairs(ids) do
  redis.call('ZADD', due_key, lease_until, id)
  redis.call('HSET', claims_key, id, token)
  claimed[2 * i - 1] = id
  claimed[2 * i] = redis.call('GET', prefix .. 'task:' .. id)
end
return claimed
