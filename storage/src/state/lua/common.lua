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
