-- trajectory (read). ARGV: prefix, member. Reads the hash and the segment list atomically.
if redis.call('EXISTS', tkey(ARGV[2])) == 0 then return {} end
return state_of(ARGV[2])
