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

