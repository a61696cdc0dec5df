-- commit_segment. ARGV: prefix, member, owner, epoch, ttl ms, seq, segment JSON, tokens,
-- version.
local m, owner, epoch, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local seq, json, tokens, version = tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
local now = now_ms()
local bad = fence(m, owner, epoch, now)
if bad then return bad end
local k = tkey(m)
local n = tonumber(redis.call('HGET', k, 'nseg'))
if seq < n then
  -- A retried commit is accepted only if it is the same segment.
  if redis.call('LINDEX', skey(m), seq) ~= json then return {'err', 'conflict'} end
elseif seq > n then
  return {'err', 'gap', int(n)}
else
  redis.call('RPUSH', skey(m), json)
  redis.call('HINCRBY', k, 'nseg', 1)
  redis.call('HINCRBY', k, 'tokens', tokens)
  redis.call('HSETNX', k, 'first', version)
  redis.call('HSET', k, 'last', version)
end
extend(m, now + ttl)
return {'ok', state_of(m)}
