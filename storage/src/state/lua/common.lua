-- Shared prelude of every state script (prepended by redis.rs).
-- ARGV[1] is the run's key prefix `flywheel:{<run>}:`; the `{<run>}` hash tag keeps every key
-- of a run in one cluster slot, so scripts that derive keys from it stay slot-local.
-- Clock: all expiries use the server's TIME, never a client clock.
local P = ARGV[1]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Integers as decimal strings: Lua's tostring would switch to exponent form past 14 digits.
local function int(n)
  return string.format('%d', n)
end

-- A trajectory's member key is `<sample>:<prompt id>`.
local function tkey(m) return P .. 'traj:' .. m end
local function skey(m) return P .. 'segs:' .. m end

-- The trajectory's hash (flat field/value list) and its committed segments (JSON strings).
local function state_of(m)
  return {redis.call('HGETALL', tkey(m)), redis.call('LRANGE', skey(m), 0, -1)}
end

-- Nil when (owner, epoch) holds the live, current lease of m; else an error reply table.
local function fence(m, owner, epoch, now)
  local h = redis.call('HMGET', tkey(m), 'status', 'owner', 'epoch', 'exp')
  if not h[1] then return {'err', 'unknown'} end
  if tonumber(h[3]) ~= epoch then return {'err', 'stale', h[3]} end
  if h[1] ~= 'generating' then return {'err', 'not_generating', h[1]} end
  if h[2] ~= owner then return {'err', 'foreign', h[2]} end
  if tonumber(h[4]) <= now then return {'err', 'expired', h[4]} end
  return nil
end

-- Nil when `token` is the live leader's; else the `leader` error reply (with the live holder,
-- if any). The fence of every leader-only write (board.rs `check_leader` is the memory twin).
local function check_leader(token, now)
  local l = redis.call('HMGET', P .. 'leader', 'holder', 'token', 'exp')
  if l[1] and tonumber(l[3]) > now and tonumber(l[2]) == token then return nil end
  if l[1] and tonumber(l[3]) > now then return {'leader', l[1], l[2], l[3]} end
  return {'leader'}
end

-- The refusal of registrations and claims until a leader has initialised (or rebuilt) the
-- run's state; nil once it has.
local function uninitialised()
  if redis.call('EXISTS', P .. 'initialised') == 0 then return {'uninitialised'} end
  return nil
end

-- Gives m a new lease with the next epoch and returns the claim reply.
local function take(m, owner, ttl, now, source)
  local k = tkey(m)
  local exp = now + ttl
  redis.call('HINCRBY', k, 'epoch', 1)
  redis.call('HSET', k, 'status', 'generating', 'owner', owner, 'exp', int(exp))
  redis.call('ZREM', P .. 'pending', m)
  redis.call('ZREM', P .. 'parked', m)
  redis.call('ZADD', P .. 'leases', int(exp), m)
  return {'ok', source, state_of(m), m}
end

-- Moves a fenced lease's expiry to `exp`.
local function extend(m, exp)
  redis.call('HSET', tkey(m), 'exp', int(exp))
  redis.call('ZADD', P .. 'leases', int(exp), m)
end

-- Ends a fenced lease now and queues m as `release` does: pending without committed segments,
-- parked with them. The lease record stays (its epoch is the fencing history). Returns the
-- status it went to.
local function release_lease(m, now)
  local k = tkey(m)
  redis.call('ZREM', P .. 'leases', m)
  redis.call('HSET', k, 'exp', int(now))
  local first = redis.call('HGET', k, 'first')
  if first then
    redis.call('HSET', k, 'status', 'parked')
    redis.call('ZADD', P .. 'parked', first, m)
    return 'parked'
  end
  redis.call('HSET', k, 'status', 'pending')
  redis.call('ZADD', P .. 'pending', redis.call('HGET', k, 'seq'), m)
  return 'pending'
end

-- Stops m for good: `dropped`, out of every queue, its lease (if any) ended.
local function stop(m, now)
  local k = tkey(m)
  redis.call('ZREM', P .. 'pending', m)
  redis.call('ZREM', P .. 'parked', m)
  redis.call('ZREM', P .. 'leases', m)
  local exp = tonumber(redis.call('HGET', k, 'exp') or '0')
  if exp > now then redis.call('HSET', k, 'exp', int(now)) end
  redis.call('HSET', k, 'status', 'dropped')
  redis.call('HINCRBY', P .. 'counts', 'dropped', 1)
end

-- Appends m's finished-stream entry (prompt id and sample given, as the member key's prompt
-- id may contain ':'); `gave_up` is nil for a scored trajectory, else {drop reason, detail}.
-- Returns the reply tail: stream id, tokens, first and last version ('' when none).
local function push_finished(m, prompt, sample, reward, gave_up)
  local h = redis.call('HMGET', tkey(m), 'tokens', 'first', 'last')
  local fields = {'prompt', prompt, 'sample', sample, 'reward', reward, 'tokens', h[1]}
  if h[2] then
    table.insert(fields, 'first'); table.insert(fields, h[2])
    table.insert(fields, 'last'); table.insert(fields, h[3])
  end
  if gave_up then
    table.insert(fields, 'gave_up'); table.insert(fields, gave_up[1])
    table.insert(fields, 'detail'); table.insert(fields, gave_up[2])
  end
  local id = redis.call('XADD', P .. 'finished', '*', unpack(fields))
  return {'ok', id, h[1], h[2] or '', h[3] or ''}
end
