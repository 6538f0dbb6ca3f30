# Redis Cluster: a real loopback cluster of 3 masters and 3 replicas.
# Projects on every master charged exactly, runtime prices from the
# owner of credits:prices, two gateways racing on one project, a busy
# project's slot migrated under load, and a master killed under load.
use strict;
use warnings;
use Test::More;
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

# seeds: a replica first (it redirects), then a master
my ($replica) = grep { my $p = $_->port; !grep { $_ == $p } @masters }
                $cluster->nodes;
my $http = <<'END';
    credits_redis 127.0.0.1:%%SEED1%% 127.0.0.1:%%SEED2%% timeout=1s;
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%% backlog=512;
        location /ai {
            credits on;
            credits_price 2;
            credits_route ai;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /embed {
            credits on;
            credits_price 2;
            credits_route embed;
            credits_visitor $arg_vid;
            credits_visitor_limit 6 per 1h;
            credits_budget 10 per 1h;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
my %vars = (DIR => $dir, SEED1 => $replica->port, SEED2 => $masters[0]);
my $ngx = CreditsTest::Nginx->new(upstream => $up, workers => 2,
                                  vars => \%vars, http => $http)->start;

my %token;
sub token {
    my ($p) = @_;
    return $token{$p} //= jwt_hs('HS256', $secret, { sub => $p, exp => time + 600 });
}
sub get {
    my ($n, $p) = @_;
    return $n->get('/ai', Authorization => 'Bearer ' . token($p));
}
sub balance { $cluster->balance(@_) }
sub settled { $cluster->settled(@_) }
sub commits { $cluster->commits(@_) }

# -- every master's projects, charged exactly -----------------------------

my $per = $cluster->projects_per_master('p');
is scalar(keys %$per), 3, 'a project on each master';

for my $port (sort keys %$per) {
    my $p = $per->{$port};
    $cluster->cmd('SET', "credits:{$p}:balance", 50);
    my @st = map { get($ngx, $p)->{status} } 1 .. 10;
    is_deeply \@st, [ (200) x 10 ], "project $p on master $port: 10 x 200";
    ok settled($p), "project $p: settled";
    is balance($p), 30, "project $p: charged exactly 20";
    is commits($p), 10, "project $p: 10 commits in its ledger";
    my ($b, $c, $h) = audit($cluster, $p);
    is $b + $c + $h, 50, "project $p: the books add up";
}

# -- visitor limits and budgets on every master: the counters the hold
# is sent live in the project's slot, on its master --------------------

my $embed = $cluster->projects_per_master('e');

for my $port (sort keys %$embed) {
    my $p = $embed->{$port};
    $cluster->cmd('SET', "credits:{$p}:balance", 50);
    my @st = map { $ngx->get("/embed?vid=$_", Authorization => 'Bearer ' . token($p))->{status} }
             qw(a a a a b b b);
    is_deeply \@st, [200, 200, 200, 429, 200, 200, 429],
        "project $p on master $port: visitor a stops at 6, the budget at 10";
    ok settled($p), "project $p: settled";
    is balance($p), 40, "project $p: charged 10";
    my $node = $cluster->node_by_port($port);
    my @v = @{ $node->cmd('KEYS', "credits:{$p}:v:embed:*") };
    is scalar(@v), 2, "project $p: two visitor counters on its master";
    is_deeply [ sort map { $node->cmd('GET', $_) } @v ], [4, 6], '... at 6 and 4';
    my ($b) = @{ $node->cmd('KEYS', "credits:{$p}:b:embed:*") };
    is $node->cmd('GET', $b // ''), 10, '... and the budget at 10';
    my ($bal, $c, $h) = audit($cluster, $p);
    is $bal + $c + $h, 50, "project $p: the books add up";
}

# the map is right from the start: after the first requests, no MOVED
my $log = $ngx->error_log;
my $map_at = index $log, 'slot map from';
ok $map_at >= 0, 'the slot map was read';
like $log, qr/is a Redis Cluster/, 'cluster mode detected on connect';
unlike substr($log, rindex($log, 'slot map from')), qr/MOVED/,
    'no MOVED once the map is known: key slots computed as Redis does';

# -- NOSCRIPT on one node: loaded there, the same hold sent again ---------

my $pn = $per->{$masters[2]};
$cluster->node_by_port($masters[2])->cmd('SCRIPT', 'FLUSH');
is get($ngx, $pn)->{status}, 200, 'scripts flushed on a master: still 200';
settled($pn);
is balance($pn), 28, 'charged once';
like $ngx->error_log, qr/127\.0\.0\.1:$masters[2]: script "hold" not loaded, loading it again/,
    'the script was loaded on that node';

# -- db= other than 0 with a cluster: logged, credits_fail decides -------

my $ngx_db = CreditsTest::Nginx->new(upstream => $up,
    vars => { %vars, SEED1 => $masters[0] }, http => $http =~ s/timeout=1s/db=2 timeout=1s/r)->start;
ok wait_for(sub { $ngx_db->error_log =~ /is a Redis Cluster, which has no db 2/ }, 5),
    'db=2 with a cluster: an error in the log';
is get($ngx_db, $pn)->{status}, 503, 'and the location fails closed';
$ngx_db->stop;

# -- runtime prices from the owner of credits:prices ----------------------

my $p0 = $per->{$masters[1]};
$cluster->cmd('SET', "credits:{$p0}:balance", 100000);
$cluster->cmd('HSET', 'credits:prices', 'ai', 5);
ok wait_for(sub { (get($ngx, $p0)->{headers}{'x-credits-held'} // 0) == 5 }, 5),
    'a runtime price set on the owner of credits:prices applies';
$cluster->cmd('HDEL', 'credits:prices', 'ai');
my $removed = time;
ok wait_for(sub { (get($ngx, $p0)->{headers}{'x-credits-held'} // 0) == 2 }, 5),
    'and its removal too';
# each worker reads the prices on a timer of its own: the one that
# answered above may be the first; all have within 2 s (the race below
# counts on price 2 everywhere)
my $left = $removed + 2.5 - time;
sleep $left if $left > 0;
settled($p0);

# -- two gateways racing on one project: exact ---------------------------

my $ngx2 = CreditsTest::Nginx->new(upstream => $up, workers => 2,
                                   vars => \%vars, http => $http)->start;
my $race = 'racer';
$cluster->cmd('SET', "credits:{$race}:balance", 61);
my $codes = parallel(8, sub {
    my ($i) = @_;
    my $n = $i % 2 ? $ngx2 : $ngx;
    return join ',', map { get($n, $race)->{status} } 1 .. 12;
});
my %count;
$count{$_}++ for map { split /,/ } @$codes;
settled($race);
is $count{200}, 30, 'two gateways, 96 requests, 61 credits: 30 x 200';
is $count{402}, 66, 'the others 402';
is balance($race), 1, 'balance 1 left';
is commits($race), 30, 'one commit per 200';
$ngx2->stop;

# -- creditsctl on any node follows MOVED and ASK ------------------------

my $bin = $ENV{CREDITSCTL} || 'build/creditsctl';
sub ctl {
    my ($port, @args) = @_;
    my $out = `$bin --redis 127.0.0.1:$port @args 2>&1`;
    return ($? >> 8, $out);
}
my $pc = $per->{$masters[2]};
my ($rc, $ctl_out) = ctl($masters[0], 'topup', $pc, 100);
is $rc, 0, 'creditsctl topup through a node that does not own the project' or diag $ctl_out;
is balance($pc), 128, 'the top-up landed on the owner';
($rc, $ctl_out) = ctl($replica->port, 'balance', $pc);
is_deeply [$rc, $ctl_out], [0, "128\n"], 'creditsctl balance through a replica';
($rc, $ctl_out) = ctl($masters[1], 'audit', $pc, '--start', 50);
is $rc, 0, 'creditsctl audit on the cluster: the books balance' or diag $ctl_out;
my @before_archive = @{ ledger($cluster, $pc) };
($rc, $ctl_out) = ctl($masters[0], 'archive', $pc, '--before', '2999-01-01',
                      '--out', "$dir/archive.jsonl");
is $rc, 0, 'creditsctl archive through a node that does not own the project' or diag $ctl_out;
my @archived = map { /"id":"([^"]+)"/ } split /\n/, slurp("$dir/archive.jsonl");
is_deeply \@archived, [map { $_->{id} } @before_archive], '... the file holds its ledger';
is $cluster->cmd('XLEN', "credits:{$pc}:ledger"), 0, '... the ledger on the owner is empty';
($rc, $ctl_out) = ctl($masters[1], 'audit', $pc, '--start', 50);
is $rc, 0, 'creditsctl audit on the cluster from the checkpoint' or diag $ctl_out;
($rc) = ctl($masters[0], 'price', 'other', 9);
is $rc, 0, 'creditsctl price on the cluster';
is $cluster->cmd('HGET', 'credits:prices', 'other'), 9, 'the price is on the owner';
ctl($masters[0], 'price', 'other', '--unset');

# -- load: clients cycling over projects ----------------------------------

sub load_start {
    my ($n, $projects, $out) = @_;
    return CreditsCluster::load_start($n, $projects, $out,
                                      sub { get($ngx, $_[0]) });
}
*load_read = \&CreditsCluster::load_read;
*load_stop = \&CreditsCluster::load_stop;
*share_200 = \&CreditsCluster::share_200;

# -- a busy project's slot migrates under 4 clients -----------------------

my $mig = $per->{$masters[0]};
$cluster->cmd('SET', "credits:{$mig}:balance", 100000);
settled($mig);
my $start_commits = commits($mig);
my ($b0, $c0) = audit($cluster, $mig);

my $slot = $cluster->keyslot("credits:{$mig}:balance");

my $out = "$dir/mig";
my $pids = load_start(4, [$mig], $out);
sleep 1;
ok $cluster->migrating($slot, $masters[0], $masters[1]),
    'target importing, source migrating';
# 0.2 s between keys: the clients meet the slot half migrated
my $moved = $cluster->migrate_keys($slot, $masters[0], $masters[1], 0.2);
ok $moved >= 2, "$moved keys migrated one by one";
$cluster->assign($slot, $masters[1]);
sleep 1.5;
load_stop($pids, $out);

my $r = load_read(4, $out);
my %st;
$st{$_->{s}}++ for @$r;
diag 'migration: ' . join ' ', map { "$_=$st{$_}" } sort keys %st;
is_deeply [ grep { $_ != 200 && $_ != 503 } keys %st ], [],
    'migration: only 200 or 503';
ok share_200($r) >= 0.9, 'migration: at least 90 % 200';
ok settled($mig), 'migration: settled';
is $cluster->owner("credits:{$mig}:balance"), $masters[1],
    'the project now lives on the other master';
is commits($mig) - $start_commits, $st{200}, 'migration: one commit per 200';
my ($b1, $c1, $h1) = audit($cluster, $mig);
is $b1 + $c1 + $h1, $b0 + $c0, 'migration: the books are exact';
is $b0 - $b1, 2 * $st{200}, 'migration: 2 credits per 200, no more';
$log = $ngx->error_log;
like $log, qr/: ASK \d+ /, 'ASK redirections followed';
like $log, qr/: MOVED \d+ /, 'MOVED followed once the slot moved';

# -- a master killed under load --------------------------------------------

$per = $cluster->projects_per_master('k');
my $victim_port = $masters[2];
my $victim = $per->{$victim_port};
my @others = map { $per->{$_} } grep { $_ != $victim_port } sort keys %$per;
my %initial;
for my $p ($victim, @others) {
    $cluster->cmd('SET', "credits:{$p}:balance", 100000);
    settled($p);
    my ($b, $c) = audit($cluster, $p);
    $initial{$p} = [$b + $c, commits($p)];
}

# its replica: the node whose master is the victim
my $victim_node = $cluster->node_by_port($victim_port);
my $heir = $cluster->replica_of($victim_port);
ok $heir, 'the victim has a replica';

$out = "$dir/kill";
$pids = load_start(4, [$victim, @others], $out);
sleep 1.5;
my $killed_at = time;
$victim_node->kill9;
my $promoted = wait_for(sub {
    ($heir->cmd('INFO', 'replication') // '') =~ /role:master/ }, 20);
my $promoted_at = time;
ok $promoted, sprintf 'the replica was promoted after %.1f s',
                      $promoted_at - $killed_at;
# until the victim's project answers 200 again, at most 12 s
wait_for(sub {
    grep { $_->{p} eq $victim && $_->{s} == 200 && $_->{t} > $promoted_at }
        @{ load_read(4, $out) } }, 12);
sleep 1;
load_stop($pids, $out);

$r = load_read(4, $out);
my @v = grep { $_->{p} eq $victim } @$r;
my @o = grep { $_->{p} ne $victim } @$r;
my %vs;
$vs{$_->{s}}++ for @v;
diag 'killed master: its project ' . join(' ', map { "$_=$vs{$_}" } sort keys %vs)
   . sprintf(', others %.1f %% 200', 100 * share_200(\@o));
is_deeply [ grep { $_->{s} != 200 && $_->{s} != 503 } @$r ], [],
    'killed master: only 200 or 503';
my ($back) = grep { $_->{s} == 200 && $_->{t} > $killed_at + 0.5 } @v;
ok $back && $back->{t} <= $promoted_at + 10,
    'its project answers 200 again within 10 s of the promotion, no reload';
ok !grep({ $_->{s} == 503 && $_->{t} > $back->{t} + 1 } @v),
    'and no 503 after that' if $back;
ok !grep({ $_->{s} == 503 && $_->{t} < $killed_at - 0.1 } @v),
    'no 503 before the kill';
ok share_200(\@o) >= 0.9, 'the other masters\' projects: at least 90 % 200';

for my $p (@others) {
    ok settled($p), "project $p: settled";
    my ($b, $c, $h) = audit($cluster, $p);
    is $b + $c + $h, $initial{$p}[0], "project $p: the books are exact";
    is commits($p) - $initial{$p}[1], scalar(grep { $_->{p} eq $p && $_->{s} == 200 } @o),
        "project $p: one commit per 200";
}
ok balance($victim) > 0, 'no overdraft on the victim\'s project';

done_testing;
