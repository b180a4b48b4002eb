-- Mark a run's live output as followed (so that the commit ending the run ends it),
-- and return every entry kept.
-- Argument layout: OutputKeys and FollowArgs in redis_scripts.py.
local key = KEYS[1]
local ttl = ARGV[1]

if newest_fields(key)[1] ~= 'e' then
  if redis.call('EXISTS', key) == 0 then
    redis.call('XADD', key, '*', 'f', '1')
  end
  redis.call('EXPIRE', key, ttl)
end
return redis.call('XRANGE', key, '-', '+')
