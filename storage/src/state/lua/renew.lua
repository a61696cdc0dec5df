-- renew. ARGV: prefix, member, owner, epoch, ttl ms.
local m, owner, epoch, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local bad = fence(m, owner, epoch, now)
if bad then return bad end
extend(m, now + ttl)
return {'ok', int(now + ttl)}
