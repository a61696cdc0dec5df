-- reserve. ARGV: prefix, version, want. Returns the tokens granted.
local vk = P .. 'version'
local h = redis.call('HMGET', vk, 'current', 'remaining')
if not h[1] or tonumber(h[1]) ~= tonumber(ARGV[2]) then return 0 end
local granted = math.min(tonumber(ARGV[3]), tonumber(h[2]))
if granted > 0 then redis.call('HINCRBY', vk, 'remaining', int(-granted)) end
return granted
