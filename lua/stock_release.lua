--[[
stock_release.lua - give an order's reserved units back (payment failed, order cancelled, or
the reservation's deadline passed).

KEYS[1]      {ns}:resv:<order_id>    HASH  the reservation
KEYS[2]      {ns}:resv:deadlines     ZSET  order_id scored by deadline_ms
KEYS[2+i]    {ns}:stock:<sku_i>      units available, i = 1..n
ARGV[1]      order_id
ARGV[1+i]    sku_i: 1..64 bytes without '{' or '}', distinct; KEYS[2+i] is its stock key
             (n = 0..64; the list must name every SKU the reservation holds)

Returns (by the reservation's state when called)
  "released"          reserved: each item's qty (as recorded in the hash) added back to its
                      stock key, state released
  "already_released"  released or out_of_stock; nothing to give back
  "not_reserved"      committed: refused, the units were sold
  "missing"           no reservation for this order
  error reply "ERR stock_release: ..." on malformed input, an unknown state, or when the
                      reservation holds a SKU not named in ARGV (so units are never leaked);
                      nothing changed
In every non-error case the order is removed from the deadline set, so a stale entry can
never make the reaper pick the same order again and again.

Idempotency: only the reserved state gives units back and it leaves the state released, so
a repeated call answers "already_released" and returns nothing twice. Every check runs before
the first write.
]]

local ITEMS_MAX = 64
local QTY_MAX = 1000000
local SKU_MAX = 64

local function fail(msg)
    return redis.error_reply('ERR stock_release: ' .. msg)
end

-- A decimal integer in [lo, hi], or nil.
local function int_in(s, lo, hi)
    if type(s) ~= 'string' or not string.match(s, '^%-?%d+$') then
        return nil
    end
    local n = tonumber(s)
    if n == nil or n < lo or n > hi then
        return nil
    end
    return n
end

local function ends_with(s, suffix)
    return #s >= #suffix and string.sub(s, -#suffix) == suffix
end

local function valid_sku(s)
    return type(s) == 'string' and #s >= 1 and #s <= SKU_MAX and not string.find(s, '[{}]')
end

local order_id = ARGV[1]
if type(order_id) ~= 'string' or #order_id == 0 then
    return fail('order_id missing')
end
if KEYS[1] == KEYS[2] or not ends_with(KEYS[1], ':resv:' .. order_id)
    or not ends_with(KEYS[2], ':resv:deadlines') then
    return fail('KEYS[1..2] must be the reservation and deadline keys of the order')
end

local n = #KEYS - 2
if n < 0 or n > ITEMS_MAX then
    return fail('at most ' .. ITEMS_MAX .. ' items')
end
if #ARGV ~= 1 + n then
    return fail('ARGV must hold order_id and one sku per stock key')
end

local key_of = {}
for i = 1, n do
    local sku = ARGV[1 + i]
    if not valid_sku(sku) then
        return fail('item ' .. i .. ': sku must be 1..' .. SKU_MAX .. ' bytes without braces')
    end
    if key_of[sku] then
        return fail('duplicate sku ' .. sku)
    end
    if not ends_with(KEYS[2 + i], ':stock:' .. sku) then
        return fail('KEYS[' .. (2 + i) .. '] is not the stock key of sku ' .. sku)
    end
    key_of[sku] = KEYS[2 + i]
end

local state = redis.call('HGET', KEYS[1], 'state')
if not state then
    redis.call('ZREM', KEYS[2], order_id)
    return 'missing'
elseif state == 'released' or state == 'out_of_stock' then
    redis.call('ZREM', KEYS[2], order_id)
    return 'already_released'
elseif state == 'committed' then
    redis.call('ZREM', KEYS[2], order_id)
    return 'not_reserved'
elseif state ~= 'reserved' then
    return fail('reservation has unknown state ' .. tostring(state))
end

-- Collect and check every item of the reservation before giving anything back.
local flat = redis.call('HGETALL', KEYS[1])
local back_keys, back_qtys = {}, {}
for j = 1, #flat, 2 do
    local field = flat[j]
    if string.sub(field, 1, 4) == 'sku:' then
        local sku = string.sub(field, 5)
        local qty = int_in(flat[j + 1], 1, QTY_MAX)
        if qty == nil then
            return fail('reservation field ' .. field .. ' is not a qty 1..' .. QTY_MAX)
        end
        if not key_of[sku] then
            return fail('reservation holds sku ' .. sku .. ' which was not given')
        end
        back_keys[#back_keys + 1] = key_of[sku]
        back_qtys[#back_qtys + 1] = qty
    end
end

for i = 1, #back_keys do
    redis.call('INCRBY', back_keys[i], back_qtys[i])
end
redis.call('HSET', KEYS[1], 'state', 'released')
redis.call('ZREM', KEYS[2], order_id)
return 'released'
