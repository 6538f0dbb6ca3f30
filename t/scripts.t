# The hold and settle scripts run directly in a real Redis, the way nginx
# loads them (the shared head, then the script): the shape of the hold
# batch's flat reply, what a settle makes of every kind of charged
# argument, the expiry step, and that the books balance after all of it.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;

test_dir();
my $lua = 'ngx_credits_module/lua';
my $head = CreditsTest::slurp("$lua/expire.lua");
my $redis = CreditsTest::Redis->start;
my %sha = map { ($_ => $redis->cmd('SCRIPT', 'LOAD',
                                   $head . CreditsTest::slurp("$lua/$_.lua"))) }
              qw(hold settle move);

my $p = 'scripts';
my @keys = map { "credits:{$p}:$_" } qw(balance holds ledger);
my $start = 20;
$redis->cmd('SET', $keys[0], $start);

# member, price, ttl per hold; no window counters (below)
sub hold {
    my @a = @_;
    my @args;
    push @args, splice(@a, 0, 3), '' while @a;
    $redis->cmd('EVALSHA', $sha{hold}, 3, @keys, @args);
}
# settles, four arguments each as the module has them (settle_args() adds
# the member's parts)
sub settle {
    my @a = @_;
    my @args;
    push @args, settle_args(splice @a, 0, 4) while @a;
    $redis->cmd('EVALSHA', $sha{settle}, 3, @keys, @args);
}
sub entry {
    my ($id) = @_;
    my ($e) = grep { $_->{request_id} eq $id } @{ ledger($redis, $p) };
    return $e;
}
sub books_balance {
    my ($name) = @_;
    my ($balance, $charged, $held) = audit($redis, $p);
    is $balance + $charged + $held, $start, "$name: balance + charged + held = $start";
}

# one batch: placed, placed, too low, a repeated id; code and balance for
# each, flat
my $t0 = $redis->cmd('TIME');
my $r = hold('a:5:gen', 5, 60000, 'b:10:gen', 10, 60000,
             'c:6:gen', 6, 60000, 'a:5:gen', 5, 60000);
is_deeply $r, [1, 15, 1, 5, 0, 5, -1, 5],
    'hold batch: code, balance per hold, in one flat array';
is $redis->cmd('GET', $keys[0]), 5, 'hold batch: one debit of the placed holds';
my $score = $redis->cmd('ZSCORE', $keys[1], 'a:5:gen');
my $now = $t0->[0] * 1000 + int($t0->[1] / 1000);
like $score, qr/^\d+$/, 'hold: the expiry is a whole number of ms';
cmp_ok abs($score - ($now + 60000)), '<', 2000, 'hold: expires ttl ms from now';
books_balance('after holds');

# a price or ttl that is not a whole number anywhere in the batch: an
# error, and nothing of the batch written (a fraction used to fail at the
# DECRBY, after the holds were placed)
for my $bad ([1, 'soon'], ['0.5', 60000], ['-1', 60000], [1, '1e3'],
             ['1000000000000000', 60000], ['', 60000]) {
    my $r = hold('x:1:gen', 1, 60000, 'y:1:gen', @$bad);
    like "$r", qr/not a whole number/, "hold: price '$bad->[0]', ttl '$bad->[1]' is an error";
    is $redis->cmd('ZCARD', $keys[1]), 2, '... and nothing of the batch is written';
    is $redis->cmd('GET', $keys[0]), 5, '... nor debited';
}

# a balance that is not a whole number: an error before anything is
# written (DECRBY would have failed after the ZADD)
$redis->cmd('SET', $keys[0], '5.5');
like '' . hold('z:1:gen', 1, 60000), qr/is not a whole number/, 'hold: a fractional balance is an error';
is $redis->cmd('ZCARD', $keys[1]), 2, '... and nothing is written';
$redis->cmd('SET', $keys[0], 5);

