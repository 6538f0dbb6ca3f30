-- Shared head of the hold and settle scripts (tools/lua2c prepends it).
--
-- KEYS: balance, holds, ledger of one project; all share the {P} hash tag.
-- A hold is a member "<hold_id>:<held>:<route>" of the holds sorted set,
-- scored by the time (ms, Redis's clock) at which it expires.  Every
-- script first refunds the project's holds whose time is up, each with an
-- 'expire' ledger entry, so a hold is refunded once: after that a late
-- settle finds no member and changes nothing.
--
-- A hold counted in window counters (credits_visitor_limit,
-- credits_budget) names them after its id: "<id>;<ref>;<ref>:<held>:..",
-- a ref "<kind>,<name>,<period s>,<window start s>[,<visitor hash>]"
-- naming the key "credits:{P}:<kind>:<name>:<period>:<start>[:<hash>]"
-- (kind b: the budget, v: a visitor).  The id part keeps no ':', so every
-- reader of "<id>:<held>:<route>" still finds the amount and the route.
-- Whatever goes back to the balance goes back to those counters too.

local balance_key, holds_key, ledger_key = KEYS[1], KEYS[2], KEYS[3]

-- "credits:{P}:", the base of the project's other keys
local base = string.sub(balance_key, 1, -8)

local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)

-- Redis formats a number handed to redis.call with "%.17g", which costs
-- more than many commands do: the scripts hand it strings, each number
-- formatted once as an integer, or taken as it came.
local function int(n)
    return string.format('%d', n)
end

local now_ms = int(now)

-- the project's balance (a missing key is 0), or nil and the error reply
-- a script answers when it is not a whole number (hold and move read it)
local function whole_balance()
    local balance = tonumber(redis.call('GET', balance_key) or '0')

    if balance == nil or balance % 1 ~= 0 then
        return nil, redis.error_reply('balance of ' .. balance_key
                                      .. ' is not a whole number')
    end

    return balance
end

-- a whole number that a Lua number (a double) holds exactly
local function whole(s)
    return #s <= 15 and string.find(s, '^%d+$') ~= nil
end

-- id, held (as written in the member), route, refs of its counters
local function parse_hold(member)
    local id, held, route = string.match(member, '^([^:]+):(%d+):(.*)$')
    local semi = id and string.find(id, ';', 1, true)

    if semi then
        return string.sub(id, 1, semi - 1), held, route, string.sub(id, semi)
    end

    return id, held, route, ''
end

-- A counter of a ref: {key, kind ('b' or 'v'), name, period, start},
-- false if the ref is malformed.  A batch's holds mostly share a budget:
-- each ref is read once per call.
local seen_refs, seen_lists = {}, {}

local function counter(ref)
    local c = seen_refs[ref]

    if c == nil then
        local kind, name, period, start, rest =
            string.match(ref, '^([vb]),([^,]+),(%d+),(%d+)(.*)$')

        c = false

        if kind then
            -- one concatenation: cheaper in Redis's Lua than a gsub
            local key = base .. kind .. ':' .. name .. ':' .. period .. ':'
                        .. start

            if rest ~= '' then
                key = key .. string.gsub(rest, ',', ':')
            end

            c = { key, kind, name, period, start }
        end

        seen_refs[ref] = c
    end

    return c
end

-- the counters of a member's refs, in order; false if one is malformed
local function counter_list(refs)
    local list = seen_lists[refs]

    if list == nil then
        list = {}

        -- ";ref;ref": plain finds, cheaper in Redis's Lua than a gmatch
        local from = 1

        while from <= #refs do
            local to = (string.find(refs, ';', from + 1, true) or #refs + 1)
            local ref = string.sub(refs, from + 1, to - 1)

            if ref ~= '' then
                local c = counter(ref)

                if not c then
                    list = false
                    break
                end

                list[#list + 1] = c
            end

            from = to
        end

        seen_lists[refs] = list
    end

    return list
end

-- gives n credits back to the counters of refs that still exist (a
-- counter gone with its window is not made again)
local function give_back(refs, n)
    if refs == '' or n <= 0 then
        return
    end

    for _, c in ipairs(counter_list(refs) or {}) do
        local spent = tonumber(redis.call('GET', c[1]) or '')

        if spent then
            redis.call('SET', c[1], int(math.max(0, spent - n)), 'KEEPTTL')
        end
    end
end

-- the limit of a budget of that name: the project's own in
-- credits:{P}:budgets when that is a whole number, else the configured one
local budgets = {}

local function budget_of(name, limit)
    local own = budgets[name]

    if own == nil then
        own = redis.call('HGET', base .. 'budgets', name)
        own = own and whole(own) and tonumber(own) or false
        budgets[name] = own
    end

    return own or limit
end

-- what the counters have spent in their windows: read once per call,
-- written once at its end (tally_write), each expiring a minute after
-- its window (a give-back later finds it gone and does nothing); key ->
-- spent, key -> the PXAT it is written with
local tally, tally_pxats = {}, {}

local function spent(key)
    local n = tally[key]

    if n == nil then
        n = tonumber(redis.call('GET', key) or '0') or 0
        tally[key] = n
    end

    return n
end

local function tally_write()
    for key, pxat in pairs(tally_pxats) do
        redis.call('SET', key, int(tally[key]), 'PXAT', pxat)
    end
end

local stale = redis.call('ZRANGEBYSCORE', holds_key, '-inf', now)

if #stale > 0 then
    local refund = 0
    for _, member in ipairs(stale) do
        local id, held, route, refs = parse_hold(member)
        if held then
            refund = refund + tonumber(held)
            give_back(refs, tonumber(held))
            redis.call('XADD', ledger_key, '*', 'route', route,
                       'held', held, 'charged', '0', 'status', '0',
                       'outcome', 'expire', 'request_id', id, 'ts', now_ms)
        end
    end
    redis.call('INCRBY', balance_key, int(refund))
    redis.call('ZREMRANGEBYSCORE', holds_key, '-inf', now)
end
