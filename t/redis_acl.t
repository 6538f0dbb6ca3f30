# An ACL user (credits_redis ... user= password=, creditsctl --user): the
# rule of docs/redis.md, read from there and created as written, is
# enough for the whole flow of the gateway and creditsctl (Redis's ACL
# LOG stays empty) and no larger than it (every command it grants is
# used); Redis's default user is off, so nothing works unauthenticated.
# A wrong password: 503 under credits_fail closed, forwarded uncharged
# under open, `AUTH failed` in the error log, and the password never.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;
use CreditsManaged;

my $dir = test_dir();
my $secret = 'acl-secret-0123456789abcdef';
write_file('hs.key', $secret);
my $bin = $ENV{CREDITSCTL} || 'build/creditsctl';

my $pw = "acl-pw-$$-" . int(rand 1e9);
my @rule = CreditsManaged::documented_acl('credits', $pw);
is_deeply [ @rule[0 .. 2] ], [ 'ACL', 'SETUSER', 'credits' ],
    'docs/redis.md: ACL SETUSER credits ...';
ok((grep { $_ eq '~credits:*' } @rule), 'the rule reaches credits:* keys');
ok((grep { $_ eq '-@all' } @rule), 'the rule starts from no command');
my @granted = map { /^\+(.+)/ ? $1 : () } @rule;
# sent only with db=N, to a Redis Cluster, or with Sentinel
my %conditional = map { $_ => 1 } qw(select cluster|slots asking role);

my $redis = CreditsTest::Redis->start(auth => [ 'admin', 'adminpw' ],
    args => [ '--user', 'admin', 'on', '>adminpw', '~*', '&*', '+@all',
              '--user', 'default', 'off' ]);
is $redis->cmd(@rule), 'OK',
    'the documented rule is accepted by Redis';
my $addr = $redis->addr;