# settle: charged as the module sends it, and every malformed kind
my @cases = (
    [ 'equal',    5, '5',   5, 0 ],
    [ 'less',     5, '2',   2, 3 ],
    [ 'zero',     5, '0',   0, 5 ],
    [ 'negative', 5, '-4',  0, 5 ],
    [ 'fraction', 5, '2.7', 2, 3 ],
    [ 'above',    5, '9',   5, 0 ],
    [ 'junk',     5, 'x',   5, 0 ],
);
$redis->cmd('SET', $keys[0], 100);
$start = 100 + 15;    # the two holds still open above
for my $c (@cases) {
    my ($name, $held, $arg, $charged, $refund) = @$c;
    my $member = "$name:$held:gen";
    hold($member, $held, 60000);
    my $before = $redis->cmd('GET', $keys[0]);
    is_deeply settle($member, $arg, 200, 'commit'), [1], "settle $name: settled";
    my $e = entry($name);
    is $e->{charged}, $charged, "settle $name ($arg): charged $charged";
    is $e->{held}, $held, "settle $name: held recorded";
    like $e->{ts}, qr/^\d{13}$/, "settle $name: ts in whole ms";
    is $redis->cmd('GET', $keys[0]) - $before, $refund, "settle $name: refunded $refund";
}
books_balance('after settles');

is_deeply settle('equal:5:gen', '5', 200, 'commit'), [0], 'settle: twice changes nothing';
books_balance('after a second settle');

# the member's id, held and route come ready-made (nginx splits the
# member it wrote): a held that is not a whole number is an error for
# that settle alone, written nowhere; the hold stays for its settle
hold('parts:3:gen', 3, 60000);
my $parts = $redis->cmd('EVALSHA', $sha{settle}, 3, @keys,
                        'parts:3:gen', 3, 200, 'commit', 'parts', '3x', 'gen',
                        settle_args('less:5:gen', 5, 200, 'commit'));
like "$parts->[0]", qr/held "3x" is not a whole number/,
    'settle: a held that is not a whole number is an error';
is $parts->[1], 0, '... the batch goes on';
ok defined $redis->cmd('ZSCORE', $keys[1], 'parts:3:gen'), '... the hold stays';
ok !entry('parts'), '... with no ledger entry';
is_deeply settle('parts:3:gen', 3, 200, 'commit'), [1], '... and is settled with its parts';
like '' . $redis->cmd('EVALSHA', $sha{settle}, 3, @keys, 'a:1:g', 1, 200, 'commit'),
    qr/not member, charged, status, outcome, id, held, route/,
    'settle: four arguments a hold are an error';
books_balance('after settles with their parts');

# expiry: a hold whose time is up is refunded by the next script call
hold('late:4:gen', 4, 1);
select undef, undef, undef, 0.05;
my $before = $redis->cmd('GET', $keys[0]);
is_deeply settle('nobody:1:gen', '1', 200, 'commit'), [0], 'expire: runs before any settle';
is $redis->cmd('GET', $keys[0]) - $before, 4, 'expire: the hold is refunded';
my $e = entry('late');
is_deeply [ @$e{qw(outcome held charged status)} ], ['expire', 4, 0, 0],
    'expire: ledger entry';
like $e->{ts}, qr/^\d{13}$/, 'expire: ts in whole ms';
books_balance('after expiry');

# window counters: a member "<id>;<ref>...:<held>:<route>" names them
# (for settle, expiry and move), and the hold gets them ready-made after
# its member, price and ttl: N, then key, limit, PXAT, budget name for
# each; all or nothing, and back on release, commit below the price,
# expiry and move
my $win = int(time() / 3600) * 3600;
my $vref = "v,w,3600,$win,abc";
my $bref = "b,w,3600,$win";
my ($vkey, $bkey) = map { "credits:{$p}:" . s/,/:/gr } $vref, $bref;
my $pxat = ($win + 3600) * 1000 + 60000;
sub vc { ($vkey, $_[0], $pxat, '') }
sub bc { ($bkey, $_[0], $pxat, 'w') }
sub hold4 { $redis->cmd('EVALSHA', $sha{hold}, 3, @keys, @_) }
sub move { $redis->cmd('EVALSHA', $sha{move}, 3, @keys, @_) }
{
    my (undef, $charged, $held) = audit($redis, $p);
    $redis->cmd('SET', $keys[0], 100);
    $start = 100 + $charged + $held;
}

$r = hold4("w1;$vref;$bref:2:w", 2, 60000, 2, vc(3), bc(10),
           "w2;$vref;$bref:2:w", 2, 60000, 2, vc(3), bc(10));
is_deeply $r, [1, 98, 2, 3], 'counters: the second hold would pass the visitor limit of 3: code 2, the limit';
is $redis->cmd('GET', $vkey), 2, '... the visitor counter holds the first';
is $redis->cmd('GET', $bkey), 2, '... and so does the budget';
cmp_ok $redis->cmd('PTTL', $vkey), '<=', ($win + 3600 - time()) * 1000 + 61000,
    '... expiring a minute after the window';
