# The worker's life with Redis: only worker processes connect (not the
# cache manager and loader); holds whose reply was lost with a dropped
# connection are released after the reconnect, not locked until their
# ttl; settles in flight when nginx quits or reloads reach the ledger.
use strict;
use warnings;
use Test::More;
use Time::HiRes qw(sleep time);
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = 'life-secret-0123456789abcdef';
write_file('hs.key', $secret);
chmod 0755, $dir;    # the cache is written by the workers' user

my $redis = CreditsTest::Redis->start(aof => 1);    # holds outlive a restart
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
                                  workers => 2, vars => { DIR => $dir },
                                  http => <<'END');
    credits_redis %%REDIS%% timeout=500ms;
    credits_jwt_key_file %%DIR%%/hs.key;
    proxy_cache_path %%DIR%%/cache keys_zone=ai:1m;

    server {
        listen 127.0.0.1:%%PORT%%;
        add_header X-Hold $credits_hold_id always;

        location /ai {
            credits on;
            credits_price 2;
            credits_route ai;
            proxy_cache ai;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$ngx->start;

my $token = jwt_hs('HS256', $secret, { sub => 'life', exp => time + 600 });
my %auth = (Authorization => "Bearer $token");
my $start = 1000;
$redis->cmd('SET', 'credits:{life}:balance', $start);

sub open_holds { $redis->cmd('ZCARD', 'credits:{life}:holds') }

sub books_close {
    my ($name) = @_;
    my ($balance, $charged, $held) = audit($redis, 'life');
    is $held, 0, "$name: no open hold";
    is $balance + $charged, $start, "$name: every credit accounted for";
}

# -- only workers talk to Redis --------------------------------------------

sub gateway_clients {
    my $list = $redis->cmd('CLIENT', 'LIST');
    return scalar grep { !/cmd=client/ } split /\n/, $list;
}

ok wait_for(sub { gateway_clients() == 2 }, 5), 'two workers connected';
sub children_named {
    my ($name) = @_;
    my $master = $ngx->pid;
    return grep {
        slurp("/proc/$_/stat") =~ /^\d+ \(.*?\) \S $master /
            && slurp("/proc/$_/cmdline") =~ /\Q$name/;
    } map { m{/proc/(\d+)/} ? $1 : () } glob '/proc/[0-9]*/stat';
}

ok wait_for(sub { children_named('cache manager') }, 5),
    'the cache manager runs';
sleep 2.5;    # long enough for a price poll from every process
is gateway_clients(), 2,
    'the cache manager and loader never connect (two clients: the workers)';

# -- holds whose reply was lost: released after the reconnect ---------------

kill 'STOP', $redis->{pid};
my $codes = parallel(8, sub { $ngx->get('/ai', %auth)->{status} });
is_deeply [ sort @$codes ], [ (503) x 8 ], 'Redis stopped: every request 503';
sleep 1.8;    # past the stall limit (3 x timeout): the connections drop
kill 'CONT', $redis->{pid};

ok wait_for(sub { open_holds() == 0
                  && @{ ledger($redis, 'life') } == 8 }, 10),
    'every hold Redis placed late was released after the reconnect'
    or diag explain $redis->cmd('ZRANGE', 'credits:{life}:holds', 0, -1);
is_deeply [ sort map { $_->{outcome} } @{ ledger($redis, 'life') } ],
          [ ('release') x 8 ], 'each one a release';
books_close('after the stall');
like $ngx->error_log, qr/without a request waiting for it: releasing it/,
    'the releases are logged';

# -- settles in flight at quit and reload ------------------------------------

sub slow_batch {
    my ($n, $signal) = @_;
    my $before = @{ ledger($redis, 'life') };
    my $pid = fork // die;
    if ($pid == 0) {
        sleep 0.4;
        $signal->();
        POSIX::_exit(0);
    }
    my $codes = parallel($n, sub { $ngx->get("/ai?sleep=1&n=$_[0]", %auth)->{status} });
    waitpid $pid, 0;
    return ($codes, $before);
}

my ($codes2, $before) = slow_batch(6, sub { $ngx->reload });
is_deeply [ sort @$codes2 ], [ (200) x 6 ], 'reload: requests in flight served';
ok wait_for(sub { @{ ledger($redis, 'life') } == $before + 6 }, 10),
    'reload: every settle in the ledger';
is_deeply [ map { $_->{outcome} } @{ ledger($redis, 'life') }[-6 .. -1] ],
          [ ('commit') x 6 ], 'reload: six commits';
books_close('after the reload');

my $master = $ngx->pid;
($codes2, $before) = slow_batch(6, sub { kill 'QUIT', $master });
is_deeply [ sort @$codes2 ], [ (200) x 6 ], 'quit: requests in flight served';
ok wait_for(sub { !kill 0, $master }, 10), 'nginx exited';
is scalar @{ ledger($redis, 'life') }, $before + 6,
    'quit: every settle in the ledger';
books_close('after the quit');

# -- Redis is down when nginx quits: the settles wait, reconnect, land -------

$ngx->start;
ok wait_for(sub { gateway_clients() == 2 }, 5), 'started again';
$before = @{ ledger($redis, 'life') };
$master = $ngx->pid;
my $pid = fork // die;
if ($pid == 0) {
    sleep 0.3;
    $redis->kill9;                       # the settles cannot be sent
    POSIX::_exit(0);
}
$codes = parallel(4, sub { $ngx->get("/ai?sleep=1&m=$_[0]", %auth)->{status} });
waitpid $pid, 0;
delete $redis->{pid};
is_deeply [ sort @$codes ], [ (200) x 4 ], 'Redis down: requests served';
kill 'QUIT', $master;
$redis->start_again;
ok wait_for(sub { !kill 0, $master }, 10), 'Redis down at quit: nginx exited';
is scalar @{ ledger($redis, 'life') }, $before + 4,
    'Redis down at quit: the settles waited for the reconnect';
books_close('after a quit with Redis down');

done_testing;
