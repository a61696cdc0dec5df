-- trim_finished. ARGV: prefix, the first stream id to keep, leader token. Replies {'ok', the
-- number of entries deleted}.
local fenced = check_leader(tonumber(ARGV[3]), now_ms())
if fenced then return fenced end
return {'ok', redis.call('XTRIM', P .. 'finished', 'MINID', ARGV[2])}
