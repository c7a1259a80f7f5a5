--[[
stock_sync.lua - compare a batch of SKUs' available units with PostgreSQL and repair them, in
one atomic step (the nightly stock sync, src/tasks.c).

The truth is PostgreSQL: available = on_hand - units of reservations in state reserved
                                             - units of sales committed in Redis that
                                               PostgreSQL has not applied yet
(the worker commits a reservation in Redis before it writes COMPLETED and stock -= qty in
PostgreSQL, so for a moment, or for an outage, those units are gone from Redis but still on
hand in PostgreSQL).

KEYS[1]          {ns}:resv:deadlines     ZSET  every reservation in state reserved
KEYS[1+i]        {ns}:stock:<sku_i>      units available, i = 1..n
KEYS[1+n+j]      {ns}:resv:<order_j>     HASH  reservations that may hold these SKUs, j = 1..m
ARGV[1]          n (1..10000)
ARGV[2]          m (0..)
ARGV[3]          "1" = dry run (compare only), "0" = repair
ARGV[3+i]        sku_i
ARGV[3+n+i]      on_hand_i: PostgreSQL products.stock, integer >= 0
ARGV[3+2n+j]     order_j
ARGV[3+2n+m+j]   "1" when order_j is PENDING or MANUAL_REVIEW in PostgreSQL (a committed
                 reservation of it is a sale PostgreSQL has not applied), else "0"
ARGV[4+2n+2m..]  every other order id the caller read from the deadline set (their
                 reservations hold none of these SKUs)

Returns
  {"changed", order_id}  the deadline set holds a reservation the caller did not read (one
                         was made since): nothing compared or written; read again and retry
  {"ok", sku_1, before_1, reserved_1, unapplied_1, target_1, changed_1, clamped_1, ...}
                         per SKU: before = the stored value ("" when the key is missing, the
                         raw text when it is not an integer), target = on_hand - reserved -
                         unapplied (0 when that is negative: clamped = "1"), changed = "1"
                         when before differs from target; unless a dry run, each changed key
                         was SET to target
  error reply "ERR stock_sync: ..." on malformed input; nothing changed

Why this is safe against live traffic: a reservation's SKU set never changes after it is made
and every reservation in state reserved is in the deadline set (stock_reserve.lua adds it,
commit and release remove it, atomically). So checking that the deadline set holds no order
the caller did not read, and reading the state of every reservation that can hold these SKUs,
inside this one script, sees exactly the reservations that exist when the SETs happen; a
reservation, commit or release landing before or after the script is either counted or not yet
there, never half.
Idempotency: running it twice sets the same values (the second run finds nothing to change).
]]

local N_MAX = 10000
local QTY_MAX = 1000000

local function fail(msg)
    return redis.error_reply('ERR stock_sync: ' .. msg)
end

local function int_in(s, lo, hi)
    if type(s) ~= 'string' or not string.match(s, '^%-?%d+$') then
        return nil
    end
    local v = tonumber(s)
    if v == nil or v < lo or v > hi then
        return nil
    end
    return v
end

local function ends_with(s, suffix)
    return #s >= #suffix and string.sub(s, -#suffix) == suffix
end

local n = int_in(ARGV[1], 1, N_MAX)
local m = int_in(ARGV[2], 0, 10000000)
if n == nil or m == nil then
    return fail('n must be 1..' .. N_MAX .. ' and m >= 0')
end
if #KEYS ~= 1 + n + m or #ARGV < 3 + 2 * n + 2 * m then
    return fail('KEYS must hold the deadline set, n stock keys and m reservation keys')
end
local dry = ARGV[3] == '1'
if not ends_with(KEYS[1], ':resv:deadlines') then
    return fail('KEYS[1] must be the deadline set')
end

local skus, on_hand, reserved, unapplied = {}, {}, {}, {}
for i = 1, n do
    local sku = ARGV[3 + i]
    local have = int_in(ARGV[3 + n + i], 0, 9007199254740991)
    if type(sku) ~= 'string' or #sku == 0 or string.find(sku, '[{}]') then
        return fail('sku ' .. i .. ' is empty or holds a brace')
    end
    if have == nil then
        return fail('on_hand of sku ' .. sku .. ' must be an integer >= 0')
    end
    if reserved[sku] ~= nil then
        return fail('duplicate sku ' .. sku)
    end
    if not ends_with(KEYS[1 + i], ':stock:' .. sku) then
        return fail('KEYS[' .. (1 + i) .. '] is not the stock key of sku ' .. sku)
    end
    skus[i] = sku
    on_hand[i] = have
    reserved[sku] = 0
    unapplied[sku] = 0
end

local known = {}
local orders, pending = {}, {}
for j = 1, m do
    local order = ARGV[3 + 2 * n + j]
    if type(order) ~= 'string' or #order == 0 then
        return fail('order ' .. j .. ' is empty')
    end
    if not ends_with(KEYS[1 + n + j], ':resv:' .. order) then
        return fail('KEYS[' .. (1 + n + j) .. '] is not the reservation key of order ' .. order)
    end
    orders[j] = order
    pending[j] = ARGV[3 + 2 * n + m + j] == '1'
    known[order] = true
end
for k = 4 + 2 * n + 2 * m, #ARGV do
    known[ARGV[k]] = true
end

-- A reservation made since the caller read the deadline set may hold these SKUs.
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(members) do
    if not known[id] then
        return {'changed', id}
    end
end

for j = 1, m do
    local key = KEYS[1 + n + j]
    local state = redis.call('HGET', key, 'state')
    local into = nil
    if state == 'reserved' then
        into = reserved
    elseif state == 'committed' and pending[j] then
        into = unapplied
    end
    if into ~= nil then
        local flat = redis.call('HGETALL', key)
        for f = 1, #flat, 2 do
            local field = flat[f]
            if string.sub(field, 1, 4) == 'sku:' then
                local sku = string.sub(field, 5)
                local qty = int_in(flat[f + 1], 1, QTY_MAX)
                if qty == nil then
                    return fail('reservation ' .. orders[j] .. ' field ' .. field .. ' is not a qty')
                end
                if into[sku] ~= nil then
                    into[sku] = into[sku] + qty
                end
            end
        end
    end
end

local out = {'ok'}
for i = 1, n do
    local sku = skus[i]
    local raw = redis.call('GET', KEYS[1 + i])
    local target = on_hand[i] - reserved[sku] - unapplied[sku]
    local clamped = '0'
    if target < 0 then
        target = 0
        clamped = '1'
    end
    local target_s = string.format('%d', target)
    local changed = '0'
    if not raw or int_in(raw, -9007199254740991, 9007199254740991) ~= target then
        changed = '1'
        if not dry then
            redis.call('SET', KEYS[1 + i], target_s)
        end
    end
    out[#out + 1] = sku
    out[#out + 1] = raw or ''
    out[#out + 1] = string.format('%d', reserved[sku])
    out[#out + 1] = string.format('%d', unapplied[sku])
    out[#out + 1] = target_s
    out[#out + 1] = changed
    out[#out + 1] = clamped
end
return out
