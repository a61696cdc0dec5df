-- widen_budget. ARGV: prefix, version, tokens, leader token, the largest budget.
-- Replies {'ok', total, remaining}, or {'none'} when the version is not the current one.
local fenced = check_leader(tonumber(ARGV[4]), now_ms())
if fenced then return fenced end
local vk = P .. 'version'
local h = redis.call('HMGET', vk, 'current', 'total', 'remaining')
if not h[1] or tonumber(h[1]) ~= tonumber(ARGV[2]) then return {'none'} end
local cap = tonumber(ARGV[5])
local total = math.min(tonumber(h[2]) + tonumber(ARGV[3]), cap)
local remaining = math.min(tonumber(h[3]) + tonumber(ARGV[3]), total)
redis.call('HSET', vk, 'total', int(total), 'remaining', int(remaining))
return {'ok', int(total), int(remaining)}
