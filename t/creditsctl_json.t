# creditsctl --json is valid JSON whatever Redis holds (quotes, backslashes,
# control and NUL bytes, bytes that are not UTF-8, numbers of any size);
# `price` takes only what the gateway takes; each exit status class.
use strict;
use warnings;
use Test::More;
use JSON::PP;
use lib 't/lib';
use CreditsTest;

my $bin = $ENV{CREDITSCTL} || 'build/creditsctl';
my $dir = test_dir();
my $redis = CreditsTest::Redis->start;
my $addr = $redis->addr;

# stdout and stderr apart, and the exit status
sub ctl {
    my $out = `$bin --redis $addr @_ 2>$dir/stderr`;
    return ($? >> 8, $out, slurp("$dir/stderr"));
}

# the document, or undef with the parser's complaint
sub json {
    my ($what, $text) = @_;
    my $doc = eval { JSON::PP->new->utf8->decode($text) };
    ok defined $doc, "$what: valid JSON" or diag "$@: $text";
    return $doc;
}

my $FFFD = "\x{fffd}";

# ---- prices ---------------------------------------------------------------

my %stored = (
    ok          => '7',
    zeros       => '007',
    max         => '999999999999999',
    zero        => '0',
    sixteen     => '1000000000000000',
    huge        => '99999999999999999999',
    word        => 'abc',
    neg         => '-1',
    frac        => '1.5',
    empty       => '',
    quoted      => "a\"b\\c\x01\n",
    "nul\0byte" => "5\0",
    "ctl\x01\x1f\n" => '3',
    "q\"uote\\" => '2',
    "bad\xff\xfe" => '4',
    "pr\xc3\xa9is \xe2\x82\xac" => '6',
    "surrogate\xed\xa0\x80" => "\xc0\xaf",
);
$redis->cmd('HSET', 'credits:prices', %stored);

my ($rc, $out) = ctl('--json', 'prices');
is $rc, 0, 'prices --json: exit 0';
my $prices = json('prices --json', $out) || {};
is_deeply $prices, {
    ok => 7, zeros => 7, max => 999999999999999, zero => 0,
    sixteen => { invalid => '1000000000000000' },
    huge => { invalid => '99999999999999999999' },
    word => { invalid => 'abc' },
    neg => { invalid => '-1' },
    frac => { invalid => '1.5' },
    empty => { invalid => '' },
    quoted => { invalid => "a\"b\\c\x01\n" },
    "nul\0byte" => { invalid => "5\0" },
    "ctl\x01\x1f\n" => 3,
    "q\"uote\\" => 2,
    "bad$FFFD$FFFD" => 4,
    "pr\x{e9}is \x{20ac}" => 6,
    "surrogate$FFFD$FFFD$FFFD" => { invalid => "$FFFD$FFFD" },
}, 'prices --json: a price as a number, what the gateway ignores as '
   . '{"invalid":...}, bytes that are not UTF-8 as U+FFFD';
like $out, qr/"zeros":7[,}]/, 'a stored 007 is printed as the number 7';

($rc, $out) = ctl('prices');
like $out, qr/^ok\s+7$/m, 'prices: a price';
like $out, qr/^word\s+abc  \(invalid: the gateway charges the configured price\)$/m,
    'prices: an ignored override is marked';

($rc, $out) = ctl('--json', 'price', 'word');
is_deeply json('price word --json', $out),
    { route => 'word', price => { invalid => 'abc' } },
    'price --json: an ignored override';
($rc, $out) = ctl('--json', 'price', 'huge');
is_deeply json('price huge --json', $out),
    { route => 'huge', price => { invalid => '99999999999999999999' } },
    'price --json: a huge number is not a price';
($rc, $out) = ctl('--json', 'price', 'nothing');
is_deeply json('price nothing --json', $out),
    { route => 'nothing', price => undef }, 'price --json: no override';
($rc, $out) = ctl('--json', 'price', q('a"b\\'), 3);
is_deeply json('price of a route with a quote', $out),
    { route => 'a"b\\', price => 3 }, 'a route name is escaped';

