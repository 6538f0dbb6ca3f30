# creditsctl against a real redis-server, and an audit after real traffic.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;

my $bin = $ENV{CREDITSCTL} || 'build/creditsctl';
my $redis = CreditsTest::Redis->start;
my $addr = $redis->addr;

sub ctl {
    my $out = `$bin --redis $addr @_ 2>&1`;
    return ($? >> 8, $out);
}

my ($rc, $out) = ctl('balance', 'p1');
is_deeply [$rc, $out], [0, "0\n"], 'a missing balance is 0';

($rc, $out) = ctl('topup', 'p1', 100);
is_deeply [$rc, $out], [0, "100\n"], 'topup prints the new balance';
($rc, $out) = ctl('--json', 'topup', 'p1', 20);
is $out, qq({"project":"p1","topup":20,"balance":120}\n), 'topup --json';
is $redis->cmd('GET', 'credits:{p1}:balance'), 120, 'balance in redis';

my $l = ledger($redis, 'p1');
is scalar @$l, 2, 'two ledger entries';
is_deeply [ @{ $l->[0] }{qw(outcome amount)} ], ['topup', 100],
    'topup ledger entry';
like $l->[0]{ts}, qr/^\d{13}$/, 'topup ts';

for my $bad (['topup', 'p1', 0], ['topup', 'p1', -5], ['topup', 'p1', 'x'],
             ['topup', 'p1', '1.5'], ['topup', 'p1'], ['balance', 'a:b'],
             ['balance', 'x' x 129], ['balance', "''"], ['nope'],
             ['ledger', 'p1', '--last', 0], ['price', 'r', -1],
             ['--frob', 'prices'], ['audit', 'p1', '--start', 'x'])
{
    ($rc, $out) = ctl(@$bad);
    is $rc, 2, "usage error: @$bad";
    like $out, qr/^creditsctl: [^\n]+\n$/, "one-line error: @$bad";
}

($rc, $out) = ctl('--redis', '127.0.0.1:1', 'balance', 'p1');
is $rc, 3, 'unreachable redis: exit 3';
like $out, qr/creditsctl: cannot connect to redis 127.0.0.1:1/, 'and says so';

($rc, $out) = ctl('--help');
like $out, qr/usage: creditsctl/, '--help';
for my $flag (qw(--redis --user --password --db --prefix --json --tls --cacert
                 --cert --key --sni --sentinel --sentinel-user
                 --sentinel-password)) {
    like $out, qr/^  \Q$flag\E(?: |\n)/m, "--help lists $flag";
}

# options that mean nothing without another are refused before connecting
for my $bad (['--user', 'ops'], ['--cacert', 'ca.pem'], ['--sni', 'x'],
             ['--tls', '--cert', 'c.pem'], ['--tls', '--key', 'k.pem'],
             ['--sentinel-password', 's'],
             ['--sentinel', 'm', '--sentinel-user', 'u'],
             ['--tls', '--redis', 'unix:/tmp/none.sock'])
{
    ($rc, $out) = ctl(@$bad, 'balance', 'p1');
    is $rc, 2, "usage error: @$bad";
    like $out, qr/^creditsctl: [^\n]+\n$/, "one-line error: @$bad";
}

($rc, $out) = ctl('--tls', '--cacert', '/nonexistent/ca.pem', 'balance', 'p1');
is $rc, 2, 'an unreadable --cacert: exit 2';
like $out, qr/^creditsctl: cannot load --cacert \S+: No such file/,
    '... naming the file and why';

# an ACL user: AUTH user password; a refused one shows Redis's error only
$redis->cmd('ACL', 'SETUSER', 'ops', 'on', '>ops-secret', '~credits:*',
            '+get');
($rc, $out) = ctl('--user', 'ops', '--password', 'ops-secret', 'balance', 'p1');
is_deeply [$rc, $out], [0, "120\n"], '--user: AUTH as an ACL user';
($rc, $out) = ctl('--user', 'ops', '--password', 'wrong-secret', 'balance',
                  'p1');
is $rc, 3, 'a wrong password: exit 3';
like $out, qr/^creditsctl: redis \S+: AUTH failed: WRONGPASS/,
    '... with Redis\'s error';
unlike $out, qr/secret/, '... and never the password';
($rc, $out) = ctl('--user', 'ops', '--password', 'ops-secret', 'topup', 'p1',
                  1);
like $out, qr/NOPERM/, 'the ACL user is the one whose rights apply';
$redis->cmd('ACL', 'DELUSER', 'ops');

