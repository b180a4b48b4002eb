-- Add a chunk to a run's live output stream, keep its newest `keep` bytes; 1 if added.
-- Argument layout: OutputKeys and AppendArgs in redis_scripts.py.
local key = KEYS[1]
local offset, data, keep, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]

local newest = newest_fields(key)
if newest[1] == 'e' then return 0 end  -- the run ended: its live output is final
if newest[1] == 'o' and offset < tonumber(newest[2]) + #newest[4] then
  return 0  -- these bytes are kept already: a resent chunk
end
local id = redis.call('XADD', key, '*', 'o', ARGV[1], 'd', data)
local stop = offset + #data
while true do
  local head = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
  if head[1] == id then break end
  local fields = head[2]
  if fields[1] == 'o' and stop - tonumber(fields[2]) <= keep then break end
  redis.call('XDEL', key, head[1])
end
redis.call('EXPIRE', key, ttl)
return 1
