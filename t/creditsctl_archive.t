# creditsctl archive: older ledger entries go to a JSON-lines file and
# their totals to credits:{P}:checkpoint, and the audit still proves the
# invariant from the checkpoint plus the entries left.  A rerun is a
# no-op; an archive stopped between its file and its script (Redis
# paused, the client gone) neither loses nor double counts; archives and
# audits racing with the gateway's own scripts stay exact.
use strict;
use warnings;
use Test::More;
use JSON::PP;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use CreditsTest;

my $bin = $ENV{CREDITSCTL} || 'build/creditsctl';
my $dir = test_dir();
my $redis = CreditsTest::Redis->start;
my $addr = $redis->addr;
my $p = 'arch';
my @keys = map { "credits:{$p}:$_" } qw(balance holds ledger);
my $cpkey = "credits:{$p}:checkpoint";
my $file = "$dir/ledger.jsonl";

sub ctl {
    my $out = `$bin --redis $addr @_ 2>&1`;
    return ($? >> 8, $out);
}

# the gateway's own scripts, as nginx loads them
my $lua = 'ngx_credits_module/lua';
my $head = slurp("$lua/expire.lua");
my %sha = map { ($_ => $redis->cmd('SCRIPT', 'LOAD', $head . slurp("$lua/$_.lua"))) }
              qw(hold settle);

# $n requests as nginx makes them: commits, releases, a few left open
my $req = 0;
sub traffic {
    my ($n) = @_;
    for (1 .. $n) {
        $req++;
        my $m = "r$req:5:gen";
        $redis->cmd('EVALSHA', $sha{hold}, 3, @keys, $m, 5, 600000, '');
        next if $req % 97 == 0;                     # left open
        $redis->cmd('EVALSHA', $sha{settle}, 3, @keys,
                    settle_args($m, $req % 6, $req % 11 ? 200 : 502,
                                $req % 11 ? 'commit' : 'release'));
        system("$bin --redis $addr topup $p 50 >/dev/null") if $req % 500 == 0;
    }
}
sub entries { $redis->cmd('XRANGE', $keys[2], '-', '+') }
sub file_lines {
    open my $f, '<', $file or return [];
    return [ map { decode_json($_) } <$f> ];
}
sub audit_ok {
    my ($what) = @_;
    my ($rc, $out) = ctl('--json', 'audit', $p);
    my $a = eval { decode_json($out) } || {};
    ok $rc == 0 && $a->{ok}, "audit: $what" or diag $out;
    return $a;
}

ctl('topup', $p, 20000);
traffic(2600);
my $old = entries();
my $cut = $old->[-1][0];
my ($cut_ms) = $cut =~ /^(\d+)-/;
sleep 0.01;    # the second half in later milliseconds
traffic(900);
my $all = entries();
my $before = audit_ok('before the archive');
cmp_ok $redis->cmd('ZCARD', $keys[1]), '>', 20, 'open holds';

# -- archive the first half: three pages ---------------------------------

my $when = $cut_ms + 1;
my ($rc, $out) = ctl('archive', $p, '--before', $when, '--out', $file);
is $rc, 0, "archive --before $when (ms)" or diag $out;
like $out, qr/^archived ${\ scalar @$old} entries/m, '... reports the entries it moved';

my $lines = file_lines();
is_deeply [map { $_->{id} } @$lines], [map { $_->[0] } @$old],
    'FILE has exactly the archived entries, oldest first';
is_deeply $lines, [map { { id => $_->[0], project => $p, @{ $_->[1] } } } @$old],
    '... each with its id and every field as stored';
