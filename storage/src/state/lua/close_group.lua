-- close_group. ARGV: prefix, prompt id, leader token. Replies {'ok', members stopped}.
local id = ARGV[2]
local now = now_ms()
local fenced = check_leader(tonumber(ARGV[3]), now)
if fenced then return fenced end
local json = redis.call('GET', P .. 'prompt:' .. id)
if not json then return {'ok', {}} end
local stopped = {}
for s = 0, cjson.decode(json).group_size - 1 do
  local m = s .. ':' .. id
  local status = redis.call('HGET', tkey(m), 'status')
  -- A purged trajectory is already stopped (and counted as purged).
  if status == 'pending' or status == 'generating' or status == 'parked' then
    stop(m, now)
    table.insert(stopped, m)
  end
end
return {'ok', stopped}
