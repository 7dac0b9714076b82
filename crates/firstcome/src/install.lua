-- install.lua: puts a coupon state built from Postgres in place, atomically.
--
-- The caller has loaded the issued users and the earlier decisions into the
-- staging keys KEYS[5] and KEYS[6] (named after the epoch, so two builders
-- never mix); this script swaps them in with the counters and the markers
-- decide.lua checks, unless a state of the same or a newer epoch is already
-- installed.
-- KEYS[1..4] meta, stock, users, decided (see decide.lua)
-- KEYS[5] staging users, KEYS[6] staging decisions (either may be absent: empty)
-- ARGV[1] epoch (Postgres `coupon.redis_epoch`, just raised by the builder)
-- ARGV[2] total stock
-- ARGV[3] starts_at_us or ''
-- ARGV[4] ends_at_us or ''
-- ARGV[5] seq (Postgres `coupon.decided_seq`)
--
-- Returns 1 when it installed the state, 0 when a newer one was there.
-- Keys go with UNLINK: a big sale's `decided` hash (a million entries, about
-- 100 MB) is freed off Redis's main thread instead of blocking every other
-- coupon's decisions for about a second (red team #8).
assert(#KEYS == 6, 'install.lua takes 6 keys')
assert(#ARGV == 5, 'install.lua takes epoch, total, starts, ends, seq')
local epoch = tonumber(ARGV[1])
local total = tonumber(ARGV[2])
assert(epoch and total and tonumber(ARGV[5]), 'epoch, total and seq must be numbers')

local current = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '')
if current and current >= epoch then
  redis.call('UNLINK', KEYS[5], KEYS[6])
  return 0
end
-- The coupon's progress in its partition (decide.lua) outlives the state:
-- a place in line never moves back because the state was built again.
local offset = redis.call('HGET', KEYS[1], 'offset')
redis.call('UNLINK', KEYS[1], KEYS[3], KEYS[4])
for _, pair in ipairs({{KEYS[5], KEYS[3]}, {KEYS[6], KEYS[4]}}) do
  if redis.call('EXISTS', pair[1]) == 1 then
    redis.call('RENAME', pair[1], pair[2])
    redis.call('PERSIST', pair[2])
  end
end
redis.call('SADD', KEYS[3], '')
redis.call('HSET', KEYS[4], '', epoch)
local issued = redis.call('SCARD', KEYS[3]) - 1
local decisions = redis.call('HLEN', KEYS[4]) - 1
redis.call('SET', KEYS[2], math.max(total - issued, 0))
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'seq', ARGV[5], 'total', ARGV[2],
  'issued', issued, 'decisions', decisions, 'starts_at_us', ARGV[3], 'ends_at_us', ARGV[4])
if offset then
  redis.call('HSET', KEYS[1], 'offset', offset)
end
return 1
