--[[
queue_stats: one queue's depths in one round trip (for `settle stats` and the workers'
metrics gauges).

KEYS[1]  {ns}:queue:<queue>     LIST
KEYS[2]  {ns}:delayed:<queue>   ZSET
KEYS[3]  {ns}:inflight:<queue>  ZSET
KEYS[4]  {ns}:dead:count        HASH
ARGV[1]  queue name

Returns {ready, delayed, due, inflight, dead, oldest_ready_age_ms or -1, now_ms}. The oldest
ready job's age comes from its "enqueued_at_ms" field (added by `settle enqueue`; producers
may set it); -1 when the list is empty or the field is absent. Read-only.
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ready = redis.call('LLEN', KEYS[1])
local age = -1
if ready > 0 then
  local oldest = redis.call('LINDEX', KEYS[1], -1)
  local at = oldest and string.match(oldest, '"enqueued_at_ms"%s*:%s*(%d+)')
  if at then
    age = now - tonumber(at)
    if age < 0 then
      age = 0
    end
  end
end
local dead = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
if dead < 0 then
  dead = 0
end
return {ready, redis.call('ZCARD', KEYS[2]), redis.call('ZCOUNT', KEYS[2], '-inf', now),
        redis.call('ZCARD', KEYS[3]), dead, age, now}
