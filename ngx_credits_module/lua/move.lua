-- Moves holds of one project to the metered location their request was
-- handed to (internal redirect, error_page, named location): ARGV = old
-- member, new member, ttl (ms) for each.  Both members carry the same
-- hold id; the new one names the new route and the amount held from now
-- on, never less than before: the balance pays the difference.  Returns
-- code, balance for each, in one flat array: 1 moved (balance after it),
-- 0 balance too low for the difference (the old hold stays), -1 the old
-- hold is gone (it expired) or the new member exists.

if #ARGV == 0 or #ARGV % 3 ~= 0 then
    return redis.error_reply('move: ARGV is not old member, new member, '
                             .. 'ttl triples')
end

-- every argument is checked before anything is written
local grow = {}

for i = 1, #ARGV, 3 do
    local _, was = parse_hold(ARGV[i])
    local _, held = parse_hold(ARGV[i + 1])

    if not was or not held or not whole(was) or not whole(held)
       or not whole(ARGV[i + 2]) or tonumber(held) < tonumber(was) then
        return redis.error_reply('move: members or ttl are not valid')
    end

    grow[i] = tonumber(held) - tonumber(was)
end

local balance = tonumber(redis.call('GET', balance_key) or '0')

if balance == nil or balance % 1 ~= 0 then
    return redis.error_reply('balance of ' .. balance_key
                             .. ' is not a whole number')
end

local replies, debit = {}, 0

for i = 1, #ARGV, 3 do
    if not redis.call('ZSCORE', holds_key, ARGV[i])
       or redis.call('ZSCORE', holds_key, ARGV[i + 1]) then
        replies[#replies + 1] = -1

    elseif balance < grow[i] then
        replies[#replies + 1] = 0

    else
        redis.call('ZREM', holds_key, ARGV[i])
        redis.call('ZADD', holds_key, int(now + tonumber(ARGV[i + 2])),
                   ARGV[i + 1])
        balance = balance - grow[i]
        debit = debit + grow[i]
        replies[#replies + 1] = 1
    end

    replies[#replies + 1] = balance
end

if debit > 0 then
    redis.call('DECRBY', balance_key, int(debit))
end

return replies
