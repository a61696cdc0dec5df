-- register_prompt. ARGV: prefix, prompt id, prompt JSON, group size K.
local refused = uninitialised()
if refused then return refused end
local id, json, k = ARGV[2], ARGV[3], tonumber(ARGV[4])
local pk = P .. 'prompt:' .. id
if redis.call('EXISTS', pk) == 1 then return 0 end
redis.call('SET', pk, json)
redis.call('HINCRBY', P .. 'counts', 'prompts', 1)
-- Registration order: a run-wide sequence, one number per trajectory.
local base = redis.call('INCRBY', P .. 'regseq', k) - k
for s = 0, k - 1 do
  local m = s .. ':' .. id
  redis.call('HSET', tkey(m), 'status', 'pending', 'seq', int(base + s), 'tokens', 0,
    'nseg', 0, 'retention', 0, 'epoch', 0)
  redis.call('ZADD', P .. 'pending', int(base + s), m)
end
return 1
