-- refund. ARGV: prefix, version, tokens. Returns the tokens credited (capped at the total).
local vk = P .. 'version'
local h = redis.call('HMGET', vk, 'current', 'total', 'remaining')
if not h[1] or tonumber(h[1]) ~= tonumber(ARGV[2]) then return 0 end
local credited = math.min(tonumber(ARGV[3]), tonumber(h[2]) - tonumber(h[3]))
if credited > 0 then redis.call('HINCRBY', vk, 'remaining', int(credited)) end
return credited
