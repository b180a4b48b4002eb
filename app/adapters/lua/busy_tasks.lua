-- Up to `limit` tasks whose scheduled_tasks entry is not their next due time: the running
-- ones (its score is a lease) and those a scheduler holds a claim on: {ids}, {documents}.
-- Argument layout: BusyKeys and BusyArgs in redis_scripts.py.
local running_key, claims_key = unpack(KEYS)
local prefix, limit = unpack(ARGV)
limit = tonumber(limit)

local ids = redis.call('ZRANGE', running_key, 0, limit - 1)
local seen = {}
for _, id in ipairs(ids) do seen[id] = true end
for _, id in ipairs(redis.call('HKEYS', claims_key)) do
  if #ids >= limit then break end
  if not seen[id] then ids[#ids + 1] = id end
end
if #ids == 0 then return {{}, {}} end
local keys = {}
for i, id in ipairs(ids) do keys[i] = prefix .. 'task:' .. id end
return {ids, redis.call('MGET', unpack(keys))}
