# Sentinel: credits_redis sentinel=NAME S1 S2 S3 against three real
# sentinels watching a master and its replica.  Charges on the master the
# sentinels name; SENTINEL FAILOVER under steady traffic: 200s again
# within 10 s, no reload, the books exact request by request; a sentinel
# that is down is skipped; protected sentinels (requirepass, an ACL user)
# with sentinel_password= and sentinel_user=, and 503 with a clear log
# line when those are wrong.
use strict;
use warnings;
use Test::More;
use Time::HiRes qw(sleep time);
use lib 't/lib';
use CreditsTest;
use CreditsManaged;

my $secret = 'sentinel-secret-0123456789abcdef';
write_file('hs.key', $secret);

my ($old, $new) = CreditsManaged::replicated_pair();
my $sentinels = CreditsManaged::Sentinels->start(master => $old);

# the gateway's ACL user of docs/redis.md on both nodes (the sentinels
# use the default user)
my $dpw = 'data-pw-0123';
is $_->cmd(CreditsManaged::documented_acl('credits', $dpw)), 'OK',
    'the documented ACL user on ' . $_->addr for $old, $new;

# what the ACL users were denied (failed logins aside)
sub denied {
    my ($node) = @_;
    return [ grep { my %e = @$_; $e{reason} ne 'auth' }
             @{ $node->cmd('ACL', 'LOG') } ];
}
my $up = CreditsTest::Upstream->start;

sub gateway {
    my ($settings) = @_;
    return CreditsManaged::gateway(upstream => $up, workers => 2, price => 2,
        redis => "credits_redis $settings timeout=500ms;")->start;
}

my $token = jwt_hs('HS256', $secret, { sub => 'sent', exp => time + 600 });
my %auth = (Authorization => "Bearer $token");

sub balance { $_[0]->cmd('GET', 'credits:{sent}:balance') }

# $n requests charged 2 each on $master; the requests, as traffic's
sub charges {
    my ($name, $ngx, $master, $n) = @_;
    my $before = balance($master);
    my @r = map { $ngx->get('/ai', %auth) } 1 .. $n;
    is_deeply [ map { $_->{status} } @r ], [ (200) x $n ], "$name: $n x 200"
        or diag $ngx->error_log;
    ok wait_for(sub { $master->cmd('ZCARD', 'credits:{sent}:holds') == 0 }, 5),
        "$name: settled";
    is balance($master), $before - 2 * $n, "$name: charged on the master";
    return [ map { as_traffic($_) } @r ];
}

sub as_traffic {
    my ($r) = @_;
    return { status => $r->{status}, hold => $r->{headers}{'x-hold'} // '-',
             start => 0, end => 0 };
}

# a gateway's workers ask the sentinels first: the requests until the
# first 200 (3 s at most), as traffic's
sub ready {
    my ($ngx) = @_;
    my @r;
    wait_for(sub {
        push @r, $ngx->get('/ai', %auth);
        $r[-1]{status} == 200;
    }, 3);
    return [ map { as_traffic($_) } @r ];
}

# -- the master the sentinels name ---------------------------------------

my $start = 1_000_000;
$old->cmd('SET', 'credits:{sent}:balance', $start);
my $list = join ' ', $sentinels->addrs;
my $ngx = gateway("sentinel=mymaster user=credits password=$dpw $list");
my $first = $ngx->get('/ai', %auth);
is $first->{status}, 200,
    'a request right after start waits for the master (no 503)'
    or diag $ngx->error_log;
my @before = (as_traffic($first), @{ ready($ngx) });
push @before, @{ charges('sentinel=mymaster', $ngx, $old, 5) };

# -- SENTINEL FAILOVER under traffic --------------------------------------

my @workers = sort $ngx->workers;
my $load = traffic($ngx, token => $token, clients => 3, seconds => 12);
sleep 1.5;
my $t0 = CreditsManaged::switch_over($old, $new,
    promote => sub { $sentinels->failover });
my $reqs = $load->finish;
ok wait_for(sub { $sentinels->master_addr eq $new->addr }, 10),
    'the sentinels name the replica now';

ok recovered($reqs, $t0, 10), 'back to 200 within 10 s of the failover';
is_deeply [ sort $ngx->workers ], \@workers, 'the same workers: no reload';
unshift @$reqs, @before;
books_exact('failover', $new, 'sent', $reqs, price => 2, start => $start);
charges('after the failover', $ngx, $new, 3);
is_deeply [ map { @{ denied($_) } } $old, $new ], [],
    'nothing denied to the documented ACL user';
unlike $ngx->error_log, qr/\Q$dpw\E/, 'its password is not in the log';
unlike $ngx->error_log, qr/\[alert\]|exited on signal/, 'no worker crashed';
$ngx->stop;

# -- a sentinel that is down is skipped -----------------------------------

my $dead = CreditsTest::free_port();
$ngx = gateway("sentinel=mymaster 127.0.0.1:$dead $list");
is $ngx->get('/ai', %auth)->{status}, 200,
    'the first sentinel down: a request right after start is served'
    or diag $ngx->error_log;
ready($ngx);
charges('the first sentinel down', $ngx, $new, 2);
$ngx->stop;

# -- protected sentinels ---------------------------------------------------

my $guarded = CreditsManaged::Sentinels->start(master => $new,
    name => 'guarded', auth => [ 'spw-0123' ],
    conf => "requirepass spw-0123\nsentinel sentinel-pass spw-0123\n");
is $_->cmd(CreditsManaged::documented_acl('credits-sentinel', 'gwpw-4567')),
    'OK', 'the documented sentinel user on ' . $_->addr for $guarded->all;
my $glist = join ' ', $guarded->addrs;

$ngx = gateway("sentinel=guarded sentinel_password=spw-0123 $glist");
ready($ngx);
charges('sentinel_password=', $ngx, $new, 2);
unlike $ngx->error_log, qr/spw-0123/, 'the password is not in the log';
$ngx->stop;

$ngx = gateway("sentinel=guarded sentinel_user=credits-sentinel "
               . "sentinel_password=gwpw-4567 $glist");
ready($ngx);
charges('sentinel_user= sentinel_password=', $ngx, $new, 2);
is_deeply [ map { @{ denied($_) } } $guarded->all ], [],
    'nothing denied to the documented sentinel user';
$ngx->stop;

for my $case ([ 'a wrong sentinel password',
                'sentinel_password=nope-8910', qr/WRONGPASS|AUTH failed/ ],
              [ 'no sentinel password', '', qr/NOAUTH/ ])
{
    my ($name, $credentials, $msg) = @$case;
    $ngx = gateway("sentinel=guarded $credentials $glist");
    my $before = balance($new);
    is $ngx->get('/ai', %auth)->{status}, 503, "$name: 503";
    my $r = $ngx->get('/open', %auth);
    is $r->{status}, 200, "$name, credits_fail open: forwarded";
    ok !exists $r->{headers}{'x-credits-held'}, "$name, open: nothing held";
    is balance($new), $before, "$name: balance untouched";
    like $ngx->error_log, $msg, "$name: the error log says why";
    unlike $ngx->error_log, qr/nope-8910/, "$name: no password in the log";
    # the worker with a settle no master takes gives up after timeout=
    ok $ngx->stop, "$name: the workers exit on QUIT";
}

done_testing;
