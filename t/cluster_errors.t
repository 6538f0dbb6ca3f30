# Redis Cluster: the replies that say a node cannot serve, each provoked
# for real on a loopback cluster of 3 masters and 3 replicas:
#   - hash slots of keys whose credits_key_prefix has braces ("{" without
#     "}", an empty "{}", a tag after it), against CLUSTER KEYSLOT;
#   - NOSCRIPT from the target of an ASK (SCRIPT FLUSH on a slot's
#     importing node): ASKING again before the script runs again;
#   - a master demoted by CLUSTER FAILOVER: it answers MOVED (READONLY and
#     MASTERDOWN reach only clients in READONLY mode, which the module's
#     connections never are: a replica redirects them first);
#   - LOADING: DEBUG RELOAD, slowed by key-load-delay;
#   - CLUSTERDOWN: cluster-require-full-coverage yes, a master killed and
#     its replica held back from the failover.
# A node that cannot serve is asked again within timeout=; then
# credits_fail decides.
use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use List::Util qw(first);
use POSIX ();
use Time::HiRes qw(sleep time);
use lib 't/lib';
use CreditsTest;
use CreditsCluster;

plan skip_all => 'redis-cli not found' if system('redis-cli -v >/dev/null 2>&1');

my $dir = test_dir();
my $secret = 'cluster-secret-0123456789abcdef';
write_file('hs.key', $secret);

my $cluster = CreditsCluster->start(masters => 3, replicas => 1);
my @masters = $cluster->masters;
is scalar(@masters), 3, 'three masters serve the slots';

my $up = CreditsTest::Upstream->start;

