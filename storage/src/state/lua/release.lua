-- release. ARGV: prefix, member, owner, epoch.
local m, owner, epoch = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local bad = fence(m, owner, epoch, now)
if bad then return bad end
return {'ok', release_lease(m, now)}
