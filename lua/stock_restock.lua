--[[
stock_restock.lua - put a refunded order's units back on the shelf, once.

KEYS[1]      {ns}:resv:<order_id>    HASH  the reservation
KEYS[1+i]    {ns}:stock:<sku_i>      units available, i = 1..n
ARGV[1]      order_id
ARGV[2]      refund id (the refund's Idempotency-Key, 1..128 bytes)
ARGV[1+2i]   sku_i: 1..64 bytes without '{' or '}', distinct; KEYS[1+i] is its stock key
ARGV[2+2i]   qty_i: integer 1..1000000 (the order's items; n = 1..64)

Returns
  "already_restocked"  the hash has field "restocked:<refund id>" (this refund restocked
                       already), or field "restocked_by" (another refund of the order did:
                       an order's units go back at most once); nothing changed
  "missing"            no reservation for this order (Redis never took its units); nothing
                       changed
  "not_committed"      the reservation is not committed (reserved, released, out_of_stock):
                       its units never left the shelf for good, so there is nothing to put
                       back; nothing changed
  "restocked"          committed: each stock key increased by its qty, and the hash got
                       "restocked:<refund id>" = 1 and "restocked_by" = <refund id>
                       (state stays committed, so commit and release answer as before)
  error reply "ERR stock_restock: ..." on malformed input; nothing changed

Idempotency: the markers are written in the same atomic step as the increments, so a
redelivered refund answers "already_restocked" and never adds units twice. Every check runs
before the first write.
]]

local ITEMS_MAX = 64
local QTY_MAX = 1000000
local SKU_MAX = 64
local ID_MAX = 128

local function fail(msg)
    return redis.error_reply('ERR stock_restock: ' .. msg)
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
local refund_id = ARGV[2]
if type(order_id) ~= 'string' or #order_id == 0 then
    return fail('order_id missing')
end
if type(refund_id) ~= 'string' or #refund_id == 0 or #refund_id > ID_MAX then
    return fail('refund id must be 1..' .. ID_MAX .. ' bytes')
end
if not ends_with(KEYS[1], ':resv:' .. order_id) then
    return fail('KEYS[1] must be the reservation key of the order')
end

local n = #KEYS - 1
if n < 1 or n > ITEMS_MAX then
    return fail('between 1 and ' .. ITEMS_MAX .. ' items')
end
if #ARGV ~= 2 + 2 * n then
    return fail('ARGV must hold order_id, refund id and a sku/qty pair per stock key')
end

local qtys, seen = {}, {}
for i = 1, n do
    local sku = ARGV[1 + 2 * i]
    local qty = int_in(ARGV[2 + 2 * i], 1, QTY_MAX)
    if not valid_sku(sku) then
        return fail('item ' .. i .. ': sku must be 1..' .. SKU_MAX .. ' bytes without braces')
    end
    if qty == nil then
        return fail('item ' .. i .. ': qty must be an integer 1..' .. QTY_MAX)
    end
    if seen[sku] then
        return fail('duplicate sku ' .. sku)
    end
    if not ends_with(KEYS[1 + i], ':stock:' .. sku) then
        return fail('KEYS[' .. (1 + i) .. '] is not the stock key of sku ' .. sku)
    end
    seen[sku] = true
    qtys[i] = qty
end

if redis.call('HEXISTS', KEYS[1], 'restocked:' .. refund_id) == 1 then
    return 'already_restocked'
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
    return 'missing'
end
if state ~= 'committed' then
    return 'not_committed'
end
if redis.call('HEXISTS', KEYS[1], 'restocked_by') == 1 then
    return 'already_restocked'
end

for i = 1, n do
    redis.call('INCRBY', KEYS[1 + i], qtys[i])
end
redis.call('HSET', KEYS[1], 'restocked:' .. refund_id, '1', 'restocked_by', refund_id)
return 'restocked'
