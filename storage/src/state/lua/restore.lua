-- restore_prompt: registers a prompt as rebuilt from the object store (register.lua's layout).
-- ARGV: prefix, leader token, prompt id, prompt JSON, group size K, then per restored
-- trajectory: sample, epoch, tokens, first version, last version, segment count n, and n
-- segment-reference JSONs (seq 0, 1, …). A trajectory with segments is parked; one without is
-- pending. An ended lease owned by 'rebuild' keeps the epoch, so the next claim gets a higher
-- one.
local now = now_ms()
local fenced = check_leader(tonumber(ARGV[2]), now)
if fenced then return fenced end
local id, json, k = ARGV[3], ARGV[4], tonumber(ARGV[5])
local pk = P .. 'prompt:' .. id
if redis.call('EXISTS', pk) == 1 then return {'ok', 0} end
redis.call('SET', pk, json)
redis.call('HINCRBY', P .. 'counts', 'prompts', 1)
local base = redis.call('INCRBY', P .. 'regseq', k) - k
local parked = {}
local i = 6
while i <= #ARGV do
  local s, epoch, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 5])
  local m = s .. ':' .. id
  local t = tkey(m)
  if epoch ~= '0' then redis.call('HSET', t, 'owner', 'rebuild', 'epoch', epoch, 'exp', int(now)) end
  if n > 0 then
    for j = 1, n do redis.call('RPUSH', skey(m), ARGV[i + 5 + j]) end
    redis.call('HSET', t, 'status', 'parked', 'tokens', ARGV[i + 2], 'nseg', n,
      'first', ARGV[i + 3], 'last', ARGV[i + 4])
    redis.call('ZADD', P .. 'parked', ARGV[i + 3], m)
    parked[tonumber(s)] = true
  end
  i = i + 6 + n
end
for s = 0, k - 1 do
  local m = s .. ':' .. id
  local t = tkey(m)
  redis.call('HSET', t, 'seq', int(base + s), 'retention', 0)
  if redis.call('HEXISTS', t, 'epoch') == 0 then redis.call('HSET', t, 'epoch', 0) end
  if not parked[s] then
    redis.call('HSET', t, 'status', 'pending', 'tokens', 0, 'nseg', 0)
    redis.call('ZADD', P .. 'pending', int(base + s), m)
  end
end
return {'ok', 1}
