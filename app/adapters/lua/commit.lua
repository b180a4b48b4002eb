-- Apply one change of a task, or report why not: 'ok', 'exists' or 'conflict'.
-- Idempotent: a resent script whose first attempt was applied reports 'ok'.
-- Argument layout: CommitKeys and CommitArgs in redis_scripts.py.
local task_key, tasks_key, due_key, claims_key, runs_key = unpack(KEYS, 1, 5)
local notify_due_key, notify_entries_key = unpack(KEYS, 6, 7)  -- the notification outbox
local prefix, id, expected, doc, new_status = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local schedule, due_at, history, ended_ttl = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
local events_key = KEYS[8]  -- the event log
local notifications = ARGV[10]  -- "" or [{id, run_id, event, due, entry, record}]
local runs = cjson.decode(ARGV[11])  -- [{run_id, ended}], each run's document after them
local event_history, events = ARGV[12], ARGV[13]  -- events: their JSON, one a line
local docs_from = 13  -- run i's document is ARGV[docs_from + i]

local function records_key(run_id)  -- a run's notification records, by event
  return prefix .. 'notifications:' .. run_id
end

local current = redis.call('GET', task_key)
if current and current == doc then
  return 'ok'  -- a resent script whose first attempt was applied
end
local old_status = nil
if expected == '' then
  if current then return 'exists' end
else
  if not current then return 'conflict' end
  local revision, status = stored_revision(current)
  if tostring(revision) ~= expected then return 'conflict' end
  old_status = status
end

-- The change's lifecycle events, in the same step (after the checks above: a change
-- refused, or resent after it was applied, adds none).
for event in string.gmatch(events, '[^\n]+') do
  redis.call('XADD', events_key, 'MAXLEN', '~', event_history, '*', 'e', event)
end

if doc == '' then
  local keys = {task = task_key, tasks = tasks_key, due = due_key, claims = claims_key,
                runs = runs_key}
  delete_task(prefix, id, keys, {old_status})
  return 'ok'
end

redis.call('SET', task_key, doc)
if not old_status then
  redis.call('ZADD', tasks_key, 0, id)
end
if old_status ~= new_status then
  if old_status then
    redis.call('ZREM', prefix .. 'status:' .. old_status, id)
  end
  redis.call('ZADD', prefix .. 'status:' .. new_status, 0, id)
end

-- Notifications the change causes: into the outbox, each with its pending record.
if notifications ~= '' then
  for _, note in ipairs(cjson.decode(notifications)) do
    redis.call('ZADD', notify_due_key, note.due, note.id)
    redis.call('HSET', notify_entries_key, note.id, note.entry)
    redis.call('HSET', records_key(note.run_id), note.event, note.record)
  end
end

if #runs > 0 then
  for i, run in ipairs(runs) do
    redis.call('HSET', runs_key, run.run_id, ARGV[docs_from + i])
    if run.ended then  -- end the run's live output, if someone follows or it printed
      local output_key = prefix .. 'output:' .. run.run_id
      local newest = newest_fields(output_key)[1]
      if newest and newest ~= 'e' then
        redis.call('XADD', output_key, '*', 'e', '1')
        redis.call('EXPIRE', output_key, ended_ttl)
      end
    end
  end
  local count = redis.call('HLEN', runs_key)
  if count > history then
    local run_ids = redis.call('HKEYS', runs_key)
    table.sort(run_ids)
    for i = 1, count - history do
      redis.call('HDEL', runs_key, run_ids[i])
      redis.call('DEL', records_key(run_ids[i]))
    end
  end
end

if schedule == 'remove' then
  redis.call('ZREM', due_key, id)
  redis.call('HDEL', claims_key, id)
elseif schedule == 'at' then
  local first = redis.call('ZRANGE', due_key, 0, 0, 'WITHSCORES')
  redis.call('ZADD', due_key, due_at, id)
  redis.call('HDEL', claims_key, id)
  if #first == 0 or tonumber(due_at) < tonumber(first[2]) then
    redis.call('PUBLISH', prefix .. 'wake', due_at)
  end
end
return 'ok'
