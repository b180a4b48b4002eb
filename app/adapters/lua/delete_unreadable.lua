-- Delete a task whose document cannot be read, only while its document is still
-- `document` (the bytes its caller read): {1, run ids deleted} or {0} when it is not.
-- Without a status to read, it leaves the index of every status in `statuses`.
-- Idempotent: resent after it applied, it finds no document and reports {0}, as a
-- resent delete through commit.lua reports a conflict.
-- Argument layout: DeleteUnreadableKeys and DeleteUnreadableArgs in redis_scripts.py.
local task_key, tasks_key, due_key, claims_key, runs_key, events_key = unpack(KEYS)
local prefix, id, document, statuses = ARGV[1], ARGV[2], ARGV[3], cjson.decode(ARGV[4])
local event_history, events = ARGV[5], ARGV[6]  -- events: their JSON, one a line

if redis.call('GET', task_key) ~= document then return {0} end
for event in string.gmatch(events, '[^\n]+') do
  redis.call('XADD', events_key, 'MAXLEN', '~', event_history, '*', 'e', event)
end
local keys = {task = task_key, tasks = tasks_key, due = due_key, claims = claims_key,
              runs = runs_key}
return {1, delete_task(prefix, id, keys, statuses)}