# `price ROUTE N` takes what credits_price takes: 0 to 15 digits
for my $bad ('1000000000000000', '99999999999999999999', '-1', '-0', '+1',
             "' 1'", '1e3', '0x10', '1.0', "''", 'ten') {
    ($rc, $out, my $err) = ctl('price', 'gen', $bad);
    is $rc, 2, "price gen $bad: usage error";
    like $err, qr/^creditsctl: invalid price .*: 1 to 15 decimal digits, as credits_price$/, '... and says why';
}
is $redis->cmd('HEXISTS', 'credits:prices', 'gen'), 0, 'and nothing stored';
($rc, $out) = ctl('price', 'gen', '999999999999999');
is_deeply [$rc, $out], [0, "999999999999999\n"], '15 digits are a price';
($rc, $out) = ctl('price', 'gen', '007');
is_deeply [$rc, $out], [0, "7\n"], '007 is stored as 7';
is $redis->cmd('HGET', 'credits:prices', 'gen'), '7', '... in the hash';

# ---- holds ----------------------------------------------------------------

my $h = 'credits:{h1}:holds';
my $later = (time + 600) * 1000;
my $long = 'x' x 100;
$redis->cmd('ZADD', $h, 1, 'garbage', $later, 'good:5:gen',
            $later + 1, ':5:gen', $later + 2, 'id:x:gen',
            $later + 3, 'id:-5:gen', $later + 4, 'id:99999999999999999999:gen',
            $later + 5, "id\"q:3:r\\o\x01\xff", $later + 6, "$long:2:long",
            $later + 7, 'nobody:4:', $later + 8, "ctl\x02:1\0:gen",
            '+inf', 'forever:1:gen');

($rc, $out) = ctl('--json', 'holds', 'h1');
is $rc, 0, 'holds --json: exit 0';
my $holds = json('holds --json', $out) || [];
is_deeply [map { { %$_, expires_in => undef } } @$holds], [
    { invalid => 'garbage', expires_in => undef },
    { hold_id => 'good', held => 5, route => 'gen', expires_in => undef },
    { invalid => ':5:gen', expires_in => undef },
    { invalid => 'id:x:gen', expires_in => undef },
    { invalid => 'id:-5:gen', expires_in => undef },
    { invalid => 'id:99999999999999999999:gen', expires_in => undef },
    { hold_id => 'id"q', held => 3, route => "r\\o\x01$FFFD", expires_in => undef },
    { hold_id => $long, held => 2, route => 'long', expires_in => undef },
    { hold_id => 'nobody', held => 4, route => '', expires_in => undef },
    { invalid => "ctl\x02:1\0:gen", expires_in => undef },
    { hold_id => 'forever', held => 1, route => 'gen', expires_in => undef },
], 'holds --json: every member, the unparseable ones as {"invalid":...}';
cmp_ok $holds->[1]{expires_in}, '>', 590, 'expires_in of a hold';
cmp_ok $holds->[0]{expires_in}, '<', 0, 'expires_in of a hold past its time';
is $holds->[-1]{expires_in}, undef, 'a hold that never expires: null';

($rc, $out) = ctl('holds', 'h1');
like $out, qr/^garbage\s+\?\s+\(not <id>:<held>:<route>\)/m,
    'holds: an unparseable member is listed and marked';

# the audit counts what the scripts would refund: members it cannot read
# hold nothing, and it says so on stderr
$redis->cmd('SET', 'credits:{h1}:balance', -15);
($rc, $out, my $err) = ctl('--json', 'audit', 'h1');
my $audit = json('audit --json', $out) || {};
is $audit->{held}, 15, 'audit: the readable holds are summed';
is $rc, 0, 'audit: exit 0 (start 0 + 0 = -15 + 0 + 15)';
is scalar(() = $err =~ /^creditsctl: open hold ".*" is not <id>:<held>:<route>: counted as 0$/mg),
    6, 'audit: each unreadable member named on stderr';

# ---- ledger ---------------------------------------------------------------

my $l = 'credits:{l1}:ledger';
$redis->cmd('XADD', $l, '*', 'outcome', 'commit', 'route', "a\"b\\c\x01\xff",
            'held', 3, 'charged', 'abc', 'request_id', "\xc3\x28\0", 'ts', 1);
$redis->cmd('XADD', $l, '*', 'outcome', "top\nup", 'amount', '1e99');
($rc, $out) = ctl('--json', 'ledger', 'l1');
is $rc, 0, 'ledger --json: exit 0';
my $ledger = json('ledger --json', $out) || [];
is_deeply [map { delete $_->{id}; $_ } @$ledger], [
    { outcome => 'commit', route => "a\"b\\c\x01$FFFD", held => '3',
      charged => 'abc', request_id => "$FFFD(\0", ts => '1' },
    { outcome => "top\nup", amount => '1e99' },
], 'ledger --json: every field escaped';