my $left = entries();
is_deeply [map { $_->[0] } @$left], [map { $_->[0] } @$all[@$old .. $#$all]],
    'the ledger keeps exactly the entries after the cut';

my %cp = @{ $redis->cmd('HGETALL', $cpkey) };
my ($charged, $topups) = (0, 0);
for (@$lines) {
    if ($_->{outcome} eq 'topup') { $topups += $_->{amount} }
    else { $charged += $_->{charged} }
}
is_deeply \%cp, { entries => scalar @$old, charged => $charged,
                  topups => $topups, last_id => $cut },
    'the checkpoint: the archived totals, count and last id';

my $after = audit_ok('checkpoint + the entries left');
is_deeply [@$after{qw(charged topups balance held)}],
          [@$before{qw(charged topups balance held)}],
    '... the same sums as before the archive';
is $after->{archived}, scalar @$old, '... and says how many are archived';

# -- a rerun is a no-op ---------------------------------------------------

my $bytes = slurp($file);
($rc, $out) = ctl('archive', $p, '--before', $when, '--out', $file);
is $rc, 0, 'archive again';
like $out, qr/^archived 0 entries/m, '... moves nothing';
is slurp($file), $bytes, '... the file unchanged';
is_deeply { @{ $redis->cmd('HGETALL', $cpkey) } }, \%cp, '... the checkpoint unchanged';
is $redis->cmd('XLEN', $keys[2]), scalar @$left, '... the ledger unchanged';

# -- stopped between the file and the script ------------------------------

# Redis holds writes (the script) but serves reads: the archive writes its
# first page, waits for the script's reply, gives up after 2 s and exits;
# its connection closes, so the script never runs.
traffic(1500);
my $now = $redis->cmd('TIME');
my $t2 = $now->[0] * 1000 + int($now->[1] / 1000) + 1;
my $pending = entries();
$redis->cmd('CLIENT', 'PAUSE', 10000, 'WRITE');
($rc, $out) = ctl('archive', $p, '--before', $t2, '--out', $file);
$redis->cmd('CLIENT', 'UNPAUSE');
is $rc, 3, 'an archive whose script got no answer stops with exit 3' or diag $out;
my $written = file_lines();
is scalar(@$written), @$lines + 1000, '... after writing one page to the file';
is_deeply { @{ $redis->cmd('HGETALL', $cpkey) } }, \%cp,
    '... the checkpoint did not move';
is $redis->cmd('XLEN', $keys[2]), scalar @$pending, '... nothing left the ledger';
audit_ok('entries in the file and still in the ledger count once');

# and a line cut short, as a crash in the middle of a write leaves it
open my $f, '>>', $file or die $!;
print $f '{"id":"99999999999999-0","project":"arch","rou';
close $f;

($rc, $out) = ctl('archive', $p, '--before', $t2, '--out', $file);
is $rc, 0, 'the archive run again completes' or diag $out;
like $out, qr/cut short/, '... the cut line removed, and said so';
$lines = file_lines();
my @ids = map { $_->{id} } @$lines;
my %seen;
is scalar(grep { $seen{$_}++ } @ids), 0, '... no entry twice in the file';
is_deeply \@ids, [map { $_->[0] } @$old, @$pending],
    '... the file holds every entry archived, in order';
is $redis->cmd('XLEN', $keys[2]), 0, '... the ledger is empty';
%cp = @{ $redis->cmd('HGETALL', $cpkey) };
($charged, $topups) = (0, 0);
for (@$lines) {
    if ($_->{outcome} eq 'topup') { $topups += $_->{amount} }
    else { $charged += $_->{charged} }
}
is_deeply [@cp{qw(entries charged topups)}], [scalar @$lines, $charged, $topups],
    '... the checkpoint: the totals of the file, counted once';
audit_ok('after the interrupted archive completed');

# -- TIME forms and bad input ---------------------------------------------

traffic(30);
my $id = entries()->[10][0];
($rc, $out) = ctl('archive', $p, '--before', $id, '--out', $file);
is $rc, 0, 'archive --before a stream id';
like $out, qr/^archived 10 entries/m, '... moves the entries before that id';
($rc, $out) = ctl('archive', $p, '--before', '2001-01-01', '--out', $file);
like $out, qr/^archived 0 entries/m, 'archive --before a past ISO date: nothing';
($rc, $out) = ctl('--json', 'archive', $p, '--before', '2999-01-01T00:00:00Z',
                  '--out', $file);
my $j = eval { decode_json($out) } || {};
is $j->{archived}, 20, 'archive --before a future ISO time, --json: the rest';
is $j->{checkpoint}{last_id}, $redis->cmd('HGET', $cpkey, 'last_id'),
    '... reports the checkpoint';
for my $bad (['2024-02-30x'], ['yesterday'], ['2024-13-01'], ['1-2-3']) {
    ($rc) = ctl('archive', $p, '--before', @$bad, '--out', $file);
    is $rc, 2, "--before @$bad: exit 2";
}
($rc) = ctl('archive', $p, '--before', 1);
is $rc, 2, 'no --out: exit 2';
($rc, $out) = ctl('archive', 'other', '--before', $t2, '--out', $file);
is $rc, 2, 'a file that archives another project: exit 2';
audit_ok('after every form');

# -- archives and audits racing with the gateway -------------------------

my $stop = "$dir/stop";
my $results = parallel(3, sub {
    my ($i) = @_;
    delete $redis->{sock};
    if ($i == 0) {
        my $n = 0;
        until (-e $stop) { traffic(1); $n++ }
        return $n;
    }
    if ($i == 1) {
        my @rc;
        for (1 .. 6) {
            sleep 0.3;
            my $t = $redis->cmd('TIME');
            push @rc, system("$bin --redis $addr archive $p --before "
                             . ($t->[0] * 1000 + int($t->[1] / 1000) - 100)
                             . " --out $file >/dev/null") >> 8;
        }
        write_file('stop', '');
        return "@rc";
    }
    my @rc;
    until (-e $stop) {
        push @rc, system("$bin --redis $addr audit $p >/dev/null 2>&1") >> 8;
    }
    return "@rc";
});
diag "racing: $results->[0] requests; archive exits $results->[1]; "
    . 'audits: ' . scalar(split ' ', $results->[2]);
is $results->[1], '0 0 0 0 0 0', 'every archive beside the traffic succeeded';
ok !(grep { $_ } split ' ', $results->[2]),
    'every audit during traffic and archives passed';
$lines = file_lines();
%seen = ();
is scalar(grep { $seen{$_->{id}}++ } @$lines), 0, 'no entry twice in the file';
is $redis->cmd('HGET', $cpkey, 'entries'), scalar @$lines,
    'the checkpoint counts every line of the file';
audit_ok('after the race');

done_testing;
