# Holds under trouble: expiry with a slow upstream and the late response
# after it, a client gone before the answer, Redis stopped (fail closed and
# fail open) and restarted, and a reload during a slow request.
use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use Time::HiRes qw(sleep);
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = 'fault-secret-0123456789abcdef';
write_file('hs.key', $secret);

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%% timeout=500ms;
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%%;
        add_header X-Hold $credits_hold_id always;
        location /ai {
            credits on;
            credits_price 3;
            credits_route ai;
            credits_hold_ttl 1s;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /open {
            credits on;
            credits_price 3;
            credits_route open;
            credits_fail open;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$ngx->start;

my $token = jwt_hs('HS256', $secret, { sub => 'fault', exp => time + 600 });
my %auth = (Authorization => "Bearer $token");

sub balance { $redis->cmd('GET', 'credits:{fault}:balance') }
sub entries_for {
    my ($id) = @_;
    return [ grep { $_->{request_id} eq $id } @{ ledger($redis, 'fault') } ];
}

$redis->cmd('SET', 'credits:{fault}:balance', 100);

# a hold outlives its ttl: expired and refunded; the late commit is nothing
my $r = $ngx->get('/ai?sleep=2', %auth);
is $r->{status}, 200, 'slow upstream answered after the hold ttl';
my $id = $r->{headers}{'x-hold'};
ok wait_for(sub { @{ entries_for($id) } == 1
                  && $redis->cmd('ZCARD', 'credits:{fault}:holds') == 0 }, 3),
    'the settle has run';
my $e = entries_for($id);
is scalar @$e, 1, 'exactly one ledger entry for the hold';
is_deeply [ @{ $e->[0] }{qw(route held charged status outcome)} ],
          [ 'ai', 3, 0, 0, 'expire' ], 'the hold expired and was refunded';
is balance(), 100, 'the late commit charged nothing';
like $ngx->error_log, qr/had expired before its commit: nothing charged/,
    'the late commit is logged';

# lazy expiry when another request touches the project
$redis->cmd('ZADD', 'credits:{fault}:holds', 1000, 'deadbeef:4:ai');
$redis->cmd('DECRBY', 'credits:{fault}:balance', 4);
$r = $ngx->get('/ai', %auth);
ok wait_for(sub { $redis->cmd('ZCARD', 'credits:{fault}:holds') == 0 }, 3),
    'stale hold swept';
$e = entries_for('deadbeef');
is_deeply [ @{ $e->[0] }{qw(held charged outcome)} ], [ 4, 0, 'expire' ],
    'a stale hold is refunded by the next script touching the project';
is balance(), 97, 'refunded 4, charged 3';

# the client goes away before the response header: released
$redis->cmd('SET', 'credits:{fault}:balance', 50);
my $before = $redis->cmd('XLEN', 'credits:{fault}:ledger');
my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $ngx->port)
    or die;
print $s "GET /ai?sleep=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer $token\r\n\r\n";
ok wait_for(sub { balance() == 47 }, 2), 'hold placed while the upstream works';
close $s;
ok wait_for(sub { $redis->cmd('XLEN', 'credits:{fault}:ledger') > $before }, 3),
    'settled after the client left';
$e = ledger($redis, 'fault')->[-1];
is_deeply [ @$e{qw(held charged status outcome)} ], [ 3, 0, 499, 'release' ],
    'client gone: released with status 499';
is balance(), 50, 'client gone: nothing charged';

# Redis stopped: 503 under fail closed, uncharged forward under fail open
$redis->stop;
my $calls = $up->requests;
$r = $ngx->get('/ai', %auth);
is $r->{status}, 503, 'redis down, fail closed: 503';
is $r->{headers}{'retry-after'}, 1, 'Retry-After';
is $up->requests, $calls, 'fail closed: upstream not called';
like $ngx->error_log, qr/project "fault" route "ai": .*answering 503/,
    'the failure is logged with project and route';

$r = $ngx->get('/open', %auth);
is $r->{status}, 200, 'redis down, fail open: forwarded';
ok !exists $r->{headers}{'x-credits-held'}, 'fail open: nothing held';
is $up->requests, $calls + 1, 'fail open: upstream called';
like $ngx->error_log, qr/forwarding uncharged \(credits_fail open\)/,
    'fail open is logged';

# Redis back on the same port: charging resumes without a reload
$redis->start_again;
$redis->cmd('SET', 'credits:{fault}:balance', 20);
ok wait_for(sub { ($ngx->get('/ai', %auth)->{headers}{'x-credits-held'} // 0) == 3 }, 10),
    'charging resumes after Redis is back (scripts loaded again)';
ok wait_for(sub { balance() == 17 && $redis->cmd('ZCARD', 'credits:{fault}:holds') == 0 }, 3),
    'charged once after the restart';

# SCRIPT FLUSH: NOSCRIPT is answered by loading the script again
$redis->cmd('SCRIPT', 'FLUSH');
$r = $ngx->get('/ai', %auth);
is $r->{status}, 200, 'after SCRIPT FLUSH the hold still works';
like $ngx->error_log, qr/script "hold" not loaded, loading it again/,
    'NOSCRIPT handled';

# Redis too slow: the hold times out (503), its late success is released
$redis->cmd('SET', 'credits:{fault}:balance', 30);
wait_for(sub { $redis->cmd('ZCARD', 'credits:{fault}:holds') == 0 }, 3);
my $pid = fork // die;
if ($pid == 0) {
    my $r2 = bless { port => $redis->port }, 'CreditsTest::Redis';
    $r2->cmd('DEBUG', 'SLEEP', '1.2');
    POSIX::_exit(0);
}
sleep 0.2;
$r = $ngx->get('/ai', %auth);
is $r->{status}, 503, 'redis slower than timeout=500ms: 503';
waitpid $pid, 0;
ok wait_for(sub { $redis->cmd('ZCARD', 'credits:{fault}:holds') == 0
                  && balance() == 30 }, 5),
    'a hold placed after its request gave up is released';
$e = ledger($redis, 'fault')->[-1];
is_deeply [ @$e{qw(held charged status outcome)} ], [ 3, 0, 0, 'release' ],
    'the orphaned hold got a release entry';
like $ngx->error_log, qr/without a request waiting for it: releasing it/,
    'the orphan release is logged';

# reload during a slow request: it completes and is committed once
$redis->cmd('SET', 'credits:{fault}:balance', 10);
my $kid = fork // die;
if ($kid == 0) {
    my $res = $ngx->get('/open?sleep=1.5', %auth);
    POSIX::_exit($res->{status} == 200 ? 0 : 1);
}
ok wait_for(sub { balance() == 7 }, 2), 'slow request holding';
$ngx->reload;
waitpid $kid, 0;
is $? >> 8, 0, 'the slow request completed with 200 across the reload';
ok wait_for(sub { balance() == 7 && $redis->cmd('ZCARD', 'credits:{fault}:holds') == 0 }, 3),
    'committed exactly once';
is scalar(grep { $_->{route} eq 'open' && $_->{outcome} eq 'commit' }
          @{ ledger($redis, 'fault') }), 1, 'one commit entry';


# Redis loading its data (DEBUG RELOAD slowed by key-load-delay): the
# connection made again meanwhile has its SCRIPT LOAD refused with LOADING
# and is kept; the request waits within timeout= and is charged once
my $patient = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
                                      vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%% timeout=8s;
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%%;
        location /ai {
            credits on;
            credits_price 3;
            credits_route loading;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$patient->start;
$redis->cmd('SET', 'credits:{fault}:balance', 30);
is $patient->get('/ai', %auth)->{status}, 200, 'connected before the reload';
# 200 keys, 10 ms each: 2 s of LOADING, events served every 1 kB
$redis->cmd('DEBUG', 'POPULATE', 200, 'filler', 64);
$redis->cmd('CONFIG', 'SET', 'loading-process-events-interval-bytes', 1024);
$redis->cmd('CONFIG', 'SET', 'key-load-delay', 10000);
my $reloader = IO::Socket::INET->new(PeerAddr => $redis->addr) or die;
print $reloader "DEBUG RELOAD\r\n";
ok wait_for(sub { (eval { $redis->cmd('GET', 'credits:{fault}:balance') } // '') =~ /^LOADING/ }, 5),
    'Redis answers LOADING';
my $t0 = time;
$r = $patient->get('/ai', %auth);
is $r->{status}, 200, 'a request while Redis loads: 200 once loaded';
<$reloader>;
$redis->cmd('CONFIG', 'SET', 'key-load-delay', 0);
like $patient->error_log, qr/SCRIPT LOAD: LOADING/,
    'the connection made during the load had its SCRIPT LOAD refused';
unlike $patient->error_log, qr/SCRIPT LOAD failed/, 'and kept it';
ok wait_for(sub { balance() == 24 && $redis->cmd('ZCARD', 'credits:{fault}:holds') == 0 }, 3),
    'both requests charged once: 30 - 2 x 3';
is scalar(grep { $_->{route} eq 'loading' && $_->{outcome} eq 'commit' }
          @{ ledger($redis, 'fault') }), 2, 'two commit entries';
unlike $patient->error_log, qr/exited on signal|\[alert\]/, 'no worker crashed';
$patient->stop;

unlike $ngx->error_log, qr/exited on signal|\[alert\]/,
    'no worker crashed';

done_testing;
