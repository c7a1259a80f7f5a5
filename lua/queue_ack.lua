--[[
queue_ack: a job finished (its outcome is durable in PostgreSQL); forget it.

KEYS[1]  {ns}:inflight:<queue>  ZSET
KEYS[2]  {ns}:jobs              HASH
KEYS[3]  {ns}:payloads          HASH
KEYS[4]  {ns}:dedup:<queue>:<id> STRING (optional) the producer id's dedup marker
ARGV[1]  job id
ARGV[2]  fencing token (the deliveries count the worker was handed)

Returns 1 when acknowledged, 0 when the lease was lost (the job was handed to another
delivery, or is already gone): nothing changes then.
]]
local meta = redis.call('HGET', KEYS[2], ARGV[1])
if not meta or not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local d = string.match(meta, '^%d+ (%d+) ')
if d ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if KEYS[4] then
  redis.call('DEL', KEYS[4])
end
return 1
