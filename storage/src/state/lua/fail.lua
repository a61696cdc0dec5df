-- record_failure. ARGV: prefix, member, owner, epoch, drop reason, detail, limit, prompt id,
-- sample. Replies {'released', status, failures} below the limit, else the give-up stream
-- entry as `finish` replies it.
local m, owner, epoch, limit = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[7])
local now = now_ms()
local bad = fence(m, owner, epoch, now)
if bad then return bad end
local failures = redis.call('HINCRBY', tkey(m), 'failures', 1)
if failures < limit then
  return {'released', release_lease(m, now), failures}
end
stop(m, now)
return push_finished(m, ARGV[8], ARGV[9], '0', {ARGV[5], ARGV[6]})
