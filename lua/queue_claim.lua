--[[
queue_claim: atomically hand up to N jobs to a worker under a lease.

Due jobs of the delayed set (retries, re-checks, redeliveries after a crash) come first,
then new jobs from the right (oldest) end of the ready list, so the list is FIFO. A job
never exists only in a worker's memory: it moves from the list or the delayed set into the
in-flight set within this script.

KEYS[1]  {ns}:queue:<queue>     LIST   ready jobs (raw producer JSON)
KEYS[2]  {ns}:delayed:<queue>   ZSET   job id -> due time (ms, Redis clock)
KEYS[3]  {ns}:inflight:<queue>  ZSET   job id -> lease expiry (ms, Redis clock)
KEYS[4]  {ns}:jobs              HASH   job id -> "attempts deliveries crashes checks enqueued_ms"
KEYS[5]  {ns}:payloads          HASH   job id -> job text
KEYS[6]  {ns}:seq               STRING id sequence
ARGV[1]  max jobs to claim (1..1000)
ARGV[2]  lease length in ms
ARGV[3]  max job size in bytes: a longer job text is returned cut to ARGV[3]+1 bytes (the
         worker only needs to see that it is too long; the full text stays in Redis)

Returns {now_ms, next_due_in_ms or -1, then 8 fields per job:
         id, text, text_bytes, attempts, deliveries, crashes, checks, enqueued_ms}.
deliveries is also the job's fencing token: it grows by one on every claim, and ack,
retry and bury refuse a token that is not the current one.
New job ids are "<seconds>.<milliseconds>-<seq>" (Redis time), unique even if the
sequence were reset; the dot keeps the id from looking like a card number to log masking.
]]
local max = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[3])
if not max or max < 1 or max > 1000 or not lease or lease < 1 or not max_bytes then
  return redis.error_reply('ERR bad claim arguments')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now, -1}
local n = 0

local function emit(id, text, attempts, deliveries, crashes, checks, enqueued)
  local len = string.len(text)
  if len > max_bytes then
    text = string.sub(text, 1, max_bytes + 1)
  end
  out[#out + 1] = id
  out[#out + 1] = text
  out[#out + 1] = len
  out[#out + 1] = attempts
  out[#out + 1] = deliveries
  out[#out + 1] = crashes
  out[#out + 1] = checks
  out[#out + 1] = enqueued
  n = n + 1
end

local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, max)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[2], id)
  local meta = redis.call('HGET', KEYS[4], id)
  local text = redis.call('HGET', KEYS[5], id)
  if meta and text then
    local a, d, c, k, e = string.match(meta, '^(%d+) (%d+) (%d+) (%d+) (%d+)$')
    if a then
      d = tonumber(d) + 1
      redis.call('HSET', KEYS[4], id, a .. ' ' .. d .. ' ' .. c .. ' ' .. k .. ' ' .. e)
      redis.call('ZADD', KEYS[3], now + lease, id)
      emit(id, text, tonumber(a), d, tonumber(c), tonumber(k), tonumber(e))
    end
  end
end

while n < max do
  local text = redis.call('RPOP', KEYS[1])
  if not text then
    break
  end
  local id = t[1] .. '.' .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)) .. '-' ..
    redis.call('INCR', KEYS[6])
  redis.call('HSET', KEYS[4], id, '0 1 0 0 ' .. now)
  redis.call('HSET', KEYS[5], id, text)
  redis.call('ZADD', KEYS[3], now + lease, id)
  emit(id, text, 0, 1, 0, 0, now)
end

local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if nxt[2] then
  local d = tonumber(nxt[2]) - now
  if d < 0 then
    d = 0
  end
  out[2] = d
end
return out
