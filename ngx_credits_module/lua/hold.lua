-- Places a hold: ARGV = member, price, ttl (ms).
-- Returns {1, balance after the hold} or {0, balance} when it is too low.

local price = tonumber(ARGV[2])
local balance = tonumber(redis.call('GET', balance_key) or '0')

if balance == nil then
    return redis.error_reply('balance of ' .. balance_key .. ' is not a number')
end

if balance < price then
    return {0, balance}
end

-- NX: a hold id is never reused, so the balance is never debited twice
if redis.call('ZADD', holds_key, 'NX', now + tonumber(ARGV[3]), ARGV[1]) == 0 then
    return redis.error_reply('hold ' .. ARGV[1] .. ' exists already')
end

redis.call('DECRBY', balance_key, price)

return {1, balance - price}
