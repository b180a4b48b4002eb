-- Create new tasks, each on its own: 'ok' where created, 'exists' where its id is taken
-- (stored already, or by an earlier task of this call). A task, its indexes and its
-- schedule entry are written together. Schedulers are woken once at most, when the
-- earliest new entry comes before every entry there was.
-- Idempotent: a resent script whose first attempt was applied reports the same.
-- Argument layout: CreateKeys and CreateArgs in redis_scripts.py.
local tasks_key, due_key, claims_key, events_key = unpack(KEYS)
local prefix, tasks = ARGV[1], cjson.decode(ARGV[2])  -- [{id, doc, status, due_at, events}]
local event_history = ARGV[3]

local first = redis.call('ZRANGE', due_key, 0, 0, 'WITHSCORES')
local earliest_before = tonumber(first[2])
local earliest_new, earliest_new_text = nil, nil
local taken = {}
local results = {}
for i, task in ipairs(tasks) do
  local task_key = prefix .. 'task:' .. task.id
  local current = redis.call('GET', task_key)
  if taken[task.id] or (current and current ~= task.doc) then
    results[i] = 'exists'
  else
    taken[task.id] = true
    results[i] = 'ok'
    if not current then  -- (an equal document: a resent script's first attempt wrote it)
      redis.call('SET', task_key, task.doc)
      redis.call('ZADD', tasks_key, 0, task.id)
      redis.call('ZADD', prefix .. 'status:' .. task.status, 0, task.id)
      redis.call('HDEL', claims_key, task.id)
      for event in string.gmatch(task.events, '[^\n]+') do
        redis.call('XADD', events_key, 'MAXLEN', '~', event_history, '*', 'e', event)
      end
      if task.due_at == '' then
        redis.call('ZREM', due_key, task.id)
      else
        redis.call('ZADD', due_key, task.due_at, task.id)
        local due_at = tonumber(task.due_at)
        if not earliest_new or due_at < earliest_new then
          earliest_new, earliest_new_text = due_at, task.due_at
        end
      end
    end
  end
end
if earliest_new and (not earliest_before or earliest_new < earliest_before) then
  redis.call('PUBLISH', prefix .. 'wake', earliest_new_text)
end
return results
