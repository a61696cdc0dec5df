-- live_members. ARGV: prefix, role. Members whose expiry is after now, with their expiry.
local now = now_ms()
return redis.call('ZRANGEBYSCORE', P .. 'members:' .. ARGV[2], '(' .. int(now), '+inf',
  'WITHSCORES')