# an amount the audit cannot read is a data error, not a zero
($rc, $out, $err) = ctl('audit', 'l1');
is $rc, 3, 'audit of a ledger entry whose charged is not a number: exit 3';
like $err, qr/^creditsctl: ledger entry [\d-]+: charged is not a whole number$/,
    '... naming the entry';
$redis->cmd('XADD', 'credits:{l2}:ledger', '*', 'outcome', 'topup',
            'amount', '99999999999999999999');
($rc, $out, $err) = ctl('audit', 'l2');
is $rc, 3, 'audit of a top-up beyond a 64-bit integer: exit 3';
$redis->cmd('XADD', 'credits:{l3}:ledger', '*', 'outcome', 'topup',
            'amount', '9223372036854775807') for 1 .. 2;
($rc, $out, $err) = ctl('audit', 'l3');
is $rc, 3, 'audit whose sums overflow: exit 3';
like $err, qr/overflow/, '... and says so';

# ---- balance and the exit status classes ---------------------------------

$redis->cmd('SET', 'credits:{b1}:balance', -5);
($rc, $out) = ctl('--json', 'balance', 'b1');
is_deeply [$rc, json('balance --json', $out)], [0, { project => 'b1', balance => -5 }],
    '0: a negative balance';

for my $v ('abc', '99999999999999999999', '1.5', '') {
    $redis->cmd('SET', 'credits:{b2}:balance', $v);
    ($rc, $out, $err) = ctl('balance', 'b2');
    is $rc, 3, "3: a balance of '$v' is a data error";
    like $err, qr/^creditsctl: credits:\{b2\}:balance is not a whole number$/,
        '... and says which key';
    ($rc) = ctl('audit', 'b2');
    is $rc, 3, "3: the audit of a balance of '$v'";
}

$redis->cmd('DEL', 'credits:{b3}:balance');
$redis->cmd('HSET', 'credits:{b3}:balance', 'a', 1);
($rc, $out, $err) = ctl('balance', 'b3');
is $rc, 3, '3: a balance of the wrong type';
like $err, qr/WRONGTYPE/, '... with Redis\'s error';
($rc) = ctl('topup', 'b3', 1);
is $rc, 3, '3: a topup Redis refuses';
$redis->cmd('SET', 'credits:prices', 'x');
($rc) = ctl('prices');
is $rc, 3, '3: prices of the wrong type';
$redis->cmd('DEL', 'credits:prices');
($rc) = ctl('--password', 'secret', 'balance', 'b1');
is $rc, 3, '3: AUTH refused';
($rc, $out, $err) = ctl('--redis', '127.0.0.1:1', 'balance', 'b1');
is $rc, 3, '3: Redis unreachable';
my $slow = parallel(2, sub {
    delete $redis->{sock};
    if ($_[0] == 0) {
        $redis->cmd('PING');
        write_file('sleeping', '');
        return $redis->cmd('DEBUG', 'SLEEP', 4);
    }
    wait_for(sub { -e "$dir/sleeping" }, 10);
    sleep 0.3;
    my ($rc, $out, $err) = ctl('balance', 'b1');
    return "$rc $err";
});
like $slow->[1], qr/^3 creditsctl: redis 127.0.0.1:\d+: .+/,
    '3: Redis silent for 2 s';

$redis->cmd('SET', 'credits:{b4}:balance', 1);
($rc) = ctl('audit', 'b4');
is $rc, 1, '1: the audit found a difference';

for my $bad (['nope'], [], ['balance'], ['balance', 'a:b'], ['topup', 'b1', 0],
             ['--redis', 'nowhere', 'balance', 'b1'], ['--db', 'x', 'prices'],
             ['audit', 'b1', '--start', '-1'], ['ledger', 'b1', '--last', 'x'],
             ['prices', 'extra'], ['holds']) {
    ($rc) = ctl(@$bad);
    is $rc, 2, "2: usage: @$bad";
}

($rc, $out) = ctl('--help');
is $rc, 0, '--help: exit 0';
like $out, qr/^exit status:\n  0  ok\n  1  the audit found a difference\n  2  usage error\n  3  Redis unreachable or failed, data in it unusable, or FILE not\n     written\n/m,
    '--help documents the exit status';
like $out, qr/\{"invalid":"<stored bytes>"\}/, '--help documents the invalid marker';

done_testing;
