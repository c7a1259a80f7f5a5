--[[
queue_retry: put an in-flight job into the delayed set to run again later (durable retry).

KEYS[1]  {ns}:inflight:<queue>  ZSET
KEYS[2]  {ns}:delayed:<queue>   ZSET
KEYS[3]  {ns}:jobs              HASH
ARGV[1]  job id
ARGV[2]  fencing token
ARGV[3]  delay in ms (due = Redis now + delay)
ARGV[4]  1 when this retry consumes a failure attempt, else 0
ARGV[5]  1 when this is a scheduled re-check (counts checks), else 0

Returns 1, or 0 when the lease was lost (nothing changes).
]]
local meta = redis.call('HGET', KEYS[3], ARGV[1])
if not meta or not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local a, d, c, k, e = string.match(meta, '^(%d+) (%d+) (%d+) (%d+) (%d+)$')
if not a or d ~= ARGV[2] then
  return 0
end
local delay = tonumber(ARGV[3])
if not delay or delay < 0 then
  return redis.error_reply('ERR bad delay')
end
a = tonumber(a) + tonumber(ARGV[4])
k = tonumber(k) + tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], a .. ' ' .. d .. ' ' .. c .. ' ' .. k .. ' ' .. e)
redis.call('ZADD', KEYS[2], now + delay, ARGV[1])
return 1
