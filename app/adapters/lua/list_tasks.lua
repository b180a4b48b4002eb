-- Up to `limit` task documents of an index, in id order from `start` (ZRANGEBYLEX syntax).
-- Argument layout: ListTasksKeys and ListTasksArgs in redis_scripts.py.
local index_key = KEYS[1]
local prefix, start, limit = unpack(ARGV)

local ids = redis.call('ZRANGEBYLEX', index_key, start, '+', 'LIMIT', 0, limit)
if #ids == 0 then return {} end
local keys = {}
for i, id in ipairs(ids) do keys[i] = prefix .. 'task:' .. id end
return redis.call('MGET', unpack(keys))
