--[[
stock_commit.lua - turn an order's reservation into a sale once its payment succeeded.

KEYS[1]      {ns}:resv:<order_id>    HASH  the reservation
KEYS[2]      {ns}:resv:deadlines     ZSET  order_id scored by deadline_ms
KEYS[2+i]    {ns}:stock:<sku_i>      units available (a missing key counts as 0), i = 1..n
ARGV[1]      order_id
ARGV[2i]     sku_i: 1..64 bytes without '{' or '}', distinct within the call
ARGV[2i+1]   qty_i: integer 1..1000000
             (the order's items; n = 0..64, but at least 1 when the units must be taken
             again; KEYS[2+i] must be the stock key of sku_i)

Returns (by the reservation's state when called)
  "committed"          reserved: state committed, order removed from the deadline set
  "already_committed"  committed already; nothing changed
  "out_of_stock"       out_of_stock already (sticky: never retried); nothing changed
  "retaken"            released or missing, and every SKU had enough units: each stock key
                       decreased by its qty, hash rewritten as committed with the items and
                       retaken=1
  "out_of_stock"       released or missing, and some SKU had too few units: nothing taken,
                       hash written as out_of_stock with the items
  error reply "ERR stock_commit: ..." on malformed input or an unknown state; nothing changed

Idempotency: committed stays committed and out_of_stock stays out_of_stock, so a redelivered
job gets the answer it got the first time and units are never taken twice. Every check runs
before the first write.
]]

local ITEMS_MAX = 64
local QTY_MAX = 1000000
local SKU_MAX = 64

local function fail(msg)
    return redis.error_reply('ERR stock_commit: ' .. msg)
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
if #ARGV ~= 1 + 2 * n then
    return fail('ARGV must hold order_id and a sku/qty pair per stock key')
end

local skus, qtys, seen = {}, {}, {}
for i = 1, n do
    local sku = ARGV[2 * i]
    local qty = int_in(ARGV[2 * i + 1], 1, QTY_MAX)
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

local state = redis.call('HGET', KEYS[1], 'state')
if state == 'reserved' then
    redis.call('HSET', KEYS[1], 'state', 'committed')
    redis.call('ZREM', KEYS[2], order_id)
    return 'committed'
elseif state == 'committed' then
    return 'already_committed'
elseif state == 'out_of_stock' then
    return 'out_of_stock'
elseif state ~= 'released' and state then
    return fail('reservation has unknown state ' .. tostring(state))
end

-- Released (by the reaper, after its deadline) or never reserved: take the units again if
-- every SKU has enough, else record out_of_stock for good.
if n == 0 then
    return fail('the reservation is gone and no items were given to take again')
end
local enough = true
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
        enough = false
    end
end

-- Rewrite the hash so its items are exactly the ones this decision was made on; keep the
-- original timestamps when there was a reservation before.
local old = redis.call('HMGET', KEYS[1], 'deadline_ms', 'created_ms')
local fields = {'state', enough and 'committed' or 'out_of_stock'}
if enough then
    fields[#fields + 1] = 'retaken'
    fields[#fields + 1] = '1'
end
if old[1] then
    fields[#fields + 1] = 'deadline_ms'
    fields[#fields + 1] = old[1]
end
if old[2] then
    fields[#fields + 1] = 'created_ms'
    fields[#fields + 1] = old[2]
end
for i = 1, n do
    if enough then
        redis.call('DECRBY', KEYS[2 + i], qtys[i])
    end
    fields[#fields + 1] = 'sku:' .. skus[i]
    fields[#fields + 1] = string.format('%d', qtys[i])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZREM', KEYS[2], order_id)
if enough then
    return 'retaken'
end
return 'out_of_stock'
