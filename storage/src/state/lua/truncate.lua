-- truncate. ARGV: prefix, member, owner, epoch, segments to keep.
local m, owner, epoch, keep = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local bad = fence(m, owner, epoch, now)
if bad then return bad end
local k = tkey(m)
if keep == 0 then
  redis.call('DEL', skey(m))
else
  redis.call('LTRIM', skey(m), 0, keep - 1)
end
local tokens, first, last = 0, nil, nil
for _, json in ipairs(redis.call('LRANGE', skey(m), 0, -1)) do
  local seg = cjson.decode(json)
  tokens = tokens + seg.tokens
  if not first then first = seg.version end
  last = seg.version
end
redis.call('HSET', k, 'nseg', redis.call('LLEN', skey(m)), 'tokens', int(tokens))
if first then
  redis.call('HSET', k, 'first', int(first), 'last', int(last))
else
  redis.call('HDEL', k, 'first', 'last')
end
return {'ok', state_of(m)}
