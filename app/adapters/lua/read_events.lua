-- Up to `limit` events after the id `after`, oldest first, then the id of the oldest
-- event kept if events were ever trimmed from the log ('' if none were).
-- Argument layout: ReadEventsKeys and ReadEventsArgs in redis_scripts.py.
local events_key = KEYS[1]
local after, limit = ARGV[1], tonumber(ARGV[2])

local entries = redis.call('XRANGE', events_key, '(' .. after, '+', 'COUNT', limit)
local oldest_if_trimmed = ''
if redis.call('EXISTS', events_key) == 1 then
  local info = redis.call('XINFO', 'STREAM', events_key)
  local fields = {}
  for i = 1, #info, 2 do
    fields[info[i]] = info[i + 1]
  end
  local length = tonumber(fields['length'])
  if length > 0 and tonumber(fields['entries-added']) > length then
    oldest_if_trimmed = fields['first-entry'][1]
  end
end
return {entries, oldest_if_trimmed}