my $up = CreditsTest::Upstream->start;
sub gateway {
    my ($credentials) = @_;
    return CreditsTest::Nginx->new(upstream => $up, workers => 2,
        vars => { DIR => $dir, REDIS => $addr }, http => <<"END")->start;
    credits_redis %%REDIS%% $credentials timeout=1s;
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%%;
        location /ai {
            credits on;
            credits_price 3;
            credits_route ai;
            credits_cost_header X-Cost;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /priced {
            credits on;
            credits_price 5;
            credits_route priced;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /first {
            credits on;
            credits_price 1;
            credits_route first;
            proxy_intercept_errors on;
            error_page 404 = /paid;
            proxy_pass http://%%UPSTREAM%%;
        }
        location = /paid {
            credits on;
            credits_price 7;
            credits_route paid;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /embed {
            credits on;
            credits_price 1;
            credits_route embed;
            credits_visitor \$arg_v;
            credits_visitor_limit 100 per 1h;
            credits_budget 1000 per 1h name=emb;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /slow {
            credits on;
            credits_price 2;
            credits_route slow;
            credits_hold_ttl 1s;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /open {
            credits on;
            credits_price 3;
            credits_route open;
            credits_fail open;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
}

sub ctl {
    my $out = `$bin --redis $addr --user credits --password $pw @_ 2>&1`;
    return ($? >> 8, $out);
}
sub ctl_ok {
    my ($name, @args) = @_;
    my ($rc, $out) = ctl(@args);
    is $rc, 0, "creditsctl $name as the ACL user" or diag $out;
    return $out;
}

my %auth = (Authorization => 'Bearer '
            . jwt_hs('HS256', $secret, { sub => 'acl', exp => time + 600 }));

# -- the whole flow, by the ACL user only ---------------------------------

$redis->cmd('CONFIG', 'RESETSTAT');
$redis->cmd('ACL', 'LOG', 'RESET');

is ctl_ok('topup', 'topup', 'acl', 100), "100\n", 'topup';
ctl_ok('price', 'price', 'priced', 4);
like ctl_ok('prices', 'prices'), qr/^priced\s+4$/m, 'prices';
ctl_ok('budget set', 'budget', 'acl', 'emb', 1000);

my $ngx = gateway("user=credits password=$pw");

my $r = $ngx->get('/ai?cost=2', %auth);
is $r->{status}, 200, 'hold and commit';
is $ngx->get('/ai?status=500', %auth)->{status}, 500, 'hold and release';
ok wait_for(sub {
    ($ngx->get('/priced', %auth)->{headers}{'x-credits-held'} // 0) == 4 }, 5),
    'the prices poll reads the override';
$r = $ngx->get('/first?status=404', %auth);
is_deeply [ $r->{status}, $r->{headers}{'x-credits-held'} ], [ 200, 7 ],
    'handed to another metered location: the hold moved';
is $ngx->get('/embed?v=alice', %auth)->{status}, 200,
    'window counters of a visitor and a budget';
is $ngx->get('/slow?sleep=1.4', %auth)->{status}, 200,
    'a response later than its hold';
ok wait_for(sub { $redis->cmd('ZCARD', 'credits:{acl}:holds') == 0 }, 5),
    'every hold settled';

ctl_ok('balance', 'balance', 'acl');
ctl_ok('holds', 'holds', 'acl');
ctl_ok('ledger', 'ledger', 'acl');
ctl_ok('ledger --last', 'ledger', 'acl', '--last', 2);
ctl_ok('budget', 'budget', 'acl');
ctl_ok('visitors', 'visitors', 'acl', 'embed');
ctl_ok('audit', 'audit', 'acl');
ctl_ok('budget unset', 'budget', 'acl', 'emb', '--unset');
ctl_ok('price unset', 'price', 'priced', '--unset');
ctl_ok('price', 'price', 'priced');
ctl_ok('archive', 'archive', 'acl', '--before', int(time * 1000) + 1000,
       '--out', "$dir/acl-archive.jsonl");
ctl_ok('audit after the archive', 'audit', 'acl');

my $log = $redis->cmd('ACL', 'LOG');
is scalar @$log, 0, "no command denied to the rule's user"
    or diag explain $log;

my $stats = $redis->cmd('INFO', 'commandstats');
my @unused = grep { !$conditional{$_}
                    && $stats !~ /^cmdstat_\Q$_\E:calls=[1-9]/m } @granted;
is_deeply \@unused, [], 'every command the rule grants was used'
    or diag $stats;

# the archive took the ledger's entries: its file tells what they were
my %outcome;
for (split /\n/, CreditsTest::slurp("$dir/acl-archive.jsonl")) {
    my %e = /"(\w+)":"([^"]*)"/g;
    $outcome{$e{route}}{$e{outcome}} = $e{charged} if $e{route};
}
is $outcome{ai}{commit}, 2, 'ledger: ai committed at its cost';
is $outcome{ai}{release}, 0, 'ledger: ai released';
is $outcome{priced}{commit}, 4, 'ledger: priced at the override';
is $outcome{paid}{commit}, 7, 'ledger: the moved hold committed';
is $outcome{slow}{expire}, 0, 'ledger: the late hold expired';
unlike $ngx->error_log, qr/\Q$pw\E/, 'the password is not in the error log';
unlike $ngx->error_log, qr/\[alert\]|exited on signal/, 'no worker crashed';
$ngx->stop;

# -- a wrong password, and none ----------------------------------------

my $balance = $redis->cmd('GET', 'credits:{acl}:balance');
my $wrong = "wrong-$pw";
for my $case ([ 'a wrong password', "user=credits password=$wrong",
                qr/AUTH failed[^\n]*WRONGPASS/ ],
              [ 'no credentials', '', qr/NOAUTH/ ])
{
    my ($name, $credentials, $msg) = @$case;
    $ngx = gateway($credentials);
    my $calls = $up->requests;
    $r = $ngx->get('/ai', %auth);
    is $r->{status}, 503, "$name, credits_fail closed: 503";
    is $up->requests, $calls, "$name: upstream not called";
    $r = $ngx->get('/open', %auth);
    is $r->{status}, 200, "$name, credits_fail open: forwarded";
    ok !exists $r->{headers}{'x-credits-held'}, "$name, open: nothing held";
    is $redis->cmd('GET', 'credits:{acl}:balance'), $balance,
        "$name: balance untouched";
    like $ngx->error_log, $msg, "$name: the error log says why";
    unlike $ngx->error_log, qr/\Q$pw\E/, "$name: no password in the log";
    $ngx->stop;
}

my $cmd = "$bin --redis $addr --user credits --password $wrong";
my $out = `$cmd balance acl 2>&1`;
my $rc = $? >> 8;
is $rc, 3, 'creditsctl with a wrong password: exit 3';
like $out, qr/WRONGPASS|AUTH/, 'creditsctl says the authentication failed';
unlike $out, qr/\Q$wrong\E/, 'creditsctl does not print the password';

done_testing;
