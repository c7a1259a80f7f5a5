--[[
queue_enqueue: push one job onto a queue, optionally deduplicated by the producer's id.

KEYS[1]  {ns}:queue:<queue>              LIST, producers' end is the left (LPUSH)
KEYS[2]  {ns}:dedup:<queue>:<id>         STRING (optional): present while a job with this
                                         id is queued, delayed or in flight
ARGV[1]  job text (JSON, stored byte for byte)
ARGV[2]  dedup lifetime in ms (used with KEYS[2]; a safety net, the worker deletes the key
         when the job finishes)

Returns 1 when the job was pushed, 0 when a job with the same id is still live (nothing
changes). Idempotent for a given id while that job is live.
]]
if #KEYS >= 2 then
  local ttl = tonumber(ARGV[2])
  if not ttl or ttl <= 0 then
    return redis.error_reply('ERR dedup lifetime must be a positive number of ms')
  end
  if not redis.call('SET', KEYS[2], 'queued', 'NX', 'PX', ttl) then
    return 0
  end
end
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
