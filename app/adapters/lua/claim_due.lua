-- Lease up to `limit` due entries of scheduled_tasks; returns id, due time (the entry's
-- score before the claim), task document triples.
-- Argument layout: ClaimKeys and ClaimArgs in redis_scripts.py.
local due_key, claims_key = unpack(KEYS)
local prefix, now, limit, lease_until, token = unpack(ARGV)

local due = redis.call('ZRANGEBYSCORE', due_key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
local claimed = {}
for i = 1, #due, 2 do
  local id = due[i]
  redis.call('ZADD', due_key, lease_until, id)
  redis.call('HSET', claims_key, id, token)
  claimed[#claimed + 1] = id
  claimed[#claimed + 1] = due[i + 1]
  claimed[#claimed + 1] = redis.call('GET', prefix .. 'task:' .. id)
end
return claimed
