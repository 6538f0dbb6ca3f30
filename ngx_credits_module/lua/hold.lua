-- Places the holds of one project, in order: ARGV = member, price, ttl
-- (ms), N ('' is 0) for each hold, then its N window counters, each as
-- key, limit, PXAT of the key, budget (the budget's name, whose limit the
-- project may set in credits:{P}:budgets; '' for a visitor's limit).
-- The member's refs name the same counters (settle and expiry give back
-- to them): nginx writes both, so that this script, run for every
-- request, parses no member.  Returns code, value for each hold, in one
-- flat array (a table per hold would cost Redis more than the ZADD): 1
-- placed (balance after it), 0 balance too low (balance), -1 a hold with
-- that id exists (balance), 2 the visitor's limit reached (the limit), 3
-- the budget spent (the budget in force).  A hold is placed in the
-- balance and in its counters, or in nothing.

local function malformed(what)
    return redis.error_reply('hold: ' .. what)
end

-- every argument is checked before anything is written: an error raised
-- half way (DECRBY of a fraction, say) would keep the holds placed so far
-- without their debit.  A batch's holds mostly share a price, a ttl and
-- limits: each such string is read once per call, when first looked up
-- in numbers (string -> its whole number, or false); later lookups are a
-- table's, not a function call's.
local numbers = setmetatable({}, { __index = function(numbers, s)
    local n = whole(s) and tonumber(s)

    numbers[s] = n
    return n
end })

if #ARGV == 0 then
    return malformed('no holds')
end

local starts, counts, expires_at = {}, {}, {}
local i, last, holds = 1, #ARGV, 0

while i <= last do
    local ttl, counted = ARGV[i + 2], ARGV[i + 3]

    if counted == nil then
        return malformed('ARGV is not member, price, ttl, N, then N '
                         .. 'counters (key, limit, pxat, budget) per hold')
    end

    if not numbers[ARGV[i + 1]] or not numbers[ttl] then
        return malformed('price or ttl is not a whole number')
    end

    expires_at[ttl] = expires_at[ttl] or int(now + numbers[ttl])

    local n = 0

    if counted ~= '0' and counted ~= '' then
        n = numbers[counted] or -1

        if n < 0 or i + 3 + 4 * n > last then
            return malformed('counters or their limits are not valid')
        end

        for j = i + 4, i + 3 + 4 * n, 4 do
            -- a counter is one of the project's keys, never another's
            if string.sub(ARGV[j], 1, #base) ~= base
               or not numbers[ARGV[j + 1]] or not numbers[ARGV[j + 2]]
               or ARGV[j + 3] == nil
            then
                return malformed('counters or their limits are not valid')
            end
        end
    end

    holds = holds + 1
    starts[holds], counts[holds] = i, n
    i = i + 4 + 4 * n
end

-- A visitor's counter takes the price at once, with one INCRBY (its key
-- mostly exists: visitors come back within a window), and is given it
-- back if the hold is refused after all.  A budget, which the batch's
-- holds share, is read once and written once per call (tally_write).
local ints = {}

-- gives price back to the visitor counters of the hold at i up to j
local function untake(i, j, price)
    for k = i + 4, j, 4 do
        if ARGV[k + 3] == '' then
            redis.call('DECRBY', ARGV[k], ints[price])
        end
    end
end

-- the hold at i with n counters takes price in its visitors' counters,
-- if its budgets allow it: nothing, or (nothing taken) code 2 (a
-- visitor's limit) or 3 (a budget's) and the limit
local function take(i, n, price)
    ints[price] = ints[price] or int(price)

    for j = i + 4, i + 3 + 4 * n, 4 do
        local key, limit, budget = ARGV[j], numbers[ARGV[j + 1]], ARGV[j + 3]

        if budget == '' then
            local v = redis.pcall('INCRBY', key, ints[price])

            if type(v) ~= 'number' then
                -- not a counter: counted again from nothing
                redis.call('SET', key, ints[price], 'PXAT', ARGV[j + 2])
                v = price

            elseif v == price then
                redis.call('PEXPIREAT', key, ARGV[j + 2])
            end

            if v > limit then
                untake(i, j, price)
                return 2, limit
            end

        else
            limit = budget_of(budget, limit)

            if spent(key) + price > limit then
                untake(i, j - 4, price)
                return 3, limit
            end
        end
    end
end

local function count_in_budgets(i, n, price)
    for j = i + 4, i + 3 + 4 * n, 4 do
        local key = ARGV[j]

        if ARGV[j + 3] ~= '' then
            tally[key] = spent(key) + price
            tally_pxats[key] = ARGV[j + 2]
        end
    end
end

local balance, balance_error = whole_balance()

if not balance then
    return balance_error
end

local replies, debit = {}, 0

for h = 1, holds do
    local i, n = starts[h], counts[h]
    local price = numbers[ARGV[i + 1]]
    local counted = n > 0 and price > 0
    local code, limit

    if counted then
        code, limit = take(i, n, price)
    end

    if not code then
        if balance < price then
            code, limit = 0, balance

        -- NX: a hold id is never reused, so the balance is never debited
        -- twice
        elseif redis.call('ZADD', holds_key, 'NX', expires_at[ARGV[i + 2]],
                          ARGV[i]) == 0 then
            code, limit = -1, balance
        end

        if code and counted then
            untake(i, i + 3 + 4 * n, price)
        end
    end

    if code then
        replies[#replies + 1] = code
        replies[#replies + 1] = limit

    else
        balance = balance - price
        debit = debit + price

        if n > 0 then
            count_in_budgets(i, n, price)
        end

        replies[#replies + 1] = 1
        replies[#replies + 1] = balance
    end
end

if debit > 0 then
    redis.call('DECRBY', balance_key, int(debit))
end

tally_write()

return replies
