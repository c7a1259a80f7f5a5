--[[
stock_due.lua - list reservations whose deadline has passed, for the reaper.

KEYS[1]   {ns}:resv:deadlines   ZSET  order_id scored by deadline_ms
ARGV[1]   limit: integer 1..10000

Returns an array of up to `limit` order ids whose deadline_ms <= now, earliest deadline
first, where now is the Redis server's clock (TIME) in ms, so every worker agrees on it
whatever its own clock says.
  error reply "ERR stock_due: ..." on malformed input

Idempotency: read-only. The reaper releases each order with stock_release.lua, which removes
it from the set.
]]

local LIMIT_MAX = 10000

local limit = nil
if type(ARGV[1]) == 'string' and string.match(ARGV[1], '^%d+$') then
    limit = tonumber(ARGV[1])
end
if limit == nil or limit < 1 or limit > LIMIT_MAX then
    return redis.error_reply('ERR stock_due: limit must be an integer 1..' .. LIMIT_MAX)
end
if #KEYS ~= 1 then
    return redis.error_reply('ERR stock_due: KEYS must hold exactly the deadline set')
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGE', KEYS[1], '-inf', string.format('%d', now_ms), 'BYSCORE', 'LIMIT',
                  0, limit)
