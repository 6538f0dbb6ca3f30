# Faults under sustained traffic, in bounded loops on loopback: Redis
# killed and restarted, Redis too slow, upstreams resetting and timing out,
# clients aborting, reloads.  After each: no worker crashed, every answer is
# one the contract allows, and every project's books balance.
use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use Time::HiRes qw(sleep time);
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = 'load-secret-0123456789';
write_file('hs.key', $secret);

my $ctl = $ENV{CREDITSCTL} || 'build/creditsctl';
my $redis = CreditsTest::Redis->start(aof => 1);
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up, workers => 2,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%% timeout=300ms;
    credits_jwt_key_file %%DIR%%/hs.key;
    proxy_read_timeout 500ms;
    server {
        listen 127.0.0.1:%%PORT%% backlog=512;
        location /ai {
            credits on;
            credits_price 3;
            credits_hold_ttl 2s;
            credits_cost_header X-Cost;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$ngx->start;

my @projects = qw(load-a load-b load-c);
my %token = map { $_ => jwt_hs('HS256', $secret, { sub => $_, exp => time + 600 }) }
            @projects;
system("$ctl --redis " . $redis->addr . " topup $_ 100000 >/dev/null") == 0
    or die "topup" for @projects;

my @queries = ('', '?cost=1', '?cost=junk', '?status=500', '?status=404',
               '?sleep=0.2', '?sleep=0.8', '?reset=1');

# $n clients for $secs seconds; each answer's status is written to a file
sub load {
    my ($secs) = @_;
    my @pids;
    for my $c (1 .. 6) {
        my $pid = fork // die;
        if ($pid == 0) {
            srand($$);
            open my $out, '>', "$dir/load.$$" or die;
            my $end = time + $secs;
            while (time < $end) {
                my $p = $projects[rand @projects];
                my $q = $queries[rand @queries];
                if (rand() < 0.1) {
                    # a client that leaves mid-request
                    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                                  PeerPort => $ngx->port);
                    print $s "GET /ai?sleep=0.3 HTTP/1.1\r\nHost: x\r\n"
                           . "Authorization: Bearer $token{$p}\r\n\r\n" if $s;
                    sleep 0.05;
                    print $out "abort\n";
                    next;
                }
                my $r = $ngx->request('GET', "/ai$q", timeout => 5,
                                      headers => { Authorization => "Bearer $token{$p}" });
                print $out "$r->{status}\n";
            }
            close $out;
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    return @pids;
}

sub finish {
    my (@pids) = @_;
    waitpid $_, 0 for @pids;
    my %count;
    for my $file (glob "$dir/load.*") {
        $count{$_}++ for split /\n/, CreditsTest::slurp($file);
        unlink $file;
    }
    return \%count;
}

sub audited {
    my ($name) = @_;
    # a quiet moment: the audit counts holds still open (those whose
    # settle was lost with Redis expire later and are refunded then)
    sleep 1;
    for my $p (@projects) {
        my $out = `$ctl --redis @{[ $redis->addr ]} audit $p 2>&1`;
        is $? >> 8, 0, "$name: audit $p" or diag $out;
    }
    unlike $ngx->error_log, qr/exited on signal|\[alert\]/,
        "$name: no worker crashed";
}

sub allowed {
    my ($name, $count) = @_;
    my @bad = grep { !/^(200|404|500|502|503|504|abort)$/ } keys %$count;
    diag "$name: " . join ' ', map { "$_=$count->{$_}" } sort keys %$count;
    is_deeply \@bad, [], "$name: only allowed answers"
        or diag explain $count;
    ok(($count->{200} // 0) > 0, "$name: traffic was served");
}

# 1. Redis killed (-9) and restarted while traffic runs
my @pids = load(5);
sleep 1.5;
$redis->kill9;
sleep 1;
$redis->start_again;
my $count = finish(@pids);
allowed('redis killed', $count);
ok $count->{503}, 'redis killed: some 503 while it was gone';
audited('redis killed');

# 2. Redis made slow: commands time out
@pids = load(4);
sleep 1;
for (1 .. 3) {
    my $r2 = bless { port => $redis->port }, 'CreditsTest::Redis';
    $r2->cmd('DEBUG', 'SLEEP', '0.6');
    sleep 0.3;
}
$count = finish(@pids);
allowed('redis slow', $count);
ok $count->{503}, 'redis slow: holds timed out with 503';
audited('redis slow');

# 3. nginx reloaded repeatedly under traffic
@pids = load(5);
for (1 .. 3) {
    sleep 1;
    $ngx->reload;
}
$count = finish(@pids);
allowed('reloads', $count);
audited('reloads');

# the upstream resets, timeouts and aborts ran through every phase above
done_testing;
