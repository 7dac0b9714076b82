-- decide.lua: decides the records of ONE coupon, in log order, atomically.
--
-- All keys share the coupon's hash tag, so the script also runs on Redis Cluster.
-- An installed state always holds all four keys (the set and the hash carry a
-- marker entry, the empty string, which no user or request id can be), so a
-- slot being moved between cluster nodes never finds the state half there
-- for longer than one key's move, and a key that is gone is noticed.
-- KEYS[1] meta     hash    epoch, seq, total, issued, decisions, starts_at_us,
--                          ends_at_us ('' = open-ended), paused_until_us
-- KEYS[2] stock    string  units left
-- KEYS[3] users    set     users holding the coupon (+ the marker)
-- KEYS[4] decided  hash    record id -> "<outcome>:<decided_at_us>:<seq>", so a
--                          redelivered record gets its first answer back
--                          instead of a new one (+ the marker)
-- ARGV[1]          decided_at_us stamped on the new decisions
-- ARGV[2]          the log offset of the last record, or '': the coupon's
--                  progress in its partition, kept in meta `offset` (only
--                  ever raised), which a pending request's place in line is
--                  counted from
-- ARGV[3..]        quadruples kind, id, a, b in log order:
--                    'r' request_id, user_id, accepted_at_us  (an issue request)
--                    's' change_id, units, ''                 (add stock)
--                    'c' change_id, at_us, ''                 (close at at_us)
--                    'o' change_id, ends_at_us or '', ''      (reopen until)
--
-- Every new decision takes the next number of the coupon's decision sequence
-- `seq`; Postgres accepts a decision only if it was taken on the state it
-- knows (same `epoch`, numbers following its own without a gap), which is
-- how a state that was wiped, rolled back or rebuilt meanwhile is caught (see
-- state.rs). A decision loaded from Postgres by a rebuild has seq 0.
--
-- The state counts itself: `issued` holders, `decisions` entries, `stock`
-- equal to `total - issued` (never below 0). A state that does not add up
-- (a key or an entry lost, by eviction, a partial restore or a hand) is not
-- decided on: the script answers as if there were none, and the caller
-- builds it again from Postgres.
--
-- Returns {'paused'}, {'uninitialized'}, else {'ok', epoch, outcome_1,
-- decided_at_1, seq_1, ...} with one triple per record, in the same order.
-- Outcomes: issued, duplicate, sold_out, not_open for requests, applied for
-- changes.
assert(#KEYS == 4, 'decide.lua takes 4 keys')
assert(#ARGV >= 2 and (#ARGV - 2) % 4 == 0, 'decide.lua takes decided_at_us, an offset and record quadruples')

local meta, stock_key, users, decided = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local m = redis.call('HMGET', meta, 'epoch', 'seq', 'total', 'issued', 'decisions',
  'starts_at_us', 'ends_at_us', 'paused_until_us')
local epoch = m[1]
local seq, total, issued, decisions = tonumber(m[2]), tonumber(m[3]), tonumber(m[4]), tonumber(m[5])
local stock = tonumber(redis.call('GET', stock_key) or '')
if not (epoch and seq and total and issued and decisions and stock)
    or redis.call('SCARD', users) ~= issued + 1
    or redis.call('HLEN', decided) ~= decisions + 1
    or stock ~= math.max(total - issued, 0) then
  return {'uninitialized'}
end
local paused = tonumber(m[8] or '')
if paused then
  local t = redis.call('TIME')
  if paused > tonumber(t[1]) * 1000000 + tonumber(t[2]) then
    return {'paused'}
  end
end

local starts = tonumber(m[6] or '')
local ends = tonumber(m[7] or '')
local now = ARGV[1]
local fresh, changed = 0, false
local out = {'ok', epoch}

for i = 3, #ARGV, 4 do
  local kind, id, a = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local prior = redis.call('HGET', decided, id)
  if prior then
    local s1 = string.find(prior, ':', 1, true)
    local s2 = string.find(prior, ':', s1 + 1, true)
    out[#out + 1] = string.sub(prior, 1, s1 - 1)
    if s2 then
      out[#out + 1] = string.sub(prior, s1 + 1, s2 - 1)
      out[#out + 1] = string.sub(prior, s2 + 1)
    else
      out[#out + 1] = string.sub(prior, s1 + 1)
      out[#out + 1] = '0'
    end
  else
    local outcome
    if kind == 'r' then
      local accepted = tonumber(ARGV[i + 3])
      assert(accepted, 'accepted_at_us must be a number')
      if (starts and accepted < starts) or (ends and accepted > ends) then
        outcome = 'not_open'
      elseif redis.call('SISMEMBER', users, a) == 1 then
        outcome = 'duplicate'
      elseif total - issued <= 0 then
        outcome = 'sold_out'
      else
        issued = issued + 1
        redis.call('SADD', users, a)
        outcome = 'issued'
      end
    elseif kind == 's' then
      local units = tonumber(a)
      assert(units and units > 0, 'units must be a positive number')
      total = total + units
      changed = true
      outcome = 'applied'
    elseif kind == 'c' then
      local at = tonumber(a)
      assert(at, 'close takes a time')
      if not ends or at < ends then
        ends = at
      end
      changed = true
      outcome = 'applied'
    elseif kind == 'o' then
      ends = tonumber(a)
      changed = true
      outcome = 'applied'
    else
      error('unknown record kind ' .. tostring(kind))
    end
    fresh = fresh + 1
    redis.call('HSET', decided, id, outcome .. ':' .. now .. ':' .. (seq + fresh))
    out[#out + 1] = outcome
    out[#out + 1] = now
    out[#out + 1] = tostring(seq + fresh)
  end
end

local offset = tonumber(ARGV[2])
if offset and offset > (tonumber(redis.call('HGET', meta, 'offset') or '') or -1) then
  redis.call('HSET', meta, 'offset', offset)
end
if fresh > 0 then
  redis.call('SET', stock_key, math.max(total - issued, 0))
  redis.call('HSET', meta, 'seq', seq + fresh, 'issued', issued, 'decisions', decisions + fresh)
  if changed then
    redis.call('HSET', meta, 'total', total, 'ends_at_us', ends and tostring(ends) or '')
  end
end
return out
