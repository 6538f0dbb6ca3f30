# credits_status counts every outcome exactly, over all workers and across
# a reload; the log variables carry exact values; error-log lines name the
# project and the route.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
write_file('hs.key', 'status-secret');

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up, workers => 2,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%% timeout=300ms;
    credits_jwt_key_file %%DIR%%/hs.key;

    log_format credits '$credits_project|$credits_route|$credits_price|'
                       '$credits_held|$credits_charged|$credits_balance|'
                       '$credits_outcome|$credits_hold_id|$request_id|$status';

    server {
        listen 127.0.0.1:%%PORT%%;
        access_log %%TMP%%/credits.log credits;

        location /ai {
            credits on;
            credits_price 4;
            credits_route chat;
            credits_cost_header X-Cost;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /open {
            credits on;
            credits_price 4;
            credits_route chat-open;
            credits_fail open;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /short {
            credits on;
            credits_price 1;
            credits_route short;
            credits_hold_ttl 500ms;
            proxy_pass http://%%UPSTREAM%%;
        }
        location = /status {
            allow 127.0.0.1;
            deny all;
            credits_status;
        }
        location = /status-denied {
            deny all;
            credits_status;
        }
    }
END
$ngx->start;

my $token = jwt_hs('HS256', 'status-secret', { sub => 'stat', exp => time + 600 });
my %auth = (Authorization => "Bearer $token");

sub metrics {
    my $body = $ngx->get('/status')->{body};
    my %m;
    for (split /\n/, $body) {
        next if /^#/;
        my ($k, $v) = /^(\S+) (\S+)$/ or next;
        $m{$k} = $v;
    }
    return \%m;
}

sub outcome { metrics()->{"credits_requests_total{outcome=\"$_[0]\"}"} }

sub settled { wait_for(sub { $redis->cmd('ZCARD', 'credits:{stat}:holds') == 0 }, 5) }

my $r = $ngx->get('/status');
is $r->{status}, 200, 'status answers';
like $r->{headers}{'content-type'}, qr{^text/plain}, 'Prometheus text';
like $r->{body}, qr/^# TYPE credits_requests_total counter$/m, 'TYPE lines';
is $ngx->get('/status-denied')->{status}, 403, 'deny all: 403';

$redis->cmd('SET', 'credits:{stat}:balance', 10);

$ngx->get('/ai?cost=1', %auth);              # committed: held 4, charged 1
$ngx->get('/ai?status=500', %auth);          # released: held 4
$ngx->get('/ai');                            # unauthorized
settled();
$redis->cmd('SET', 'credits:{stat}:balance', 2);
$ngx->get('/ai', %auth);                     # insufficient
$ngx->get('/short?sleep=1', %auth);          # expired (late commit)
settled();
ok wait_for(sub { (outcome('expired') // 0) == 1 }, 3), 'late commit counted';

my $m = metrics();
is $m->{'credits_requests_total{outcome="committed"}'}, 1, 'committed 1';
is $m->{'credits_requests_total{outcome="released"}'}, 1, 'released 1';
is $m->{'credits_requests_total{outcome="expired"}'}, 1, 'expired 1';
is $m->{'credits_requests_total{outcome="unauthorized"}'}, 1, 'unauthorized 1';
is $m->{'credits_requests_total{outcome="insufficient"}'}, 1, 'insufficient 1';
is $m->{'credits_credits_total{kind="held"}'}, 9, 'held 4 + 4 + 1';
is $m->{'credits_credits_total{kind="charged"}'}, 1, 'charged 1';
is $m->{'credits_credits_total{kind="refunded"}'}, 7, 'refunded 3 + 4';
is $m->{'credits_hold_latency_seconds_count'}, 4, 'one latency sample per hold reply';
is $m->{'credits_hold_latency_seconds_bucket{le="+Inf"}'}, 4, '+Inf bucket';
is scalar(grep { /^credits_redis_up\{/ && $m->{$_} == 1 } keys %$m), 2,
    'redis up on both workers';

# Redis down: redis_unavailable and fail_open, counted
$redis->stop;
$ngx->get('/ai', %auth);
$ngx->get('/open', %auth);
$m = metrics();
is $m->{'credits_requests_total{outcome="redis_unavailable"}'}, 1, 'redis_unavailable 1';
is $m->{'credits_requests_total{outcome="fail_open"}'}, 1, 'fail_open 1';
ok wait_for(sub { my $m = metrics(); !grep { /^credits_redis_up\{/ && $m->{$_} == 1 } keys %$m }, 3),
    'redis down on every worker';
like $ngx->error_log, qr/project "stat" route "chat": redis not connected, answering 503/,
    'error log names project and route';
$redis->start_again;
ok wait_for(sub { my $m = metrics();
                  (grep { /^credits_redis_reconnects_total\{/ && $m->{$_} >= 1 } keys %$m) == 2 }, 10),
    'reconnects counted per worker';

# counters survive a reload
$ngx->reload;
$m = metrics();
is $m->{'credits_requests_total{outcome="committed"}'}, 1, 'committed kept over reload';
is $m->{'credits_requests_total{outcome="unauthorized"}'}, 1, 'unauthorized kept over reload';
$ngx->get('/ai');
is outcome('unauthorized'), 2, 'and counting goes on';

# the variables in the access log
$redis->cmd('SET', 'credits:{stat}:balance', 20);
ok wait_for(sub { ($ngx->get('/ai?cost=3', %auth)->{headers}{'x-credits-held'} // 0) == 4 }, 10),
    'charging after the reload';
$ngx->get('/ai?status=503', %auth);
settled();    # the release refunds after the answer; let it land before setting the balance
$redis->cmd('SET', 'credits:{stat}:balance', 1);
$ngx->get('/ai', %auth);
$ngx->get('/ai', Authorization => 'Bearer x.y.z');
settled();

my @lines = grep { length } split /\n/, CreditsTest::slurp($ngx->dir . '/credits.log');
my @last = @lines[-4 .. -1];
my @f = map { [ split /\|/, $_, -1 ] } @last;

is_deeply [ @{ $f[0] }[0 .. 6] ], ['stat', 'chat', 4, 4, 3, 16, 'committed'],
    'committed line: project route price held charged balance outcome';
is $f[0][7], $f[0][8], 'hold id is the request id';
is $f[0][9], 200, 'status 200';
is_deeply [ @{ $f[1] }[0 .. 6] ], ['stat', 'chat', 4, 4, 0, 13, 'released'],
    'released line';
is_deeply [ @{ $f[2] }[0 .. 7] ], ['stat', 'chat', 4, '-', '-', 1, 'insufficient', '-'],
    'insufficient line';
is_deeply [ @{ $f[3] }[0 .. 7] ], ['-', 'chat', '-', '-', '-', '-', 'unauthorized', '-'],
    'unauthorized line';

done_testing;
