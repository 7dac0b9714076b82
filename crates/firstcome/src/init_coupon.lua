-- init_coupon.lua: creates a coupon's Redis state, unless it already exists.
--
-- The caller first loads the issued users and earlier decisions into KEYS[3]
-- and KEYS[4] (idempotent SADD/HSET); this script then writes the meta hash and
-- the stock counter, and the meta hash is what marks the state as usable.
-- KEYS[1] meta, KEYS[2] stock (see decide.lua)
-- ARGV[1] total stock
-- ARGV[2] starts_at_us or ''
-- ARGV[3] ends_at_us or ''
-- ARGV[4] units left (total minus the issued rows in Postgres)
--
-- Returns 1 when it created the state, 0 when the state was already there.
assert(#KEYS == 2, 'init_coupon.lua takes 2 keys')
assert(#ARGV == 4, 'init_coupon.lua takes total, starts_at_us, ends_at_us, remaining')
assert(tonumber(ARGV[1]) and tonumber(ARGV[4]), 'total and remaining must be numbers')

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('SET', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'starts_at_us', ARGV[2], 'ends_at_us', ARGV[3])
return 1
