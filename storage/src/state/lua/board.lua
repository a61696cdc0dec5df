-- The step board (state/board.rs documents the rules; memory.rs implements the same).
-- ARGV: prefix, op, then per op:
--   announce: step, manifest key, world size, leader token
--   get | finished: (none)
--   restore_finished: step, leader token
--   claim: step, trainer, ttl ms
--   renew: step, rank, epoch, trainer, ttl ms
--   complete: step, rank, epoch, trainer
--   finish: step
-- Keys: `board` hash (step, key, world, last, finished) and `board:ranks` hash
-- (`<r>:o` owner, `<r>:e` epoch, `<r>:x` expiry, `<r>:d` done).
local bk, rk = P .. 'board', P .. 'board:ranks'
local op = ARGV[2]
local now = now_ms()
local b = redis.call('HMGET', bk, 'step', 'key', 'world', 'last', 'finished')
local cur, world, finished = tonumber(b[1]), tonumber(b[3] or 0), tonumber(b[5])

if op == 'get' then
  if not b[1] then return {} end
  return {b[1], b[2], b[3]}
end
if op == 'finished' then return b[5] or '' end

if op == 'restore_finished' then
  local step, token = tonumber(ARGV[3]), tonumber(ARGV[4])
  local fenced = check_leader(token, now)
  if fenced then return fenced end
  if not finished or finished < step then redis.call('HSET', bk, 'finished', ARGV[3]) end
  return {'ok'}
end

if op == 'announce' then
  local step, key, w, token = tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6])
  local fenced = check_leader(token, now)
  if fenced then return fenced end
  if cur then
    if step == cur then
      if key == b[2] and tonumber(w) == world then return {'ok'} end
      return {'conflict', 'it was announced differently: manifest ' .. b[2] .. ', world size ' .. b[3]}
    end
    if step < cur then return {'conflict', 'step ' .. b[1] .. ' is already announced'} end
    if finished ~= cur then return {'conflict', 'step ' .. b[1] .. ' is still training'} end
  end
  redis.call('DEL', rk)
  redis.call('HSET', bk, 'step', ARGV[3], 'key', key, 'world', w)
  redis.call('HDEL', bk, 'last')
  return {'ok'}
end

if op == 'claim' then
  local step, trainer, ttl = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
  if cur ~= step or (finished and finished >= step) then return '' end
  local pick, best = nil, nil
  for r = 0, world - 1 do
    local d = redis.call('HGET', rk, r .. ':d')
    if not d then
      local e = tonumber(redis.call('HGET', rk, r .. ':e') or 0)
      if e == 0 then pick = r; break end
      local x = tonumber(redis.call('HGET', rk, r .. ':x'))
      if x <= now and (best == nil or x < best) then pick, best = r, x end
    end
  end
  if pick == nil then return '' end
  local e = redis.call('HINCRBY', rk, pick .. ':e', 1)
  redis.call('HSET', rk, pick .. ':o', trainer, pick .. ':x', int(now + ttl))
  return {int(pick), int(e)}
end

-- renew / complete: fence (step, rank, epoch, trainer).
local step, rank, epoch, trainer = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
if op == 'finish' then
  step = tonumber(ARGV[3])
  if finished and finished >= step then return {'ok'} end
  if cur ~= step then return {'conflict', 'it is not the announced step (' .. (b[1] or 'none') .. ')'} end
  local left = 0
  for r = 0, world - 1 do
    if not redis.call('HGET', rk, r .. ':d') then left = left + 1 end
  end
  if left > 0 then return {'conflict', left .. ' rank(s) are not completed'} end
  redis.call('HSET', bk, 'finished', ARGV[3])
  return {'ok'}
end
if cur ~= step or rank >= world then return {'notlive', b[1] or ''} end
local e = tonumber(redis.call('HGET', rk, rank .. ':e') or 0)
if e ~= epoch then return {'stale', int(e)} end
local owner = redis.call('HGET', rk, rank .. ':o')
if owner ~= trainer then return {'foreign', owner} end
local done = redis.call('HGET', rk, rank .. ':d')
local x = tonumber(redis.call('HGET', rk, rank .. ':x'))
if op == 'renew' then
  if done then return {'done'} end
  if x <= now then return {'expired', int(x)} end
  redis.call('HSET', rk, rank .. ':x', int(now + tonumber(ARGV[7])))
  return {'ok'}
end
-- complete
if done then
  return {'ok', (b[4] and tonumber(b[4]) == rank) and 1 or 0}
end
if x <= now then return {'expired', int(x)} end
redis.call('HSET', rk, rank .. ':d', 1, rank .. ':x', int(now))
for r = 0, world - 1 do
  if not redis.call('HGET', rk, r .. ':d') then return {'ok', 0} end
end
redis.call('HSET', bk, 'last', int(rank))
return {'ok', 1}
