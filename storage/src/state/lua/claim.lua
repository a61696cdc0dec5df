-- claim (a specific trajectory). ARGV: prefix, member, owner, ttl ms.
local refused = uninitialised()
if refused then return refused end
local m, owner, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local h = redis.call('HMGET', tkey(m), 'status', 'owner', 'epoch', 'exp')
local status = h[1]
if not status then return {'err', 'unknown'} end
if status == 'pending' or status == 'parked' then return take(m, owner, ttl, now, status) end
if status == 'generating' then
  if tonumber(h[4]) <= now then return take(m, owner, ttl, now, 'expired') end
  return {'err', 'held', h[2], h[3], h[4]}
end
return {'err', 'done', status}