($rc, $out) = ctl('audit', '--help');
is $rc, 0, 'command --help';
like $out, qr/usage: creditsctl audit P \[--start N\]/, 'audit --help';

# prices
($rc, $out) = ctl('price', 'generate', 7);
is $out, "7\n", 'price set';
is $redis->cmd('HGET', 'credits:prices', 'generate'), 7, 'in the hash';
ctl('price', 'chatbot', 0);
($rc, $out) = ctl('prices');
like $out, qr/^ROUTE\s+PRICE\n/, 'prices header';
like $out, qr/^generate\s+7$/m, 'prices row generate';
like $out, qr/^chatbot\s+0$/m, 'prices row chatbot';
($rc, $out) = ctl('--json', 'prices');
like $out, qr/^\{("generate":7,"chatbot":0|"chatbot":0,"generate":7)\}\n$/,
    'prices --json';
($rc, $out) = ctl('price', 'generate', '--unset');
is $out, "(configured price)\n", 'price --unset';
is $redis->cmd('HEXISTS', 'credits:prices', 'generate'), 0, 'unset in redis';
($rc, $out) = ctl('--json', 'price', 'chatbot');
is $out, qq({"route":"chatbot","price":0}\n), 'price --json';

# holds, ledger and audit with a hand-made settled and open hold
$redis->cmd('DECRBY', 'credits:{p1}:balance', 8);
$redis->cmd('ZADD', 'credits:{p1}:holds', time * 1000 + 60000,
            'abc123:5:generate');
$redis->cmd('XADD', 'credits:{p1}:ledger', '*', 'route', 'chat', 'held', 3,
            'charged', 3, 'status', 200, 'outcome', 'commit',
            'request_id', 'def456', 'ts', 1);

($rc, $out) = ctl('holds', 'p1');
like $out, qr/^HOLD_ID\s+HELD\s+ROUTE\s+EXPIRES_IN\n/, 'holds header';
like $out, qr/^abc123\s+5\s+generate\s+(59|60)\.\ds$/m, 'holds row';
($rc, $out) = ctl('--json', 'holds', 'p1');
like $out, qr/^\[\{"hold_id":"abc123","held":5,"route":"generate","expires_in":/,
    'holds --json';

($rc, $out) = ctl('ledger', 'p1', '--last', 1);
like $out, qr/^ID\s+OUTCOME/, 'ledger header';
like $out, qr/commit\s+chat\s+3\s+3\s+200\s+def456/, 'ledger --last 1 row';
is scalar(() = $out =~ /\n/g), 2, 'ledger --last 1: one row';
($rc, $out) = ctl('--json', 'ledger', 'p1');
like $out, qr/^\[\{"id":"[\d-]+","outcome":"topup","amount":"100","ts":"\d+"\},/,
    'ledger --json, oldest first';

($rc, $out) = ctl('audit', 'p1');
is $rc, 0, 'audit passes';
like $out, qr/^topups\s+120$/m, 'audit topups';
like $out, qr/^balance\s+112$/m, 'audit balance';
like $out, qr/^charged\s+3$/m, 'audit charged';
like $out, qr/^held\s+5$/m, 'audit held';
like $out, qr/^ok$/m, 'audit ok';

$redis->cmd('INCRBY', 'credits:{p1}:balance', 7);
($rc, $out) = ctl('audit', 'p1');
is $rc, 1, 'a raw INCRBY without a ledger entry fails the audit';
like $out, qr/^difference\s+-7$/m, 'and prints the difference';
($rc, $out) = ctl('--json', 'audit', 'p1', '--start', 7);
is $rc, 0, 'given as the starting balance it passes';
like $out, qr/"difference":0,"ok":true/, 'audit --json';

# an audit after real traffic through nginx
my $dir = test_dir();
write_file('hs.key', 'ctl-secret');
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up, workers => 2,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%%;
        location / {
            credits on;
            credits_price 3;
            credits_cost_header X-Cost;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$ngx->start;
ctl('topup', 'live', 50);
my $token = jwt_hs('HS256', 'ctl-secret', { sub => 'live', exp => time + 60 });
parallel(30, sub {
    my $q = ('', '?status=500', '?cost=1', '?cost=x')[$_[0] % 4];
    $ngx->get("/ai$q", Authorization => "Bearer $token")->{status};
});
ok wait_for(sub { $redis->cmd('ZCARD', 'credits:{live}:holds') == 0 }, 5),
    'all holds settled';
($rc, $out) = ctl('audit', 'live');
is $rc, 0, 'the audit passes after mixed traffic' or diag $out;

done_testing;
