-- Shared head of the hold and settle scripts (tools/lua2c prepends it).
--
-- KEYS: balance, holds, ledger of one project; all share the {P} hash tag.
-- A hold is a member "<hold_id>:<held>:<route>" of the holds sorted set,
-- scored by the time (ms, Redis's clock) at which it expires.  Every
-- script first refunds the project's holds whose time is up, each with an
-- 'expire' ledger entry, so a hold is refunded once: after that a late
-- settle finds no member and changes nothing.

local balance_key, holds_key, ledger_key = KEYS[1], KEYS[2], KEYS[3]

local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)

-- Redis formats a number handed to redis.call with "%.17g", which costs
-- more than many commands do: the scripts hand it strings, each number
-- formatted once as an integer, or taken as it came.
local function int(n)
    return string.format('%d', n)
end

local now_ms = int(now)

-- a whole number that a Lua number (a double) holds exactly
local function whole(s)
    return #s <= 15 and string.find(s, '^%d+$') ~= nil
end

-- id, held (as written in the member), route
local function parse_hold(member)
    return string.match(member, '^([^:]+):(%d+):(.*)$')
end

local stale = redis.call('ZRANGEBYSCORE', holds_key, '-inf', now)

if #stale > 0 then
    local refund = 0
    for _, member in ipairs(stale) do
        local id, held, route = parse_hold(member)
        if held then
            refund = refund + tonumber(held)
            redis.call('XADD', ledger_key, '*', 'route', route,
                       'held', held, 'charged', '0', 'status', '0',
                       'outcome', 'expire', 'request_id', id, 'ts', now_ms)
        end
    end
    redis.call('INCRBY', balance_key, int(refund))
    redis.call('ZREMRANGEBYSCORE', holds_key, '-inf', now)
end
