-- The leader lock. ARGV: prefix, op (acquire | renew | release | get | raise), candidate, token
-- (for raise: the floor), ttl ms.
-- The hash keeps `token` (the last one handed out) across holders, so tokens only grow.
local lk = P .. 'leader'
local op, cand, token, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local h = redis.call('HMGET', lk, 'holder', 'token', 'exp')
local live = h[1] and tonumber(h[3]) > now
local current = {}
if live then current = {h[1], h[2], h[3]} end
if op == 'get' then return {'ok', current} end
if op == 'raise' then
  if tonumber(h[2] or 0) < token then redis.call('HSET', lk, 'token', int(token)) end
  return {'ok', current}
end
if op == 'acquire' then
  if live then return {'held', current} end
  local t = redis.call('HINCRBY', lk, 'token', 1)
  redis.call('HSET', lk, 'holder', cand, 'exp', int(now + ttl))
  return {'ok', {cand, int(t), int(now + ttl)}}
end
local mine = h[1] == cand and tonumber(h[2]) == token
if op == 'renew' then
  if not (live and mine) then return {'err', current} end
  redis.call('HSET', lk, 'exp', int(now + ttl))
  return {'ok', {cand, h[2], int(now + ttl)}}
end
-- release
if not mine then return {'err', current} end
redis.call('HDEL', lk, 'holder', 'exp')
return {'ok', {}}
