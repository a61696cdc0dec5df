-- counts. ARGV: prefix.
local now = now_ms()
local c = redis.call('HMGET', P .. 'counts', 'prompts', 'finished', 'purged', 'dropped')
return {
  tonumber(c[1] or 0),
  redis.call('ZCARD', P .. 'pending'),
  redis.call('ZCARD', P .. 'leases'),
  redis.call('ZCOUNT', P .. 'leases', '-inf', int(now)),
  redis.call('ZCARD', P .. 'parked'),
  tonumber(c[2] or 0),
  tonumber(c[3] or 0),
  tonumber(c[4] or 0),
}
