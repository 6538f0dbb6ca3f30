# creditsctl over a long ledger (200 000 entries): no command keeps Redis
# busy for long (SLOWLOG at 50 ms, a PING loop beside the audit), and the
# audit stays exact while the gateway's own scripts place, settle and
# expire holds and top-ups land between its pages.
use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use JSON::PP;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use CreditsTest;

my $bin = $ENV{CREDITSCTL} || 'build/creditsctl';
my $dir = test_dir();
my $redis = CreditsTest::Redis->start;
my $addr = $redis->addr;
my $p = 'big';
my @keys = map { "credits:{$p}:$_" } qw(balance holds ledger);
my $N = 200_000;

sub ctl {
    my $out = `$bin --redis $addr @_ 2>&1`;
    return ($? >> 8, $out);
}

# the fill is one script: it may block, the measuring has not begun
my ($fill_charged, $fill_topups) = @{ $redis->cmd('EVAL', <<'END', 3, @keys, $N) };
local charged, topups = 0, 0
for i = 1, tonumber(ARGV[1]) do
    if i % 100 == 0 then
        redis.call('XADD', KEYS[3], '*', 'outcome', 'topup', 'amount', '1000',
                   'ts', '1')
        topups = topups + 1000
    else
        local c = i % 4
        redis.call('XADD', KEYS[3], '*', 'route', 'gen', 'held', '3',
                   'charged', tostring(c), 'status', '200',
                   'outcome', c == 0 and 'release' or 'commit',
                   'request_id', 'r' .. i, 'ts', '1')
        charged = charged + c
    end
end
redis.call('SET', KEYS[1], topups - charged - 12)
redis.call('ZADD', KEYS[2], '9999999999999', 'open1:5:gen',
           '9999999999999', 'open2:7:gen')
return {charged, topups}
END
is $redis->cmd('XLEN', $keys[2]), $N, "a ledger of $N entries";
my $fill_last = $redis->cmd('XREVRANGE', $keys[2], '+', '-', 'COUNT', 1)->[0][0];

my ($rc, $out) = ctl('audit', $p);
is $rc, 0, 'the audit of the filled ledger passes' or diag $out;
like $out, qr/^charged\s+$fill_charged$/m, 'charged summed over every page';
like $out, qr/^topups\s+$fill_topups$/m, 'top-ups summed over every page';
like $out, qr/^held\s+12$/m, 'open holds summed';

# the gateway's own scripts, as nginx loads them
my $lua = 'ngx_credits_module/lua';
my $head = slurp("$lua/expire.lua");
my %sha = map { ($_ => $redis->cmd('SCRIPT', 'LOAD', $head . slurp("$lua/$_.lua"))) }
              qw(hold settle);

$redis->cmd('CONFIG', 'SET', 'slowlog-log-slower-than', 50000);
$redis->cmd('SLOWLOG', 'RESET');

# the commands that read the ledger, the holds or the snapshot; the
# traffic's own scripts (EVALSHA, the top-up's EVAL) are not creditsctl's
# reading and may be slowed by a busy host
sub slow_reads {
    my @slow;
    for my $e (@{ $redis->cmd('SLOWLOG', 'GET', 128) }) {
        my ($us, $args) = @$e[2, 3];
        next unless $args->[0] =~ /^X(REV)?RANGE$/i
            || ($args->[0] =~ /^EVAL$/i && $args->[1] =~ /XRANGE|XREVRANGE|ZRANGE/);
        push @slow, sprintf('%s (%.1f ms)', "@$args[0, 1]", $us / 1000);
    }
    return @slow;
}

