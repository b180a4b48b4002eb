-- Apply a change of a task together with changes of other tasks (the runs a run's end
-- triggers), all or none; report 'ok', 'exists' or 'conflict' as commit.lua does.
-- ``commit_one(KEYS, ARGV)`` is commit.lua itself, wrapped as a function (redis_scripts.py).
-- Idempotent: when the first change is stored already, the whole group was applied.
-- Argument layout: ChainedArgs, then per change its CommitArgs and its runs' documents;
-- KEYS are each change's CommitKeys in turn (redis_scripts.py).
local keys_per_change, args_per_change = tonumber(ARGV[1]), tonumber(ARGV[2])
local runs_arg, revision_arg, doc_arg = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

local changes = {}
local at = 6
for first = 1, #KEYS, keys_per_change do
  local runs = cjson.decode(ARGV[at + runs_arg - 1])
  local last = at + args_per_change - 1 + #runs
  changes[#changes + 1] = {
    keys = {unpack(KEYS, first, first + keys_per_change - 1)},
    argv = {unpack(ARGV, at, last)},
  }
  at = last + 1
end

-- 'applied', 'ok' (it can apply), 'exists' or 'conflict'
local function check(change)
  local expected, doc = change.argv[revision_arg], change.argv[doc_arg]
  local current = redis.call('GET', change.keys[1])
  if current and current == doc then return 'applied' end
  if expected == '' then
    if current then return 'exists' end
    return 'ok'
  end
  if not current then return 'conflict' end
  if tostring((stored_revision(current))) ~= expected then return 'conflict' end
  return 'ok'
end

for i, change in ipairs(changes) do
  local verdict = check(change)
  if verdict == 'applied' then
    if i == 1 then return 'ok' end
    return 'conflict'
  end
  if verdict ~= 'ok' then return verdict end
end
for _, change in ipairs(changes) do
  commit_one(change.keys, change.argv)
end
return 'ok'
