--[[
queue_extend: renew the leases of jobs a live worker is still working on (heartbeat).

KEYS[1]  {ns}:inflight:<queue>  ZSET
KEYS[2]  {ns}:jobs              HASH
KEYS[3]  {ns}:workers           ZSET   worker id -> last heartbeat (ms)
ARGV[1]  lease length in ms
ARGV[2]  worker id
ARGV[3], ARGV[4], ...  pairs of job id and fencing token

Returns the ids whose lease was already lost (reaped and possibly handed to another
delivery); the worker must not ack or retry those.
]]
local lease = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[3], now, ARGV[2])
local lost = {}
for i = 3, #ARGV, 2 do
  local id, fence = ARGV[i], ARGV[i + 1]
  local meta = redis.call('HGET', KEYS[2], id)
  local d = meta and string.match(meta, '^%d+ (%d+) ')
  if d == fence and redis.call('ZSCORE', KEYS[1], id) then
    redis.call('ZADD', KEYS[1], 'XX', now + lease, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
