-- decide.lua: decides the issue requests of ONE coupon, in log order, atomically.
--
-- All keys share the coupon's hash tag, so the script also runs on Redis Cluster.
-- KEYS[1] meta     hash    epoch, seq, total, starts_at_us, ends_at_us ('' =
--                          open-ended); `epoch` marks the state as installed
-- KEYS[2] stock    string  units left
-- KEYS[3] users    set     users holding the coupon
-- KEYS[4] decided  hash    request_id -> "<status>:<decided_at_us>", so a redelivered
--                          request gets its first answer back instead of a new one
-- KEYS[5] paused   string  present while `redis rebuild` works on the coupon
-- ARGV[1]          decided_at_us stamped on the new decisions
-- ARGV[2..]        triples request_id, user_id, accepted_at_us, in log order
--
-- Every new decision takes the next number of the coupon's decision sequence
-- `seq`; Postgres accepts a decision only if it was taken on the state it
-- knows (same `epoch`, `seq` past its own), which is how a state that was
-- wiped, rolled back or rebuilt meanwhile is caught (see state.rs).
--
-- Returns {'paused'}, {'uninitialized'} when the coupon has no state here
-- (build it from Postgres and call again), else
-- {'ok', epoch, status_1, decided_at_1, seq_1, ...} with one triple per
-- request, in the same order; seq is '0' for an earlier decision given back.
assert(#KEYS == 5, 'decide.lua takes 5 keys')
assert(#ARGV >= 1 and (#ARGV - 1) % 3 == 0, 'decide.lua takes decided_at_us and request triples')

local meta, stock_key, users, decided = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', KEYS[5]) == 1 then
  return {'paused'}
end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  return {'uninitialized'}
end

local starts = tonumber(redis.call('HGET', meta, 'starts_at_us') or '')
local ends = tonumber(redis.call('HGET', meta, 'ends_at_us') or '')
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
local now = ARGV[1]
local stock = tonumber(redis.call('GET', stock_key) or '0')
local taken, fresh = 0, 0
local out = {'ok', epoch}

for i = 2, #ARGV, 3 do
  local request, user, accepted = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  assert(accepted, 'accepted_at_us must be a number')
  local prior = redis.call('HGET', decided, request)
  if prior then
    local sep = string.find(prior, ':', 1, true)
    out[#out + 1] = string.sub(prior, 1, sep - 1)
    out[#out + 1] = string.sub(prior, sep + 1)
    out[#out + 1] = '0'
  else
    local status
    if (starts and accepted < starts) or (ends and accepted > ends) then
      status = 'not_open'
    elseif redis.call('SISMEMBER', users, user) == 1 then
      status = 'duplicate'
    elseif stock - taken <= 0 then
      status = 'sold_out'
    else
      taken = taken + 1
      redis.call('SADD', users, user)
      status = 'issued'
    end
    redis.call('HSET', decided, request, status .. ':' .. now)
    fresh = fresh + 1
    out[#out + 1] = status
    out[#out + 1] = now
    out[#out + 1] = tostring(seq + fresh)
  end
end

if taken > 0 then
  redis.call('DECRBY', stock_key, taken)
end
if fresh > 0 then
  redis.call('HSET', meta, 'seq', seq + fresh)
end
return out
