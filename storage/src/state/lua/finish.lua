-- finish. ARGV: prefix, member, owner, epoch, reward (decimal string), prompt id, sample.
local m, owner, epoch, reward = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local now = now_ms()
local bad = fence(m, owner, epoch, now)
if bad then return bad end
redis.call('ZREM', P .. 'leases', m)
redis.call('HSET', tkey(m), 'status', 'finished', 'reward', reward, 'exp', int(now))
redis.call('HINCRBY', P .. 'counts', 'finished', 1)
return push_finished(m, ARGV[6], ARGV[7], reward, nil)
