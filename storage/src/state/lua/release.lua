-- release. ARGV: prefix, member, owner, epoch.
local m, owner, epoch = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local bad = fence(m, owner, epoch, now)
if bad then return bad end
local k = tkey(m)
redis.call('ZREM', P .. 'leases', m)
-- The lease record stays (its epoch is the fencing history) but ends now.
redis.call('HSET', k, 'exp', int(now))
local first = redis.call('HGET', k, 'first')
if first then
  redis.call('HSET', k, 'status', 'parked')
  redis.call('ZADD', P .. 'parked', first, m)
  return {'ok', 'parked'}
end
redis.call('HSET', k, 'status', 'pending')
redis.call('ZADD', P .. 'pending', redis.call('HGET', k, 'seq'), m)
return {'ok', 'pending'}
