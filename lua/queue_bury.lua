--[[
queue_bury: move an in-flight job to the dead-letter queue with its envelope.

KEYS[1]  {ns}:inflight:<queue>   ZSET
KEYS[2]  {ns}:jobs               HASH
KEYS[3]  {ns}:payloads           HASH
KEYS[4]  {ns}:dead               LIST   envelopes, newest on the left
KEYS[5]  {ns}:dead:jobs          HASH   job id -> the job text, byte for byte
KEYS[6]  {ns}:dead:count         HASH   queue -> entries in the DLQ
KEYS[7]  {ns}:dedup:<queue>:<id> STRING (optional)
ARGV[1]  job id
ARGV[2]  fencing token
ARGV[3]  envelope JSON (built by the worker)
ARGV[4]  queue name

The job text is copied server-side from KEYS[3], so even a job too large to hand to a
worker is kept whole. Nothing is trimmed here: the worker alerts on DLQ size instead.
Returns the DLQ length, or 0 when the lease was lost (nothing changes).
]]
local meta = redis.call('HGET', KEYS[2], ARGV[1])
if not meta or not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local d = string.match(meta, '^%d+ (%d+) ')
if d ~= ARGV[2] then
  return 0
end
local text = redis.call('HGET', KEYS[3], ARGV[1]) or ''
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], text)
redis.call('HINCRBY', KEYS[6], ARGV[4], 1)
if KEYS[7] then
  redis.call('DEL', KEYS[7])
end
return redis.call('LPUSH', KEYS[4], ARGV[3])
