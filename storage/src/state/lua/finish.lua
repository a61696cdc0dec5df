-- finish. ARGV: prefix, member, owner, epoch, reward (decimal string), prompt id, sample.
local m, owner, epoch, reward = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local now = now_ms()
local bad = fence(m, owner, epoch, now)
if bad then return bad end
local k = tkey(m)
redis.call('ZREM', P .. 'leases', m)
redis.call('HSET', k, 'status', 'finished', 'reward', reward, 'exp', int(now))
redis.call('HINCRBY', P .. 'counts', 'finished', 1)
local h = redis.call('HMGET', k, 'tokens', 'first', 'last')
local fields = {'prompt', ARGV[6], 'sample', ARGV[7], 'reward', reward, 'tokens', h[1]}
if h[2] then
  table.insert(fields, 'first'); table.insert(fields, h[2])
  table.insert(fields, 'last'); table.insert(fields, h[3])
end
local id = redis.call('XADD', P .. 'finished', '*', unpack(fields))
return {'ok', id, h[1], h[2] or '', h[3] or ''}
