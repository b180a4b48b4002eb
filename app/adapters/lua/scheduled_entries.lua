-- Up to `limit` entries of scheduled_tasks scored up to `until`, after the first `offset`,
-- in score order, with their task documents: {id, score, id, score, ...} and the documents.
-- Argument layout: ScheduledKeys and ScheduledArgs in redis_scripts.py.
local due_key = KEYS[1]
local prefix, until_score, offset, limit = unpack(ARGV)

local entries = redis.call(
    'ZRANGEBYSCORE', due_key, '-inf', until_score, 'WITHSCORES', 'LIMIT', offset, limit)
if #entries == 0 then return {{}, {}} end
local keys = {}
for i = 1, #entries, 2 do keys[#keys + 1] = prefix .. 'task:' .. entries[i] end
return {entries, redis.call('MGET', unpack(keys))}
