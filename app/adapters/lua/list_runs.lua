-- The `limit` newest runs of a task, newest first (run ids sort by time): their ids, and
-- their documents in the same order.
-- Argument layout: ListRunsKeys and ListRunsArgs in redis_scripts.py.
local runs_key = KEYS[1]
local limit = tonumber(ARGV[1])

local run_ids = redis.call('HKEYS', runs_key)
if #run_ids == 0 then return {{}, {}} end
table.sort(run_ids, function(a, b) return a > b end)
local newest = {}
for i = 1, math.min(#run_ids, limit) do newest[i] = run_ids[i] end
return {newest, redis.call('HMGET', runs_key, unpack(newest))}
