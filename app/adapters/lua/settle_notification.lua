-- Settle a claimed notification while `token` holds it: due again at `retry_at` (as
-- `entry`) or removed; its record updated (if the run still has it) or removed.
-- Idempotent: a resent script finds the claim gone and changes nothing.
-- Argument layout: SettleKeys and SettleArgs in redis_scripts.py.
local due_key, entries_key, claims_key, records_key = unpack(KEYS)
local id, token, retry_at, entry, event, record = unpack(ARGV)

if redis.call('HGET', claims_key, id) ~= token then
  return 'lost'
end
redis.call('HDEL', claims_key, id)
if retry_at == '' then
  redis.call('ZREM', due_key, id)
  redis.call('HDEL', entries_key, id)
else
  redis.call('ZADD', due_key, retry_at, id)
  redis.call('HSET', entries_key, id, entry)
end
if record == '' then
  redis.call('HDEL', records_key, event)
elseif redis.call('HEXISTS', records_key, event) == 1 then
  redis.call('HSET', records_key, event, record)
end
return 'ok'
