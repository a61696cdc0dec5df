-- heartbeat. ARGV: prefix, role, member id, ttl ms. Also prunes lapsed members.
local key = P .. 'members:' .. ARGV[2]
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
redis.call('ZADD', key, int(now + tonumber(ARGV[4])), ARGV[3])
return 1
