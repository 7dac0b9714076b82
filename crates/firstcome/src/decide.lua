-- decide.lua: decides the issue requests of ONE coupon, in log order, atomically.
--
-- All keys share the coupon's hash tag, so the script also runs on Redis Cluster.
-- KEYS[1] meta     hash    total, starts_at_us, ends_at_us ('' = open-ended); its
--                          existence means "this coupon's state is initialized"
-- KEYS[2] stock    string  units left
-- KEYS[3] users    set     users holding the coupon
-- KEYS[4] decided  hash    request_id -> "<status>:<decided_at_us>", so a redelivered
--                          request gets its first answer back instead of a new one
-- ARGV[1]          decided_at_us stamped on the new decisions
-- ARGV[2..]        triples request_id, user_id, accepted_at_us, in log order
--
-- Returns {'uninitialized'} when the coupon has no state here (initialize it
-- from Postgres and call again), else {'ok', status_1, decided_at_1, ...} with
-- one pair per request triple, in the same order.
assert(#KEYS == 4, 'decide.lua takes 4 keys')
assert(#ARGV >= 1 and (#ARGV - 1) % 3 == 0, 'decide.lua takes decided_at_us and request triples')

local meta, stock_key, users, decided = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', meta) == 0 then
  return {'uninitialized'}
end

local starts = tonumber(redis.call('HGET', meta, 'starts_at_us') or '')
local ends = tonumber(redis.call('HGET', meta, 'ends_at_us') or '')
local now = ARGV[1]
local stock = tonumber(redis.call('GET', stock_key) or '0')
local taken = 0
local out = {'ok'}

for i = 2, #ARGV, 3 do
  local request, user, accepted = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  assert(accepted, 'accepted_at_us must be a number')
  local prior = redis.call('HGET', decided, request)
  if prior then
    local sep = string.find(prior, ':', 1, true)
    out[#out + 1] = string.sub(prior, 1, sep - 1)
    out[#out + 1] = string.sub(prior, sep + 1)
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
    out[#out + 1] = status
    out[#out + 1] = now
  end
end

if taken > 0 then
  redis.call('DECRBY', stock_key, taken)
end
return out
