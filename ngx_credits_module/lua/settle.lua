-- Settles holds of one project: ARGV = member, charged, status, outcome
-- (commit|release), then the member's id, held and route, for each hold.
-- nginx splits the member it wrote, so that this script, run for every
-- request, parses none (a member with refs cost Redis more to match than
-- the ZREM and the XADD together).  Each is charged min(charged, held),
-- the rest refunded (to the balance and to the hold's window counters:
-- they keep what was charged), and gets its ledger entry.  Returns one
-- element per hold: 1, 0 when the hold is gone (it expired and was
-- refunded, or was settled already: a settle never charges or refunds
-- twice), or an error when held is not a whole number (nothing written).

if #ARGV == 0 or #ARGV % 7 ~= 0 then
    return redis.error_reply('settle: ARGV is not member, charged, status, '
                             .. 'outcome, id, held, route per hold')
end

local replies = {}

for i = 1, #ARGV, 7 do
    local member, charged, held = ARGV[i], ARGV[i + 1], ARGV[i + 5]

    if not whole(held) then
        replies[#replies + 1] = redis.error_reply('settle: held "' .. held
                                                  .. '" is not a whole number')

    elseif redis.call('ZREM', holds_key, member) == 0 then
        replies[#replies + 1] = 0

    else
        -- charged: a whole number from 0 to held, else held
        if charged ~= held then
            local most = tonumber(held)
            local n = math.max(0, math.min(math.floor(tonumber(charged) or most),
                                           most))
            charged = int(n)

            if n < most then
                local _, _, _, refs = parse_hold(member)

                redis.call('INCRBY', balance_key, int(most - n))
                give_back(refs, most - n)
            end
        end

        redis.call('XADD', ledger_key, '*', 'route', ARGV[i + 6],
                   'held', held, 'charged', charged, 'status', ARGV[i + 2],
                   'outcome', ARGV[i + 3], 'request_id', ARGV[i + 4],
                   'ts', now_ms)

        replies[#replies + 1] = 1
    end
end

return replies
