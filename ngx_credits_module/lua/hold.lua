-- Places the holds of one project, in order: ARGV = member, price, ttl
-- (ms), limits for each hold; limits lists the limit of each window
-- counter the member names, in order ("" for none).  Returns code, value
-- for each hold, in one flat array (a table per hold would cost Redis
-- more than the ZADD): 1 placed (balance after it), 0 balance too low
-- (balance), -1 a hold with that id exists (balance), 2 the visitor's
-- limit reached (the limit), 3 the budget spent (the budget in force).
-- A hold is placed in the balance and in its counters, or in nothing.

if #ARGV == 0 or #ARGV % 4 ~= 0 then
    return redis.error_reply('hold: ARGV is not member, price, ttl, limits '
                             .. 'quadruples')
end

-- every argument is checked before anything is written: an error raised
-- half way (DECRBY of a fraction, say) would keep the holds placed so far
-- without their debit.  The holds of a batch mostly share a ttl: its
-- expiry is formatted once.
local expires_at, lists, limits = {}, {}, {}

for i = 1, #ARGV, 4 do
    local ttl = ARGV[i + 2]

    if not whole(ARGV[i + 1]) or not whole(ttl) then
        return redis.error_reply('hold: price or ttl is not a whole number')
    end

    expires_at[ttl] = expires_at[ttl] or int(now + tonumber(ttl))

    local list, lims = counters(ARGV[i], ARGV[i + 3])

    if not list then
        return redis.error_reply('hold: ' .. lims)
    end

    lists[i], limits[i] = list, lims
end

local balance, balance_error = whole_balance()

if not balance then
    return balance_error
end

local replies, debit = {}, 0

for i = 1, #ARGV, 4 do
    local price = tonumber(ARGV[i + 1])
    local code, limit = over(lists[i], limits[i], price)

    if code then
        replies[#replies + 1] = code
        replies[#replies + 1] = limit

    elseif balance < price then
        replies[#replies + 1] = 0
        replies[#replies + 1] = balance

    -- NX: a hold id is never reused, so the balance is never debited twice
    elseif redis.call('ZADD', holds_key, 'NX', expires_at[ARGV[i + 2]],
                      ARGV[i]) == 0 then
        replies[#replies + 1] = -1
        replies[#replies + 1] = balance

    else
        balance = balance - price
        debit = debit + price
        count(lists[i], price)
        replies[#replies + 1] = 1
        replies[#replies + 1] = balance
    end
end

if debit > 0 then
    redis.call('DECRBY', balance_key, int(debit))
end

tally_write()

return replies
