--[[
stock_reserve.lua - reserve units of one or more SKUs for an order, all or nothing.

KEYS[1]      {ns}:resv:<order_id>    HASH  the reservation
KEYS[2]      {ns}:resv:deadlines     ZSET  order_id scored by deadline_ms
KEYS[2+i]    {ns}:stock:<sku_i>      units available (a missing key counts as 0), i = 1..n
ARGV[1]      order_id
ARGV[2]      deadline_ms: absolute epoch ms, integer >= 1
ARGV[3]      created_ms: epoch ms, integer >= 0
ARGV[2+2i]   sku_i: 1..64 bytes without '{' or '}', distinct within the call
ARGV[3+2i]   qty_i: integer 1..1000000
             (n = 1..64; KEYS[2+i] must be the stock key of sku_i)

Returns
  {"reserved"}                      every SKU had enough: each stock key was decreased by its
                                    qty, the hash was written (state reserved, deadline_ms,
                                    created_ms, "sku:<sku>" -> qty) and the order added to
                                    the deadline set
  {"exists", state}                 the order already has a reservation; nothing changed
  {"insufficient", sku, available}  the first SKU with too few units; nothing changed
  error reply "ERR stock_reserve: ..." on malformed input; nothing changed

Idempotency: a repeated call for the same order answers {"exists", state} and takes nothing,
so a retried or redelivered request never reserves twice. Every check runs before the first
write, so the script either does all of its writes or none.
]]

local ITEMS_MAX = 64
local QTY_MAX = 1000000
local SKU_MAX = 64

local function fail(msg)
    return redis.error_reply('ERR stock_reserve: ' .. msg)
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
local deadline_ms = int_in(ARGV[2], 1, 9007199254740991)
if deadline_ms == nil then
    return fail('deadline_ms must be an integer >= 1')
end
local created_ms = int_in(ARGV[3], 0, 9007199254740991)
if created_ms == nil then
    return fail('created_ms must be an integer >= 0')
end

local n = #KEYS - 2
if n < 1 or n > ITEMS_MAX then
    return fail('between 1 and ' .. ITEMS_MAX .. ' items required')
end
if #ARGV ~= 3 + 2 * n then
    return fail('ARGV must hold order_id, deadline_ms, created_ms and a sku/qty pair per stock key')
end

local skus, qtys, seen = {}, {}, {}
for i = 1, n do
    local sku = ARGV[2 + 2 * i]
    local qty = int_in(ARGV[3 + 2 * i], 1, QTY_MAX)
    if not valid_sku(sku) then
        return fail('item ' .. i .. ': sku must be 1..' .. SKU_MAX .. ' bytes without braces')
    end
    if qty == nil then
        return fail('item ' .. i .. ': qty must be an integer 1..' .. QTY_MAX)
    end
    if seen[sku] then
        return fail('duplicate sku ' .. sku)
    end
    if not ends_with(KEYS[2 + i], ':stock:' .. sku) then
        return fail('KEYS[' .. (2 + i) .. '] is not the stock key of sku ' .. sku)
    end
    seen[sku] = true
    skus[i] = sku
    qtys[i] = qty
end

-- Idempotency: an order reserves at most once, whatever state its reservation is in now.
if redis.call('EXISTS', KEYS[1]) == 1 then
    local state = redis.call('HGET', KEYS[1], 'state')
    return {'exists', state or 'unknown'}
end

-- Check every SKU before taking anything (all or nothing).
for i = 1, n do
    local raw = redis.call('GET', KEYS[2 + i])
    local available = 0
    if raw then
        available = int_in(raw, -9007199254740991, 9007199254740991)
        if available == nil then
            return fail('stock of sku ' .. skus[i] .. ' is not an integer')
        end
    end
    if available < qtys[i] then
        return {'insufficient', skus[i], available}
    end
end

local fields = {'state', 'reserved',
                'deadline_ms', string.format('%d', deadline_ms),
                'created_ms', string.format('%d', created_ms)}
for i = 1, n do
    redis.call('DECRBY', KEYS[2 + i], qtys[i])
    fields[#fields + 1] = 'sku:' .. skus[i]
    fields[#fields + 1] = string.format('%d', qtys[i])
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], string.format('%d', deadline_ms), order_id)
return {'reserved'}
