-- Settles a hold: ARGV = member, charged, status, outcome (commit|release).
-- Charges min(charged, held), refunds the rest and writes the ledger entry.
-- Returns 1, or 0 when the hold is gone (it expired and was refunded, or
-- was settled already): a settle never charges or refunds twice.

if redis.call('ZREM', holds_key, ARGV[1]) == 0 then
    return 0
end

local id, held, route = parse_hold(ARGV[1])
local charged = math.min(tonumber(ARGV[2]) or held, held)

if held > charged then
    redis.call('INCRBY', balance_key, held - charged)
end

redis.call('XADD', ledger_key, '*', 'route', route, 'held', held,
           'charged', charged, 'status', ARGV[3], 'outcome', ARGV[4],
           'request_id', id, 'ts', now)

return 1
