-- open_version. ARGV: prefix, version, budget, retention limit sigma, leader token.
local v, budget, sigma = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local fenced = check_leader(tonumber(ARGV[5]), now_ms())
if fenced then return fenced end
local vk = P .. 'version'
local cur = redis.call('HGET', vk, 'current')
if cur and v <= tonumber(cur) then return {'err', 'not_newer', cur} end
redis.call('HSET', vk, 'current', ARGV[2], 'total', budget, 'remaining', budget)
local retained, purged = 0, {}
for _, m in ipairs(redis.call('ZRANGE', P .. 'parked', 0, -1)) do
  local r = redis.call('HINCRBY', tkey(m), 'retention', 1)
  if r > sigma then
    redis.call('HSET', tkey(m), 'status', 'purged')
    redis.call('ZREM', P .. 'parked', m)
    redis.call('HINCRBY', P .. 'counts', 'purged', 1)
    table.insert(purged, m)
  else
    retained = retained + 1
  end
end
return {'ok', retained, purged}
