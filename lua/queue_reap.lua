--[[
queue_reap: give the jobs of dead workers back. Jobs whose lease expired move from the
in-flight set to the delayed set, due now, with their crash count raised by one; the next
claim hands them out again (and the worker dead-letters a job that crashed too often).

KEYS[1]  {ns}:inflight:<queue>  ZSET
KEYS[2]  {ns}:delayed:<queue>   ZSET
KEYS[3]  {ns}:jobs              HASH
ARGV[1]  max jobs per call (bounds the script's run time)

A job whose bookkeeping entry is missing or unreadable still goes back to the delayed set:
the claim then drops it as an orphan rather than leaving it leased forever.

Returns the number of jobs given back. Safe to run from every worker at once.
]]
local limit = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
-- A script error does not undo the writes before it, so every value is parsed before the
-- first write for a job.
for _, id in ipairs(expired) do
  local meta = redis.call('HGET', KEYS[3], id)
  local a, d, c, k, e
  if meta then
    a, d, c, k, e = string.match(meta, '^(%d+) (%d+) (%d+) (%d+) (%d+)$')
  end
  redis.call('ZREM', KEYS[1], id)
  if a then
    redis.call('HSET', KEYS[3], id, a .. ' ' .. d .. ' ' .. (tonumber(c) + 1) .. ' ' .. k .. ' ' .. e)
  end
  redis.call('ZADD', KEYS[2], now, id)
end
return #expired
