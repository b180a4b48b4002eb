-- Remove the scheduled_tasks entries `token` still holds among `task_ids`.
-- Argument layout: ClaimKeys and ReleaseArgs in redis_scripts.py.
local due_key, claims_key = unpack(KEYS)
local token, task_ids = ARGV[1], cjson.decode(ARGV[2])

for _, id in ipairs(task_ids) do
  if redis.call('HGET', claims_key, id) == token then
    redis.call('HDEL', claims_key, id)
    redis.call('ZREM', due_key, id)
  end
end
return 0
