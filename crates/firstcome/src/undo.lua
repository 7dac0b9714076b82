-- undo.lua: takes back the decision of one request, and what it took.
--
-- Used when a decision cannot be stored in Postgres for good: if Redis had
-- counted the request as issued, the unit goes back to the stock and the user
-- out of the holders, so nobody is charged a coupon that does not exist. The
-- decision itself is removed: a failed request holds no decision, so a replay
-- of its dead letter is decided afresh at its new place in the log. The
-- counts decide.lua checks (see there) follow.
-- KEYS[1] meta, KEYS[2] stock, KEYS[3] users, KEYS[4] decided (see decide.lua)
-- ARGV[1] request_id
-- ARGV[2] user_id
--
-- Returns the outcome the request had before ('' if it had none).
assert(#KEYS == 4, 'undo.lua takes 4 keys')
assert(#ARGV == 2, 'undo.lua takes request_id, user_id')

local prior = redis.call('HGET', KEYS[4], ARGV[1]) or ''
local status = string.match(prior, '^([a-z_]+):') or ''
if prior == '' then
  return ''
end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'decisions', -1)
if status == 'issued' and redis.call('SREM', KEYS[3], ARGV[2]) == 1 then
  local issued = redis.call('HINCRBY', KEYS[1], 'issued', -1)
  local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
  redis.call('SET', KEYS[2], math.max(total - issued, 0))
end
return status
