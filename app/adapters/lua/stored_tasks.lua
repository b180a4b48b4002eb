-- Shared by the scripts that change stored tasks (prepended to every script).

-- The revision and status of a stored task document; nil when it cannot be read (a hand
-- edit, another version's format): a change checked against a revision then conflicts,
-- and its caller, reading the task again, finds the document unreadable.
local function stored_revision(doc)
  local ok, stored = pcall(cjson.decode, doc)
  if not ok or type(stored) ~= 'table' or type(stored.status) ~= 'string' then
    return nil, nil
  end
  return stored.revision, stored.status
end

-- Delete a task: its document, its runs and their notification records, its entries in
-- `tasks`, in the index of each of `statuses`, in scheduled_tasks and in claims. The ids
-- of the runs deleted.
local function delete_task(prefix, id, keys, statuses)
  local run_ids = redis.call('HKEYS', keys.runs)
  local doomed = {keys.task, keys.runs}
  for _, run_id in ipairs(run_ids) do
    doomed[#doomed + 1] = prefix .. 'notifications:' .. run_id  -- the run's records
  end
  redis.call('DEL', unpack(doomed))
  redis.call('ZREM', keys.tasks, id)
  for _, status in ipairs(statuses) do
    redis.call('ZREM', prefix .. 'status:' .. status, id)
  end
  redis.call('ZREM', keys.due, id)
  redis.call('HDEL', keys.claims, id)
  return run_ids
end