my $stop = "$dir/stop";
my $results = parallel(3, sub {
    my ($i) = @_;
    delete $redis->{sock};

    if ($i == 0) {
        # a client beside the audit: how long does Redis make it wait?
        my $s = IO::Socket::INET->new(PeerAddr => $addr, Proto => 'tcp')
            or die "ping: $!";
        my ($max, $n) = (0, 0);
        until (-e $stop) {
            my $t = time;
            print $s "PING\r\n";
            <$s> eq "+PONG\r\n" or die 'ping: bad reply';
            my $d = time - $t;
            $max = $d if $d > $max;
            $n++;
            sleep 0.002;
        }
        return "$n $max";
    }

    if ($i == 1) {
        # traffic: holds placed, settled, left open, expired; top-ups
        my $n = 0;
        until (-e $stop) {
            $n++;
            my $m = "w$n:4:gen";
            $redis->cmd('EVALSHA', $sha{hold}, 3, @keys, $m, 4,
                        $n % 7 ? 60000 : 1, '');
            $redis->cmd('EVALSHA', $sha{settle}, 3, @keys,
                        settle_args($m, $n % 5, 200, 'commit')) if $n % 3;
            system("$bin --redis $addr topup $p 10 >/dev/null") if $n % 40 == 0;
        }
        return $n;
    }

    # the audit, once the traffic runs
    wait_for(sub { $redis->cmd('XLEN', $keys[2]) > $N + 100 }, 10);
    my $t = time;
    my $out = `$bin --redis $addr --json audit $p 2>&1`;
    my $rc = $? >> 8;
    my $took = time - $t;
    write_file('stop', '');
    return join "\n", $rc, $took, $out;
});

my ($pings, $ping_max) = split ' ', $results->[0];
my ($audit_rc, $audit_took, $audit_out) = split /\n/, $results->[2], 3;
diag sprintf 'audit under traffic: %.2f s; %d PINGs beside it, the slowest '
    . '%.1f ms; %d traffic rounds', $audit_took, $pings, $ping_max * 1000,
    $results->[1];

is $audit_rc, 0, 'the audit passes while traffic changes the books'
    or diag $audit_out;
my $audit = eval { decode_json($audit_out) } || {};
is $audit->{difference}, 0, '... difference 0';
is_deeply [slow_reads()], [], 'no audit read took Redis 50 ms or more';
cmp_ok $ping_max * 1000, '<', 250, 'no PING beside the audit waited 250 ms (the old script: over 1 s)';
cmp_ok $pings, '>', 10, '... and PINGs were answered all along';

# the audit's sums are those of the ledger up to one entry, and entries
# came after it: it stopped at its snapshot, not at the stream's end
my $tail = $redis->cmd('XRANGE', $keys[2], "($fill_last", '+');
my ($charged, $topups, $cut) = ($fill_charged, $fill_topups, -1);
for my $k (-1 .. $#$tail) {
    if ($k >= 0) {
        my %f = @{ $tail->[$k][1] };
        if ($f{outcome} eq 'topup') { $topups += $f{amount} }
        else { $charged += $f{charged} }
    }
    if ($charged == ($audit->{charged} // -1)
        && $topups == ($audit->{topups} // -1)) {
        $cut = $k;
        last;
    }
}
cmp_ok $cut, '>=', 0, "the audit's sums are those of a ledger prefix";
cmp_ok $#$tail - $cut, '>', 0,
    'entries appended after the snapshot were not counted'
    . " ($cut + 1 of the traffic's entries counted, " . @$tail . ' written)';

# a quiet moment after the traffic
($rc, $out) = ctl('audit', $p);
is $rc, 0, 'the audit passes after the traffic' or diag $out;

# every other command against the long ledger: no read of 50 ms either
$redis->cmd('SLOWLOG', 'RESET');
($rc, $out) = ctl('ledger', $p);
is $rc, 0, 'ledger of the whole stream';
my $rows = () = $out =~ /\n/g;
is $rows, 1 + $redis->cmd('XLEN', $keys[2]), '... every entry, once';
($rc, $out) = ctl('--json', 'ledger', $p, '--last', 2500);
my $last = eval { decode_json($out) } || [];
my $want = $redis->cmd('XREVRANGE', $keys[2], '+', '-', 'COUNT', 2500);
is_deeply [map { $_->{id} } @$last], [reverse map { $_->[0] } @$want],
    'ledger --last 2500: the newest 2500 over three pages, oldest first';
for my $cmd (['holds', $p], ['balance', $p], ['prices'], ['topup', $p, 5],
             ['ledger', $p, '--last', 1]) {
    ($rc, $out) = ctl(@$cmd);
    is $rc, 0, "@$cmd";
}
is_deeply [slow_reads()], [], 'no command read for 50 ms or more';

done_testing;
