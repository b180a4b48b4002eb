-- The next `limit` ids of an index from `start` (ZRANGEBYLEX syntax), in id order, with
-- their task documents (nil where the key is gone) and whether more ids follow:
-- {ids, documents, more (0 or 1)}.
-- Argument layout: ListTasksKeys and ListTasksArgs in redis_scripts.py.
local index_key = KEYS[1]
local prefix, start, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])

local ids = redis.call('ZRANGEBYLEX', index_key, start, '+', 'LIMIT', 0, limit + 1)
local more = 0
if #ids > limit then
  ids[#ids] = nil
  more = 1
end
if #ids == 0 then return {{}, {}, more} end
local keys = {}
for i, id in ipairs(ids) do keys[i] = prefix .. 'task:' .. id end
return {ids, redis.call('MGET', unpack(keys)), more}
