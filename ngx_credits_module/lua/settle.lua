-- Settles holds of one project: ARGV = member, charged, status, outcome
-- (commit|release) for each hold.  Each is charged min(charged, held), the
-- rest refunded (to the balance and to the hold's window counters: they
-- keep what was charged), and gets its ledger entry.  Returns one integer per hold:
-- 1, or 0 when the hold is gone (it expired and was refunded, or was
-- settled already): a settle never charges or refunds twice.

if #ARGV == 0 or #ARGV % 4 ~= 0 then
    return redis.error_reply('settle: ARGV is not member, charged, status, '
                             .. 'outcome quadruples')
end

local replies = {}

for i = 1, #ARGV, 4 do
    local member = ARGV[i]

    if redis.call('ZREM', holds_key, member) == 0 then
        replies[#replies + 1] = 0

    else
        local id, held, route, refs = parse_hold(member)
        local charged = ARGV[i + 1]

        -- a whole number from 0 to held, else held
        if charged ~= held then
            local most = tonumber(held)
            local n = math.max(0, math.min(math.floor(tonumber(charged) or most),
                                           most))
            charged = int(n)

            if n < most then
                redis.call('INCRBY', balance_key, int(most - n))
                give_back(refs, most - n)
            end
        end

        redis.call('XADD', ledger_key, '*', 'route', route, 'held', held,
                   'charged', charged, 'status', ARGV[i + 2],
                   'outcome', ARGV[i + 3], 'request_id', id, 'ts', now_ms)

        replies[#replies + 1] = 1
    end
end

return replies
