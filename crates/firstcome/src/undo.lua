-- undo.lua: takes back the decision of one request, and what it took.
--
-- Used when a decision cannot be stored in Postgres for good: if Redis had
-- counted the request as issued, the unit goes back to the stock and the user
-- out of the holders, so nobody is charged a coupon that does not exist. The
-- decision itself is removed: a failed request holds no decision, so a replay
-- of its dead letter is decided afresh at its new place in the log.
-- KEYS[1] stock, KEYS[2] users, KEYS[3] decided (see decide.lua)
-- ARGV[1] request_id
-- ARGV[2] user_id
-- ARGV[3] failed_at_us (kept for the log; the decision is removed)
--
-- Returns the status the request had before ('' if it had none).
assert(#KEYS == 3, 'undo.lua takes 3 keys')
assert(#ARGV == 3, 'undo.lua takes request_id, user_id, failed_at_us')

local prior = redis.call('HGET', KEYS[3], ARGV[1]) or ''
local status = string.match(prior, '^([a-z_]+):') or ''
if status == 'issued' then
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('INCRBY', KEYS[1], 1)
end
redis.call('HDEL', KEYS[3], ARGV[1])
return status
