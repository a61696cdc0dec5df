-- claim_next. ARGV: prefix, owner, ttl ms.
local refused = uninitialised()
if refused then return refused end
local owner, ttl = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local m = redis.call('ZRANGE', P .. 'parked', 0, 0)[1]
if m then return take(m, owner, ttl, now, 'parked') end
m = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', int(now), 'LIMIT', 0, 1)[1]
if m then return take(m, owner, ttl, now, 'expired') end
m = redis.call('ZRANGE', P .. 'pending', 0, 0)[1]
if m then return take(m, owner, ttl, now, 'pending') end
return {'none'}
