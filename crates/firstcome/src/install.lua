-- install.lua: puts a coupon state built from Postgres in place, atomically.
--
-- The caller has loaded the issued users and the earlier decisions into the
-- staging keys KEYS[6] and KEYS[7] (named after the epoch, so two builders
-- never mix); this script swaps them in with the counters, unless a state of
-- the same or a newer epoch is already installed.
-- KEYS[1..5] meta, stock, users, decided, paused (see decide.lua)
-- KEYS[6] staging users, KEYS[7] staging decisions (either may be absent: empty)
-- ARGV[1] epoch (Postgres `coupon.redis_epoch`, just raised by the builder)
-- ARGV[2] total stock
-- ARGV[3] starts_at_us or ''
-- ARGV[4] ends_at_us or ''
-- ARGV[5] units left (total minus the issued rows in Postgres)
-- ARGV[6] seq (Postgres `coupon.decided_seq`)
--
-- Returns 1 when it installed the state, 0 when a newer one was there.
assert(#KEYS == 7, 'install.lua takes 7 keys')
assert(#ARGV == 6, 'install.lua takes epoch, total, starts, ends, remaining, seq')
local epoch = tonumber(ARGV[1])
assert(epoch and tonumber(ARGV[2]) and tonumber(ARGV[5]) and tonumber(ARGV[6]),
  'epoch, total, remaining and seq must be numbers')

local current = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '')
if current and current >= epoch then
  redis.call('DEL', KEYS[6], KEYS[7])
  return 0
end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
for _, pair in ipairs({{KEYS[6], KEYS[3]}, {KEYS[7], KEYS[4]}}) do
  if redis.call('EXISTS', pair[1]) == 1 then
    redis.call('RENAME', pair[1], pair[2])
    redis.call('PERSIST', pair[2])
  end
end
redis.call('SET', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'seq', ARGV[6], 'total', ARGV[2],
  'starts_at_us', ARGV[3], 'ends_at_us', ARGV[4])
redis.call('DEL', KEYS[5])
return 1