cmp_ok $redis->cmd('PTTL', $vkey), '>', ($win + 3600 - time()) * 1000 + 58000,
    '... at the PXAT the hold gave';
is $redis->cmd('ZSCORE', $keys[1], "w2;$vref;$bref:2:w"), undef, '... the refused hold is not placed';

$redis->cmd('HSET', "credits:{$p}:budgets", 'w', 3);
is_deeply hold4("w3;$bref:2:w", 2, 60000, 1, bc(10)), [3, 3],
    "counters: the project's own budget (3) over the configured one: code 3";
$redis->cmd('HSET', "credits:{$p}:budgets", 'w', 'lots');
is_deeply hold4("w3;$bref:2:w", 2, 60000, 1, bc(4)), [1, 96],
    '... one that is not a whole number is ignored';
$redis->cmd('HDEL', "credits:{$p}:budgets", 'w');
is $redis->cmd('GET', $bkey), 4, '... the budget counts both';

# a malformed counter anywhere in the batch: an error, nothing written
for my $bad (['x', vc(1)], [2, vc(1)], [1, $vkey, '1.5', $pxat, ''],
             [1, $vkey, 1, 'soon', ''], [1, $vkey, 1, $pxat],
             [1, "credits:{other}:v:w:3600:$win:abc", 1, $pxat, ''],
             [-1, vc(1)]) {
    like '' . hold4('w5:1:w', 1, 60000, '', "w4;$vref:1:w", 1, 60000, @$bad),
        qr/not valid|not member, price/, "counters: '@$bad' is an error";
}
is $redis->cmd('ZCARD', $keys[1]), 4, '... and nothing of those batches is written';
is $redis->cmd('GET', $vkey), 2, '... nor counted';
like '' . hold4(), qr/no holds/, 'hold: no holds is an error';

# a move reads members: a malformed one is an error
for my $bad ("w4;$vref", "w4;$vref:x:w", "w4;$vref:1", 'w4;x,w,1,1:1:w') {
    like '' . move("w3;$bref:2:w", $bad, 60000, '1'),
        qr/not valid|is not <id>:<held>:<route>/, "move: member '$bad' is an error";
}

is_deeply settle("w3;$bref:2:w", 1, 200, 'commit'), [1], 'counters: commit at 1 of 2';
is $redis->cmd('GET', $bkey), 3, '... the budget keeps 1 of it';
is_deeply settle("w1;$vref;$bref:2:w", 0, 500, 'release'), [1], 'counters: release';
is $redis->cmd('GET', $vkey), 0, '... the visitor gets all back';
is $redis->cmd('GET', $bkey), 1, '... the budget too';
is entry('w1')->{request_id}, 'w1', '... the ledger has the hold id alone';

# move: the new member's counters take what they did not hold, the old
# member's others give it back; refused by a limit, nothing changes
my $v2ref = "v,x,3600,$win,abc";
my $v2key = "credits:{$p}:" . ($v2ref =~ s/,/:/gr);
hold4("m1;$vref:2:w", 2, 60000, 1, vc(3));
is_deeply move("m1;$vref:2:w", "m1;$vref;$v2ref:3:x", 60000, '3,2'), [2, 2],
    'move: 3 more than the other visitor limit of 2: code 2, the limit';
is $redis->cmd('GET', $vkey), 2, '... the old counter unchanged';
is_deeply move("m1;$vref:2:w", "m1;$vref;$v2ref:3:x", 60000, '3,5'), [1, 96],
    'move: to two counters, grown to 3';
is $redis->cmd('GET', $vkey), 3, '... the shared counter takes the growth';
is $redis->cmd('GET', $v2key), 3, '... the new one all of it';
is_deeply move("m1;$vref;$v2ref:3:x", "m1;$v2ref:3:y", 60000, '5'), [1, 96],
    'move: to one of them';
is $redis->cmd('GET', $vkey), 0, '... the one left gets it back';
is $redis->cmd('GET', $v2key), 3, '... the other keeps it';

# expiry gives back too
hold4("e1;$v2ref:1:y", 1, 1, 1, $v2key, 5, $pxat, '');
is $redis->cmd('GET', $v2key), 4, 'expire: a short hold counted';
select undef, undef, undef, 0.05;
settle('nobody:1:gen', '1', 200, 'commit');
is $redis->cmd('GET', $v2key), 3, 'expire: given back';
is entry('e1')->{outcome}, 'expire', '... with its entry';
books_balance('after the counters');

done_testing;
