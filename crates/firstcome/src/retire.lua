-- retire.lua: takes a coupon's state out of Redis once its sale is over and
-- Postgres holds every decision of it (the worker checks that with the log's
-- offsets first; see docs/design.md, "A coupon's state leaves Redis").
--
-- A state of a newer epoch than the one the caller read is left alone: a
-- rebuild came in between (a late record, a replay), and a later sweep looks
-- again. An older one is stale (the fence refuses whatever is decided on it)
-- and goes, as does what is left of a state that is partly gone (no meta:
-- never decided on).
-- KEYS[1..4] meta, stock, users, decided (see decide.lua)
-- KEYS[5] accepted (the ingress's count of acknowledged requests)
-- ARGV[1] epoch (Postgres `coupon.redis_epoch`, read by the caller)
--
-- Keys go with UNLINK: a big sale's `decided` hash (a million entries, about
-- 100 MB) is freed off Redis's main thread instead of blocking every other
-- coupon's decisions for about a second (red team #8).
-- Returns 1 when it deleted the state, 0 when it kept a newer one, -1 when
-- there was no state.
assert(#KEYS == 5, 'retire.lua takes 5 keys')
assert(#ARGV == 1 and tonumber(ARGV[1]), 'retire.lua takes an epoch')

local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  return -1
end
if tonumber(epoch) > tonumber(ARGV[1]) then
  return 0
end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return 1
