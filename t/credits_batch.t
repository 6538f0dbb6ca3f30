# Batches: the holds and settles of one project issued in one event loop
# iteration go to Redis as one script call.  Watched with MONITOR under
# wrk load: every call touches one project only, carries at most 64
# items, many carry more than one, and the books still reconcile; then a
# race of 8 projects at once charges each exactly as if alone.
use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(sleep);
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = 'batch-secret-0123456789abcdef';
write_file('hs.key', $secret);

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up, workers => 1,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;
    upstream fast { server 127.0.0.1:%%PORT%%; keepalive 16; }
    server {
        listen 127.0.0.1:%%PORT%% backlog=1024;
        location /ai {
            credits on;
            credits_price 2;
            credits_route batch;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /fast {
            credits on;
            credits_route fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://fast/answer;
        }
        location /answer { return 200 '{"ok":true}'; }
    }
END
$ngx->start;

sub token { jwt_hs('HS256', $secret, { sub => $_[0], exp => time + 600 }) }

# every command Redis runs, written to a file by a child on MONITOR
sub monitor {
    my ($file) = @_;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                      PeerPort => $redis->port) or POSIX::_exit(1);
        print $s "MONITOR\r\n";
        open my $out, '>', $file or POSIX::_exit(1);
        $out->autoflush(1);
        print $out $_ while <$s>;
        POSIX::_exit(0);
    }
    wait_for(sub { -s $file }, 5);
    return $pid;
}

# [project of each key], [items] of every EVALSHA the monitor saw
sub script_calls {
    my ($file) = @_;
    my @calls;
    for (split /\n/, slurp($file)) {
        next unless /"EVALSHA"/i;
        my @a = /"((?:[^"\\]|\\.)*)"/g;
        my (undef, undef, $numkeys, @rest) = @a;
        my @keys = splice @rest, 0, $numkeys;
        # a settle's fourth argument is its outcome, and it has seven a
        # hold; a hold's fourth is its number of window counters (none
        # here: four arguments)
        my $settle = @rest >= 4 && $rest[3] =~ /^(commit|release)$/;
        push @calls, { projects => [ map { /\{([^}]*)\}/ ? $1 : '' } @keys ],
                       items => @rest / ($settle ? 7 : 4),
                       kind => $settle ? 'settle' : 'hold' };
    }
    return \@calls;
}

# 1. wrk: 200 connections, one hot project and three others
my @projects = ('hot', 'cold-1', 'cold-2', 'cold-3');
$redis->cmd('SET', "credits:{$_}:balance", 1_000_000) for @projects;
my @tokens = ((token('hot')) x 7, map { token($_) } @projects[1 .. 3]);
my $lua = write_file('tokens.lua',
    'local tokens = {"' . join('","', @tokens) . "\"}\n" . <<'LUA');
local n = 0
request = function()
    n = n + 1
    return wrk.format("GET", "/fast", {["Authorization"] = "Bearer " .. tokens[(n % #tokens) + 1]})
end
LUA

my $mon = "$dir/monitor.log";
my $mpid = monitor($mon);
my $out = `wrk -t2 -c200 -d2s -s $lua http://127.0.0.1:@{[ $ngx->port ]}/fast 2>&1`;
my ($done) = $out =~ /(\d+) requests in/;
ok $done && $done > 500, "wrk ran ($done requests)" or diag $out;
unlike $out, qr/Non-2xx/, 'every answer 2xx';

# requests cut off when wrk stopped may still be on their way: settle twice
my $open = sub { !grep { $redis->cmd('ZCARD', "credits:{$_}:holds") } @projects };
ok wait_for($open, 10) && sleep(0.5) && wait_for($open, 10), 'every hold settled';
# MONITOR keeps order: once this shows up, everything before it is in
$redis->cmd('ECHO', 'end-of-load');
ok wait_for(sub { slurp($mon) =~ /"end-of-load"/ }, 10), 'monitor caught up';
kill 'TERM', $mpid;
waitpid $mpid, 0;

my $calls = script_calls($mon);
my @holds = grep { $_->{kind} eq 'hold' } @$calls;
my @settles = grep { $_->{kind} eq 'settle' } @$calls;
my $hold_items = 0;
$hold_items += $_->{items} for @holds;
my $settle_items = 0;
$settle_items += $_->{items} for @settles;
my ($max) = sort { $b <=> $a } map { $_->{items} } @$calls;

ok @holds && @settles, scalar(@holds) . ' hold and ' . scalar(@settles) . ' settle calls seen';
is scalar(grep { my %p = map { $_ => 1 } @{ $_->{projects} }; keys(%p) != 1 } @$calls), 0,
    'every call touches the keys of one project';
is scalar(grep { @{ $_->{projects} } != 3 } @$calls), 0, 'three keys per call';
ok $max <= 64, "at most 64 items per call (largest $max)";
ok scalar(grep { $_->{items} > 1 } @holds), 'holds of one project share calls';
ok scalar(grep { $_->{items} > 1 } @settles), 'settles of one project share calls';
ok @holds < $hold_items, "fewer hold calls than holds (@{[ scalar @holds ]} for $hold_items)";
is $settle_items, $hold_items, 'one settle per hold';

my $entries = 0;
for my $p (@projects) {
    my ($balance, $charged, $held) = audit($redis, $p);
    is $balance + $charged + $held, 1_000_000, "$p: balance + ledger + holds = start";
    $entries += @{ ledger($redis, $p) };
}
is $entries, $hold_items, 'one ledger entry per hold';
ok $entries >= $done, 'every answered request is in a ledger';

# 2. eight projects racing at once: each charged as if alone
my @race = map { "race-$_" } 1 .. 8;
$redis->cmd('SET', "credits:{$_}:balance", 37) for @race;
my %tok = map { $_ => token($_) } @race;
my $codes = parallel(200, sub {
    my ($i) = @_;
    my $p = $race[$i % 8];
    return "$p " . $ngx->get('/ai', Authorization => "Bearer $tok{$p}")->{status};
});
wait_for(sub { !grep { $redis->cmd('ZCARD', "credits:{$_}:holds") } @race }, 10);

my %count;
$count{$_}++ for @$codes;
for my $p (@race) {
    is_deeply [ $count{"$p 200"}, $count{"$p 402"} ], [ 18, 7 ],
        "$p: 18 of 25 succeed, 7 get 402";
    my ($balance, $charged, $held) = audit($redis, $p);
    is_deeply [ $balance, $charged, $held ], [ 1, 36, 0 ], "$p: books reconcile";
}

unlike $ngx->error_log, qr/\[(alert|emerg|crit)\]|signal \d+|exited on/,
    'no worker crashed';

done_testing;
