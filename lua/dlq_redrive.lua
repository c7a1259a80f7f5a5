--[[
dlq_redrive: take one entry out of the dead-letter queue and push its job back onto a
ready list, or (ARGV[3] == "purge") delete it for good.

KEYS[1]  {ns}:dead         LIST
KEYS[2]  {ns}:dead:jobs    HASH
KEYS[3]  {ns}:dead:count   HASH
KEYS[4]  {ns}:queue:<queue> LIST  the job's queue
ARGV[1]  the envelope, exactly as stored (LREM matches it byte for byte)
ARGV[2]  job id
ARGV[3]  "retry" or "purge"
ARGV[4]  queue name

The re-driven job starts afresh (new id, no attempts), as a producer's push would.
Returns 1, or 0 when the entry is no longer there (another operator got to it first).
]]
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
local text = redis.call('HGET', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
if tonumber(redis.call('HINCRBY', KEYS[3], ARGV[4], -1)) < 0 then
  redis.call('HSET', KEYS[3], ARGV[4], 0)
end
if ARGV[3] == 'retry' and text then
  redis.call('LPUSH', KEYS[4], text)
end
return 1