# a gateway on the cluster: /ai fails closed, /open fails open
sub gateway {
    my (%o) = @_;
    my $prefix = defined $o{prefix} ? qq{credits_key_prefix "$o{prefix}";} : '';
    my $http = <<"END";
    credits_redis 127.0.0.1:$masters[0] 127.0.0.1:$masters[1] timeout=$o{timeout};
    $prefix
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%%;
        location /ai {
            credits on;
            credits_price 2;
            credits_route ai;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /open {
            credits on;
            credits_price 2;
            credits_route ai;
            credits_fail open;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
    return CreditsTest::Nginx->new(upstream => $up, vars => { DIR => $dir },
                                   http => $http)->start;
}

my %token;
sub token {
    my ($p) = @_;
    return $token{$p} //= jwt_hs('HS256', $secret, { sub => $p, exp => time + 600 });
}

# the response and the seconds it took
sub call {
    my ($n, $p, $path) = @_;
    my $t = time;
    my $r = $n->get($path // '/ai', Authorization => 'Bearer ' . token($p));
    return ($r, time - $t);
}
sub status { (call(@_))[0]{status} }

# once the gateway has read the slot map, nothing is redirected any more
sub map_read {
    my ($n) = @_;
    return wait_for(sub { $n->error_log =~ /slot map from .* 16384 of 16384/ }, 5);
}

# a project's books under a prefix, read from its owner: balance, the sum
# charged in its ledger, open holds, commits
sub books {
    my ($prefix, $p) = @_;
    my $k = "$prefix\{$p}";
    my $ledger = $cluster->owner_cmd('XRANGE', "$k:ledger", '-', '+');
    my %e = (charged => 0, commits => 0);
    for (map { +{ @{ $_->[1] } } } @$ledger) {
        $e{charged} += $_->{charged};
        $e{commits}++ if $_->{outcome} eq 'commit';
    }
    return ($cluster->owner_cmd('GET', "$k:balance") // 0, $e{charged},
            $cluster->owner_cmd('ZCARD', "$k:holds"), $e{commits});
}

# errors some master answered since reset_stats: { MOVED => n, ... }
sub errors_of_masters {
    my %e;
    for my $m ($cluster->masters) {
        my $s = $cluster->stats($m)->{errors};
        $e{$_} += $s->{$_} for keys %$s;
    }
    return \%e;
}

# -- hash slots of keys with braces in their prefix ------------------------
#
# The router computes a key's slot (ngx_http_credits_key_slot()) for two
# kinds of key: keys[0] of a project's script call and the prices key.
# Project ids have no braces ([A-Za-z0-9._-]); credits_key_prefix may have
# them.  Each prefix and project below is chosen so that the slot of a
# likely mistake (hashing what follows an open "{", an empty tag, or the
# tag after it, or P alone) lands on another master than CLUSTER KEYSLOT's:
# the command would be MOVED there, and sent again to the same wrong slot.

my $slot0 = $cluster->slot_owner(0);    # an empty tag, if hashed

# "{" without "}": "cr{N:prices" is hashed whole; "cr{N:{P}:balance" by
# the tag "N:{P" (the first "}" after the first "{"), not by "P"
my $na = first {
    my $o = $cluster->owner("cr{$_:prices");
    $o != $cluster->owner("$_:prices") && $o != $slot0
} 0 .. 99;
my $pa = "cr{$na:";
my %pa;    # master => project
for my $i (0 .. 999) {
    my $p = "b$i";
    my $o = $cluster->owner("$na:{$p");
    next if $pa{$o} || $o == $cluster->owner($p);
    $pa{$o} = $p;
    last if keys %pa == 3;
}
is scalar(keys %pa), 3, "prefix \"$pa\": a project on each master";

my $ga = gateway(timeout => '2s', prefix => $pa);
$cluster->owner_cmd('SET', "$pa\{$_}:balance", 50) for values %pa;
is status($ga, $pa{$masters[0]}), 200, "prefix \"$pa\": first request";
ok map_read($ga), '... and the slot map read';

$cluster->reset_stats;
for my $m (sort keys %pa) {
    my @st = map { status($ga, $pa{$m}) } 1 .. 5;
    is_deeply \@st, [ (200) x 5 ], "prefix \"$pa\": project $pa{$m} on $m: 5 x 200";
}
my $pp = $pa{$masters[1]};
$cluster->owner_cmd('HSET', "${pa}prices", 'ai', 3);
ok wait_for(sub { ((call($ga, $pp))[0]{headers}{'x-credits-held'} // 0) == 3 }, 5),
    "prefix \"$pa\": the price set in \"${pa}prices\" applies";
is_deeply errors_of_masters(), {}, "prefix \"$pa\": no node answered an error (no MOVED)"
    or diag grep { /MOVED|ASK|slot map/ } split /\n/, $ga->error_log;
$cluster->owner_cmd('HDEL', "${pa}prices", 'ai');
$ga->stop;

for my $m (sort keys %pa) {
    my ($b, $c, $h, $n) = books($pa, $pa{$m});
    is_deeply [$b + $c, $h], [50, 0], "prefix \"$pa\": project $pa{$m}: the books add up";
    ok $n >= 5, "prefix \"$pa\": project $pa{$m}: $n commits, on its owner";
    is 50 - $b, 2 * $n, "prefix \"$pa\": project $pa{$m}: 2 per commit"
        if $pa{$m} ne $pp;
}

# an empty "{}", then a tag: "cN{}{t}:prices" is hashed whole, not by "t"
my $nb = first {
    my $o = $cluster->owner("c$_\{}{t}:prices");
    $o != $cluster->owner('t') && $o != $slot0
} 0 .. 99;
my $pb = "c$nb\{}{t}:";
my $pbp = first {
    my $o = $cluster->owner("$pb\{$_}:balance");
    $o != $cluster->owner('t') && $o != $slot0 && $o != $cluster->owner($_)
} map { "e$_" } 0 .. 999;

my $gb = gateway(timeout => '1s', prefix => $pb);
$cluster->owner_cmd('SET', "$pb\{$pbp}:balance", 50);
status($gb, $pbp);
ok map_read($gb), "prefix \"$pb\": the slot map read";
$cluster->reset_stats;
# a project's keys are hashed whole, each to its slot: the script is
# refused (CROSSSLOT), and the request fails closed
is status($gb, $pbp), 503, "prefix \"$pb\": the keys of a project in several slots: 503";
my $crossslot = $cluster->stats($cluster->owner("$pb\{$pbp}:balance"))->{errors}{CROSSSLOT};
ok $crossslot, '... refused by the owner of the whole key, where it was sent';
is status($gb, $pbp, '/open'), 200, '... and forwarded uncharged under credits_fail open';
like $gb->error_log, qr/hold failed: CROSSSLOT/, '... the error logged';
# a price of 0 is free: no hold, the prices key alone decides
$cluster->owner_cmd('HSET', "${pb}prices", 'ai', 0);
ok wait_for(sub { status($gb, $pbp) == 200 }, 5),
    "prefix \"$pb\": the price 0 set in \"${pb}prices\" applies";
is errors_of_masters()->{MOVED}, undef, "prefix \"$pb\": no MOVED"
    or diag grep { /MOVED|ASK|slot map/ } split /\n/, $gb->error_log;
is $cluster->owner_cmd('GET', "$pb\{$pbp}:balance"), 50, "prefix \"$pb\": nothing charged";
$gb->stop;

# the gateways of the tests below: default prefix
my $g = gateway(timeout => '1s');
my $slow = gateway(timeout => '6s');

# -- TRYAGAIN: a migration that stalls ------------------------------------

my ($src, $dst) = @masters[0, 1];
my $per = $cluster->projects_per_master('t');
my $pt = $per->{$src};
$cluster->cmd('SET', "credits:{$pt}:balance", 100);
is status($_, $pt), 200, 'TRYAGAIN: a first request' for $g, $slow;
ok map_read($_), '... and the slot map read' for $g, $slow;
ok $cluster->settled($pt), '... settled';

# no hold open: the project has no holds key, the target has only some of
# the script's keys and answers TRYAGAIN after the ASK, until the slot is
# its own; a wait bounded by timeout=, not by the redirections
my $slot = $cluster->keyslot("credits:{$pt}:balance");
ok $cluster->migrating($slot, $src, $dst), 'TRYAGAIN: the slot migrating';
ok $cluster->migrate_keys($slot, $src, $dst, 0) >= 2, '... its keys moved';
my $res = parallel(2, sub {
    my ($i) = @_;
    if ($i == 1) {
        sleep 1.5;
        delete $_->{sock} for $cluster->nodes;
        $cluster->assign($slot, $dst);
        return '';
    }
    my ($r, $t) = call($slow, $pt);
    return "$r->{status} $t";
});
my ($code, $took) = split / /, $res->[0];
is $code, 200, sprintf 'TRYAGAIN: 200 after %.2f s, once the slot moved', $took;
ok $took >= 1.3, '... waiting for it, within timeout=';
like $slow->error_log, qr/127\.0\.0\.1:$dst: TRYAGAIN/, 'TRYAGAIN from the target';
unlike $slow->error_log, qr/too many redirections/, 'not taken for a redirection loop';
ok $cluster->settled($pt), 'TRYAGAIN: settled';
is $cluster->balance($pt), 94, 'TRYAGAIN: charged exactly: 2 per 200';
is $cluster->commits($pt), 3, 'TRYAGAIN: one commit per 200';

# -- NOSCRIPT from the target of an ASK ------------------------------------

$per = $cluster->projects_per_master('a');
my $pn = $per->{$src};
$cluster->cmd('SET', "credits:{$pn}:balance", 100);
is status($g, $pn), 200, 'NOSCRIPT after ASK: a first request';
ok $cluster->settled($pn), '... settled';
# connected to the target before its scripts go: a new connection loads them
$cluster->cmd('SET', "credits:{$per->{$dst}}:balance", 10);
is status($g, $per->{$dst}), 200, 'the gateway is connected to the target';

# a hold open: every key of the project exists, on the target too
my $holder = fork // die "fork: $!";
if ($holder == 0) {
    $g->get('/ai?sleep=4', Authorization => 'Bearer ' . token($pn));
    POSIX::_exit(0);
}
ok wait_for(sub { $cluster->cmd('ZCARD', "credits:{$pn}:holds") == 1 }, 5),
    'a hold open';

$slot = $cluster->keyslot("credits:{$pn}:balance");
ok $cluster->migrating($slot, $src, $dst), 'the slot migrating';
ok $cluster->migrate_keys($slot, $src, $dst, 0) >= 3,
    'all its keys moved: the source answers ASK';
$cluster->node_by_port($dst)->cmd('SCRIPT', 'FLUSH');
$cluster->reset_stats;

is status($g, $pn), 200, 'NOSCRIPT after ASK: 200';
# the hold and the commit: each NOSCRIPT once, then run
ok wait_for(sub { ($cluster->stats($dst)->{calls}{evalsha}{calls} // 0) >= 4 }, 5),
    'the target ran the hold and the commit';
my $st = $cluster->stats($dst);
my $es = $st->{calls}{evalsha};
is $st->{errors}{NOSCRIPT}, 2, 'the target answered NOSCRIPT to each';
is $es->{rejected_calls} // 0, 0, 'the target refused no EVALSHA (no MOVED)'
    or diag explain($st), grep { /MOVED|ASK|TRYAGAIN|slot map/ } split /\n/, $g->error_log;
is $st->{calls}{asking}{calls}, $es->{calls},
    'ASKING before every EVALSHA on the target, the retries too';
like $g->error_log, qr/127\.0\.0\.1:$dst: script "hold" not loaded/,
    'the script loaded on the target';
like $g->error_log, qr/127\.0\.0\.1:$src: ASK $slot 127\.0\.0\.1:$dst/, 'the ASK followed';

waitpid $holder, 0;
$cluster->assign($slot, $dst);
ok $cluster->settled($pn), 'settled';
is $cluster->balance($pn), 94, 'charged exactly: 2 per 200';
is $cluster->commits($pn), 3, 'one commit per 200';

# -- a master demoted by CLUSTER FAILOVER under load -----------------------

$per = $cluster->projects_per_master('f');
my $old = $masters[2];
my @pf = ($per->{$old}, $per->{$masters[0]});
my %initial;
for my $p (@pf) {
    $cluster->cmd('SET', "credits:{$p}:balance", 100000);
    $cluster->settled($p);
    my ($b, $c) = audit($cluster, $p);
    $initial{$p} = [$b + $c, $cluster->commits($p)];
}
my $heir = $cluster->replica_of($old);
my $out = "$dir/failover";
my $pids = CreditsCluster::load_start(4, \@pf, $out, sub {
    $slow->get('/ai', Authorization => 'Bearer ' . token($_[0])) });
sleep 1;
is $heir->cmd('CLUSTER', 'FAILOVER'), 'OK', 'CLUSTER FAILOVER on a replica';
ok wait_for(sub { $cluster->node_by_port($old)->cmd('ROLE')->[0] eq 'slave' }, 10),
    'the old master is a replica';
sleep 1;
CreditsCluster::load_stop($pids, $out);

my $r = CreditsCluster::load_read(4, $out);
my %count;
$count{ $_->{s} }++ for @$r;
diag 'failover: ' . join ' ', map { "$_=$count{$_}" } sort keys %count;
is_deeply [ grep { $_ != 200 && $_ != 503 } keys %count ], [], 'failover: only 200 or 503';
ok CreditsCluster::share_200($r) >= 0.9, 'failover: at least 90 % 200';
my $log = $slow->error_log;
like $log, qr/127\.0\.0\.1:$old: MOVED/, 'the demoted master answered MOVED';
unlike $log, qr/READONLY|MASTERDOWN/, 'never READONLY or MASTERDOWN';
for my $p (@pf) {
    ok $cluster->settled($p), "failover: project $p settled";
    my ($b, $c, $h) = audit($cluster, $p);
    is $b + $c + $h, $initial{$p}[0], "failover: project $p: the books are exact";
    is $cluster->commits($p) - $initial{$p}[1],
       scalar(grep { $_->{p} eq $p && $_->{s} == 200 } @$r),
       "failover: project $p: one commit per 200";
}
ok $cluster->wait_ok(10), 'the cluster is ok';
@masters = $cluster->masters;

# -- a node that cannot serve for a while: LOADING, CLUSTERDOWN -----------

# a project with 50 credits, known to both gateways: its books now
sub outage_project {
    my ($what, $p) = @_;
    $cluster->cmd('SET', "credits:{$p}:balance", 50);
    is status($_, $p), 200, "$what: a first request" for $g, $slow;
    ok $cluster->settled($p), "$what: settled";
    my ($b, $c) = audit($cluster, $p);
    return { total => $b + $c, balance => $b, commits => $cluster->commits($p) };
}

# while the node answers $what: a request through the gateway that waits
# 6 s, and two through the one that waits 1 s, failing closed and open
# ($side runs beside them); [status, seconds] of each
sub outage_requests {
    my ($what, $p, $side) = @_;
    my $res = parallel($side ? 4 : 3, sub {
        my ($i) = @_;
        return $side->() // '' if $i == 3;
        my ($r, $t) = call($i ? $g : $slow, $p, $i == 2 ? '/open' : '/ai');
        return "$r->{status} $t";
    });
    my @res = map { [split / /] } @$res[0 .. 2];
    diag sprintf "$what: timeout=6s %d after %.2f s, timeout=1s %d after %.2f s, "
               . 'fail open %d after %.2f s', map { @$_ } @res;
    is $res[1][0], 503, "$what, timeout=1s: 503 (credits_fail closed)";
    ok $res[1][1] >= 0.7, '... after asking again until a pause would pass timeout=';
    is $res[2][0], 200, "$what, timeout=1s: 200 (credits_fail open)";
    return @res;
}

# after it: the one 200 charged, exactly
sub outage_books {
    my ($what, $p, $before, $node) = @_;
    my $log = $slow->error_log;
    ok index($log, 'slot map from', index($log, "127.0.0.1:$node: $what")) > 0,
        "the slot map refreshed after the $what reply";
    ok $cluster->settled($p), "$what: settled";
    my ($b, $c, $h) = audit($cluster, $p);
    is $b + $c + $h, $before->{total}, "$what: the books are exact";
    is $before->{balance} - $b, 2, "$what: only the 200 charged";
    is $cluster->commits($p) - $before->{commits}, 1, "$what: one commit";
}

# -- LOADING: a master reloading its data ----------------------------------

# DEBUG RELOAD on a connection of its own, its reply read later
sub reload_start {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port)
        or die "connect $port: $!";
    print $s "*2\r\n\$5\r\nDEBUG\r\n\$6\r\nRELOAD\r\n";
    return $s;
}

# not the owner of credits:prices: every LOADING the gateways log is the
# request's
$per = $cluster->projects_per_master('l');
my $ml = first { $_ != $cluster->owner('credits:prices') } @masters;
my $pl = $per->{$ml};
my $node = $cluster->node_by_port($ml);
my $before = outage_project('LOADING', $pl);

# 250 keys, 10 ms each: 2.5 s of LOADING, events served every 1 kB
$cluster->replica_of($ml)->cmd('CONFIG', 'SET', 'cluster-replica-no-failover', 'yes');
$node->cmd('CONFIG', 'SET', 'dbfilename', "dump-$ml.rdb");
$node->cmd('CONFIG', 'SET', 'loading-process-events-interval-bytes', 1024);
$node->cmd('CONFIG', 'SET', 'key-load-delay', 10000);
my $tag = first { $cluster->owner($_) == $ml } map { "{fill$_}" } 0 .. 999;
$node->cmd('DEBUG', 'POPULATE', 250, $tag, 2000);

my $reload = reload_start($ml);
ok wait_for(sub { ($node->cmd('GET', "credits:{$pl}:balance") // '') =~ /^LOADING/ }, 5),
    'the master answers LOADING';
my @res = outage_requests('LOADING', $pl);
is $res[0][0], 200, 'LOADING, timeout=6s: 200 once loaded';
is scalar(<$reload>), "+OK\r\n", 'DEBUG RELOAD done';
$node->cmd('CONFIG', 'SET', 'key-load-delay', 0);
$cluster->replica_of($ml)->cmd('CONFIG', 'SET', 'cluster-replica-no-failover', 'no');

$log = $g->error_log;
my @loading = $log =~ /127\.0\.0\.1:$ml: LOADING/g;
ok @loading >= 2, scalar(@loading) . ' LOADING replies: asked again';
like $log, qr/a node that cannot serve for \d+ms/, 'then the timeout: logged';
outage_books('LOADING', $pl, $before, $ml);

# -- CLUSTERDOWN: full coverage required, a master killed ------------------

ok $cluster->wait_ok(10), 'the cluster is ok';
@masters = $cluster->masters;
$per = $cluster->projects_per_master('d');
my $victim = $masters[2];
my $pd = $per->{$masters[0]};
$heir = $cluster->replica_of($victim);
$heir->cmd('CONFIG', 'SET', 'cluster-replica-no-failover', 'yes');
$_->cmd('CONFIG', 'SET', 'cluster-require-full-coverage', 'yes') for $cluster->live;
$before = outage_project('CLUSTERDOWN', $pd);

$cluster->node_by_port($victim)->kill9;
$node = $cluster->node_by_port($masters[0]);
ok wait_for(sub { ($node->cmd('GET', "credits:{$pd}:balance") // '') =~ /^CLUSTERDOWN/ }, 10),
    'a live master answers CLUSTERDOWN';

# the replica may take over 2 s later: timeout=6s outlasts the outage
@res = outage_requests('CLUSTERDOWN', $pd, sub {
    sleep 2;
    delete $heir->{sock};
    $heir->cmd('CONFIG', 'SET', 'cluster-replica-no-failover', 'no');
    return;
});
is $res[0][0], 200, 'CLUSTERDOWN, timeout=6s: 200 once the replica took over';
ok $res[0][1] >= 1.5, '... held back until then';
like $g->error_log, qr/127\.0\.0\.1:$masters[0]: CLUSTERDOWN/, 'CLUSTERDOWN logged';
ok $cluster->wait_ok(10), 'the cluster is ok again';
outage_books('CLUSTERDOWN', $pd, $before, $masters[0]);

done_testing;
