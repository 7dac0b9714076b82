-- undo.lua: marks one decided request as failed, giving back what it took.
--
-- Used when a decision cannot be stored in Postgres for good: if Redis had
-- counted the request as issued, the unit goes back to the stock and the user
-- out of the holders, so nobody is charged a coupon that does not exist.
-- KEYS[1] stock, KEYS[2] users, KEYS[3] decided (see decide.lua)
-- ARGV[1] request_id
-- ARGV[2] user_id
-- ARGV[3] failed_at_us
--
-- Returns the status the request had before ('' if it had none).
assert(#KEYS == 3, 'undo.lua takes 3 keys')
assert(#ARGV == 3, 'undo.lua takes request_id, user_id, failed_at_us')

local prior = redis.call('HGET', KEYS[3], ARGV[1]) or ''
local status = string.match(prior, '^([a-z_]+):') or ''
if status == 'failed' then
  return status
end
if status == 'issued' then
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('INCRBY', KEYS[1], 1)
end
redis.call('HSET', KEYS[3], ARGV[1], 'failed:' .. ARGV[3])
return status
