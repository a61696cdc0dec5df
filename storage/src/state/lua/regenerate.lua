-- regenerate (a purged trajectory, from scratch). ARGV: prefix, member, leader token.
-- The lease record (owner, epoch) stays so the next claim gets a higher epoch and writers of
-- the purged generation stay fenced out.
local m = ARGV[2]
local fenced = check_leader(tonumber(ARGV[3]), now_ms())
if fenced then return fenced end
local k = tkey(m)
local status = redis.call('HGET', k, 'status')
if not status then return {'err', 'unknown'} end
if status ~= 'purged' then return {'err', 'not_purged', status} end
redis.call('DEL', skey(m))
redis.call('HDEL', k, 'first', 'last', 'reward')
redis.call('HSET', k, 'status', 'pending', 'tokens', 0, 'nseg', 0, 'retention', 0)
redis.call('ZADD', P .. 'pending', redis.call('HGET', k, 'seq'), m)
redis.call('HINCRBY', P .. 'counts', 'purged', -1)
return {'ok'}
