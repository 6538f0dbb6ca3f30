-- Moves holds of one project to the metered location their request was
-- handed to (internal redirect, error_page, named location): ARGV = old
-- member, new member, ttl (ms), limits (of the new member's counters, as
-- for a hold) for each.  Both members carry the same hold id; the new one
-- names the new route, its counters and the amount held from now on,
-- never less than before: the balance pays the difference, and every
-- counter of the new member must take what it does not hold yet (the
-- counters only the old member names get the old amount back).  Returns
-- code, value for each, in one flat array: 1 moved (balance after it), 0
-- balance too low for the difference (balance), -1 the old hold is gone
-- (it expired) or the new member exists (balance), 2 or 3 a visitor's
-- limit or the budget would be passed (the limit); the old hold stays
-- as it was unless the code is 1.

-- A move reads the counters from the members (a move is rare: the hold,
-- run for every request, gets them ready-made), with their limits.

-- when a counter's key expires, as PXAT's argument: a minute after its
-- window; formatted once per window a call meets
local pxats = {}

local function counter_pxat(c)
    local of_period = pxats[c[4]]

    if of_period == nil then
        of_period = {}
        pxats[c[4]] = of_period
    end

    local pxat = of_period[c[5]]

    if pxat == nil then
        pxat = int((tonumber(c[5]) + tonumber(c[4])) * 1000 + 60000)
        of_period[c[5]] = pxat
    end

    return pxat
end

local seen_limits = {}

-- the limits argument "l1,l2" as numbers; false if one is not whole
local function limit_list(limits)
    local list = seen_limits[limits]

    if list == nil then
        list = {}

        for l in string.gmatch(limits, '[^,]+') do
            if not whole(l) then
                list = false
                break
            end

            list[#list + 1] = tonumber(l)
        end

        seen_limits[limits] = list
    end

    return list
end

-- The window counters a member names and their limits (ARGV "l1,l2", in
-- the order of the refs; nil: not checked): two lists, or nil and what
-- is wrong.
local no_counters = {}

local function counters(member, limits)
    -- most holds count in no window: no parsing for them
    local semi = string.find(member, ';', 1, true)

    if (limits == nil or limits == '') and not semi then
        return no_counters, no_counters
    end

    -- the refs: from a ';' before the first ':' up to it
    local colon = string.find(member, ':', 1, true)

    if not colon or not string.find(member, '^%d+:', colon + 1) then
        return nil, 'a member is not <id>:<held>:<route>'
    end

    local refs = (semi and semi < colon) and string.sub(member, semi, colon - 1)
                 or ''

    local list = counter_list(refs)
    local lims = limits and limit_list(limits)

    if not list or (limits and not (lims and #lims == #list)) then
        return nil, 'counters or their limits are not valid'
    end

    return list, lims
end

-- the first counter that "need" (a function of the counter, or a number)
-- would take past its limit: code 2 (a visitor) or 3 (the budget), limit
local function over(list, lims, need)
    for i, c in ipairs(list) do
        local n = type(need) == 'number' and need or need(c)

        if n > 0 then
            local limit = c[2] == 'b' and budget_of(c[3], lims[i]) or lims[i]

            if spent(c[1]) + n > limit then
                return c[2] == 'v' and 2 or 3, limit
            end
        end
    end
end

local function count(list, n)
    for _, c in ipairs(list) do
        local k = type(n) == 'number' and n or n(c)

        tally[c[1]] = math.max(0, spent(c[1]) + k)
        tally_pxats[c[1]] = counter_pxat(c)
    end
end

if #ARGV == 0 or #ARGV % 4 ~= 0 then
    return redis.error_reply('move: ARGV is not old member, new member, '
                             .. 'ttl, limits quadruples')
end

-- every argument is checked before anything is written
local amounts, olds, news, limits = {}, {}, {}, {}

for i = 1, #ARGV, 4 do
    local _, was = parse_hold(ARGV[i])
    local _, held = parse_hold(ARGV[i + 1])

    if not was or not held or not whole(was) or not whole(held)
       or not whole(ARGV[i + 2]) or tonumber(held) < tonumber(was) then
        return redis.error_reply('move: members or ttl are not valid')
    end

    local old, err = counters(ARGV[i])
    local new, lims = counters(ARGV[i + 1], ARGV[i + 3])

    if not old or not new then
        return redis.error_reply('move: ' .. (old and lims or err))
    end

    limits[i] = lims

    amounts[i] = { tonumber(was), tonumber(held) }
    olds[i], news[i] = {}, new

    for _, c in ipairs(old) do
        olds[i][c[1]] = c
    end
end

local balance, balance_error = whole_balance()

if not balance then
    return balance_error
end

local replies, debit = {}, 0

for i = 1, #ARGV, 4 do
    local was, held = amounts[i][1], amounts[i][2]
    local old = olds[i]

    -- what a counter of the new member takes: all of it, or the growth
    local function need(c)
        return old[c[1]] and held - was or held
    end

    local code, limit = over(news[i], limits[i], need)

    if not redis.call('ZSCORE', holds_key, ARGV[i])
       or redis.call('ZSCORE', holds_key, ARGV[i + 1]) then
        code, limit = -1, balance

    elseif code then
        -- the limit is the reply

    elseif balance < held - was then
        code, limit = 0, balance

    else
        redis.call('ZREM', holds_key, ARGV[i])
        redis.call('ZADD', holds_key, int(now + tonumber(ARGV[i + 2])),
                   ARGV[i + 1])
        balance = balance - (held - was)
        debit = debit + (held - was)
        code, limit = 1, balance

        count(news[i], need)

        for _, c in ipairs(news[i]) do
            old[c[1]] = nil
        end

        for _, c in pairs(old) do
            count({ c }, -was)
        end
    end

    replies[#replies + 1] = code
    replies[#replies + 1] = limit
end

if debit > 0 then
    redis.call('DECRBY', balance_key, int(debit))
end

tally_write()

return replies
