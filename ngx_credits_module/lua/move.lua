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
