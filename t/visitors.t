# Visitors and budgets of embedded features: credits_visitor,
# credits_visitor_limit, credits_budget and credits:{P}:budgets.  Exact
# under concurrency (the counters are checked and written by the hold
# script itself), windows that roll over, credits given back to the
# counters on a 5xx, a client gone and a commit below the price, 429
# answers with Retry-After, visitor values hashed (never in a key), claims
# as variables, the outcome and its counters, and the books balancing.
use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use IO::Socket::INET;
use Digest::SHA ();
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = 'visitors-secret-0123456789abcdef';
write_file('hs.key', $secret);

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up, workers => 2,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;
    credits_jwt_token $cookie_site_token;
    credits_visitor $cookie_vid;
    large_client_header_buffers 4 128k;
    log_format outcome '$credits_outcome $status';

    server {
        listen 127.0.0.1:%%PORT%% backlog=512;
        access_log %%DIR%%/outcome.log outcome;

        location /embed/ {
            credits on;
            credits_route embed;
            credits_visitor_limit 20 per 1h;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /chat/ {
            credits on;
            credits_budget 50 per 1h name=chat;
            credits_visitor_limit 1000 per 1h;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /short/ {
            credits on;
            credits_visitor_limit 3 per 2s name=short;
            credits_budget 100 per 2s name=short;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /cost/ {
            credits on;
            credits_price 5;
            credits_cost_header X-Cost;
            credits_visitor_limit 100 per 1h name=cost;
            credits_budget 100 per 1h name=cost;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /claim/ {
            credits on;
            credits_visitor $credits_claim_vid;
            credits_visitor_limit 2 per 1h name=claimed;
            add_header X-Vid $credits_claim_vid always;
            add_header X-N $credits_claim_n always;
            add_header X-Obj $credits_claim_obj always;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /hostile/ {
            credits on;
            credits_visitor $http_x_visitor$cookie_vid$credits_claim_vid;
            credits_visitor_limit 100 per 1h name=hostile;
            proxy_pass http://%%UPSTREAM%%;
        }

        # handed on (error_page) to a location with a visitor limit: the
        # move of the hold respects it
        location /mv/ {
            credits on;
            proxy_intercept_errors on;
            error_page 404 = /mv-limited;
            proxy_pass http://%%UPSTREAM%%;
        }

        location = /mv-limited {
            credits on;
            credits_price 2;
            credits_visitor_limit 3 per 1h name=mvl;
            proxy_pass http://%%UPSTREAM%%;
        }

        location = /status {
            credits_status;
        }
    }
END
$ngx->start;

my %start;

sub project {
    my ($p, $balance, %claims) = @_;
    $redis->cmd('SET', "credits:{$p}:balance", $balance);
    $start{$p} = $balance;
    return jwt_hs('HS256', $secret, { sub => $p, exp => time + 3600, %claims });
}

sub visit {
    my ($path, $token, $vid, %h) = @_;
    my $cookie = "site_token=$token" . (defined $vid ? "; vid=$vid" : '');
    return $ngx->get($path, Cookie => $cookie, %h);
}

sub counters {
    my ($p, $kind) = @_;
    my %c;
    my $cursor = 0;
    do {
        my $r = $redis->cmd('SCAN', $cursor, 'MATCH', "credits:{$p}:$kind:*",
                            'COUNT', 1000);
        $cursor = $r->[0];
        $c{$_} = $redis->cmd('GET', $_) for @{ $r->[1] };
    } while ($cursor);
    return \%c;
}

sub sum { my $s = 0; $s += $_ for values %{ $_[0] }; $s }

sub settled {
    my ($p) = @_;
    wait_for(sub { $redis->cmd('ZCARD', "credits:{$p}:holds") == 0 }, 5);
}

sub metric {
    my ($name) = @_;
    my $body = $ngx->get('/status')->{body};
    return $body =~ /^\Q$name\E (\d+)$/m ? $1 : undef;
}

# ---- one visitor, limit 20, price 1: 200 at once, exactly 20 pass ----

my $t = project('site-a', 1000);
my $codes = parallel(200, sub { visit('/embed/chat', $t, 'alice')->{status} });
settled('site-a');
my %n;
$n{$_}++ for @$codes;
is $n{200}, 20, 'one visitor, limit 20: exactly 20 of 200 pass';
is $n{429}, 180, '... the other 180 get 429';
is scalar(keys %n), 2, '... and nothing else';
is $redis->cmd('GET', 'credits:{site-a}:balance'), 980, '... 20 credits charged';
my $v = counters('site-a', 'v');
is scalar(keys %$v), 1, 'one counter key for the visitor and window';
is sum($v), 20, '... that counts 20';
my ($key) = keys %$v;
like $key, qr/^credits:\{site-a\}:v:embed:3600:\d+:[0-9a-f]{32}$/,
    '... named credits:{P}:v:NAME:PERIOD:START:HASH';
unlike $key, qr/alice/, '... without the visitor value';

# the hash: SipHash-2-4-128 of "project NUL value", keyed by the first 16
# bytes of SHA-256(label, JWT key); OpenSSL's SipHash is the reference
my $k = unpack 'H32', Digest::SHA::sha256("ngx_http_credits_module visitor id$secret");
write_file('visitor.in', "site-a\0alice");
my $want = lc `openssl mac -macopt hexkey:$k -macopt size:16 -in $dir/visitor.in SIPHASH`;
chomp $want;
like $key, qr/:\Q$want\E$/, "... the hash is SipHash-2-4-128 keyed from the JWT key ($want)";

my $r = visit('/embed/chat', $t, 'alice');
is $r->{status}, 429, 'over the limit: 429';
is $r->{headers}{'content-type'}, 'application/json', '... JSON';
my $end = (int(time / 3600) + 1) * 3600;
like $r->{body}, qr/^\{"error":"visitor_limit_reached","limit":20,"retry_after":(\d+)\}\n$/,
    '... body says the limit and when to retry';
my ($ra) = $r->{body} =~ /"retry_after":(\d+)/;
is $r->{headers}{'retry-after'}, $ra, '... Retry-After as in the body';
cmp_ok abs(time + $ra - $end), '<=', 1, '... within a second of the window end';
is visit('/embed/chat', $t, 'bob')->{status}, 200, 'another visitor still passes';
my $upstream_before = $up->requests;
visit('/embed/chat', $t, 'alice');
is $up->requests, $upstream_before, 'a 429 never reaches the upstream';

# ---- ten visitors racing a budget of 50 ----

$t = project('site-b', 1000);
$codes = parallel(200, sub { visit('/chat/x', $t, 'v' . ($_[0] % 10))->{status} });
settled('site-b');
%n = ();
$n{$_}++ for @$codes;
is $n{200}, 50, 'ten visitors, budget 50: exactly 50 pass';
is $n{429}, 150, '... the other 150 get 429';
is $redis->cmd('GET', 'credits:{site-b}:balance'), 950, '... 50 charged';
my $b = counters('site-b', 'b');
is_deeply [ values %$b ], [50], 'one budget counter, at 50';
like((keys %$b)[0], qr/^credits:\{site-b\}:b:chat:3600:\d+$/, '... named credits:{P}:b:NAME:PERIOD:START');
is sum(counters('site-b', 'v')), 50, 'the visitors together count 50';
$r = visit('/chat/x', $t, 'v1');
like $r->{body}, qr/^\{"error":"budget_exhausted","budget":50,"retry_after":\d+\}\n$/,
    'budget spent: budget_exhausted';
ok $r->{headers}{'retry-after'}, '... with Retry-After';

# ---- credits:{P}:budgets: a project's own budget, 0 turns it off ----

my $t2 = project('site-c', 1000);
is visit('/chat/x', $t2, 'w')->{status}, 200, 'site-c passes';
$redis->cmd('HSET', 'credits:{site-c}:budgets', 'chat', 0);
my $t0 = time;
ok wait_for(sub { visit('/chat/x', $t2, 'w')->{status} == 429 }, 2),
    'budgets chat = 0: site-c refused within 2 s';
$r = visit('/chat/x', $t2, 'w');
like $r->{body}, qr/"budget":0/, '... its budget says 0';
my $t3 = project('site-d', 1000);
is visit('/chat/x', $t3, 'w')->{status}, 200, '... another project is untouched';
$redis->cmd('HSET', 'credits:{site-b}:budgets', 'chat', 52);
is visit('/chat/x', $t, 'v1')->{status}, 200, 'a raised budget lets more through';
is visit('/chat/x', $t, 'v1')->{status}, 200, '... up to it';
is visit('/chat/x', $t, 'v1')->{status}, 429, '... and no further';
$redis->cmd('HDEL', 'credits:{site-c}:budgets', 'chat');
is visit('/chat/x', $t2, 'w')->{status}, 200, 'the override removed: site-c passes again';

# ---- windows roll over ----

$t = project('site-e', 1000);
# early in a window, and again with a visitor of its own if a slow moment
# of the host (a sanitizer build, a loaded CI) spread the five requests
# over two windows
my (@s, $eve);
for my $try (1 .. 3) {
    sleep 0.05 while time - 2 * int(time / 2) > 0.3;
    my $window = int(time / 2);
    $eve = "eve$try";
    @s = map { visit('/short/x', $t, $eve)->{status} } 1 .. 4;
    $r = visit('/short/x', $t, $eve);
    last if int(time / 2) == $window;
}
is_deeply \@s, [200, 200, 200, 429], 'short window: 3 pass, then 429';
$end = (int(time / 2) + 1) * 2;
cmp_ok abs(time + $r->{headers}{'retry-after'} - $end), '<=', 1,
    'Retry-After within a second of the window end';
my ($vk) = keys %{ counters('site-e', 'v') };
my $pttl = $redis->cmd('PTTL', $vk);
cmp_ok $pttl, '>', 0, 'the counter expires by itself';
cmp_ok $pttl, '<=', ($end - time) * 1000 + 60000 + 100, '... a minute after its window';
sleep $end - time + 0.05;
@s = map { visit('/short/x', $t, $eve)->{status} } 1 .. 4;
is_deeply \@s, [200, 200, 200, 429], 'next window: 3 pass again';

# ---- credits go back to both counters ----

$t = project('site-f', 1000);
is visit('/cost/x?status=500', $t, 'fay')->{status}, 500, 'a 5xx';
settled('site-f');
is sum(counters('site-f', 'v')), 0, '... gives back to the visitor counter';
is sum(counters('site-f', 'b')), 0, '... and to the budget';

my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $ngx->port)
    or die "connect: $!";
print $s "GET /cost/x?sleep=1 HTTP/1.1\r\nHost: x\r\nCookie: site_token=$t; vid=fay\r\n\r\n";
ok wait_for(sub { sum(counters('site-f', 'v')) == 5 }, 3), 'a client waiting holds 5';
close $s;
sleep 1.3;
settled('site-f');
is sum(counters('site-f', 'v')), 0, 'the client gone: the visitor counter gets it back';
is sum(counters('site-f', 'b')), 0, '... and the budget';

is visit('/cost/x?cost=2', $t, 'fay')->{status}, 200, 'a commit at cost 2 of 5';
settled('site-f');
is sum(counters('site-f', 'v')), 2, '... the visitor counter keeps 2';
is sum(counters('site-f', 'b')), 2, '... the budget keeps 2';

# an expired hold gives back too (the hold script's expiry step)
my $refs = join '', map { ';' . (s/^credits:\{site-f\}://r =~ s/:/,/gr) }
                   keys(%{ counters('site-f', 'v') }), keys(%{ counters('site-f', 'b') });
$redis->cmd('ZADD', 'credits:{site-f}:holds', 1, "old$refs:2:cost");
$redis->cmd('DECRBY', 'credits:{site-f}:balance', 2);    # what it held
is visit('/cost/x?cost=0', $t, 'fay')->{status}, 200, 'the next hold runs the expiry';
settled('site-f');
is sum(counters('site-f', 'v')), 0, '... which gave the expired 2 back';
is((grep { $_->{outcome} eq 'expire' && $_->{request_id} eq 'old' }
         @{ ledger($redis, 'site-f') }), 1, '... with its ledger entry under its id');

# ---- a move to a location with a visitor limit respects it ----

$t = project('site-g', 1000);
is visit('/mv/a?status=404', $t, 'gus')->{status}, 200, 'handed on, the hold moved (2 of 3)';
$r = visit('/mv/a?status=404', $t, 'gus');
is $r->{status}, 429, 'a second move would pass the limit: 429';
like $r->{body}, qr/"error":"visitor_limit_reached","limit":3/, '... visitor_limit_reached';
settled('site-g');
is $redis->cmd('GET', 'credits:{site-g}:balance'), 998, 'only the first charged';
is sum(counters('site-g', 'v')), 2, 'the counter keeps the moved hold';

# ---- claims as variables ----

$t = project('site-h', 1000, vid => 'visitor-7', n => 42, obj => { a => 1 });
$r = visit('/claim/x', $t, undef);
is $r->{status}, 200, 'a claim as the visitor';
is $r->{headers}{'x-vid'}, 'visitor-7', '$credits_claim_vid: a string claim';
is $r->{headers}{'x-n'}, '42', '$credits_claim_n: an integer claim';
ok !exists $r->{headers}{'x-obj'}, '$credits_claim_obj: an object is empty';
is visit('/claim/x', $t, undef)->{status}, 200, 'the same vid: 2 of 2';
is visit('/claim/x', $t, 'other-cookie')->{status}, 429, '... and the limit follows the claim';
my $t4 = jwt_hs('HS256', $secret, { sub => 'site-h', exp => time + 3600, vid => 'visitor-8' });
is visit('/claim/x', $t4, undef)->{status}, 200, 'another vid passes';
$r = visit('/claim/x', 'bad.token.here', undef);
is $r->{status}, 401, 'an invalid token: 401';
ok !exists $r->{headers}{'x-vid'}, '... and no claim of it';

# ---- hostile visitor values never reach a key ----

$t = project('site-i', 1000);
my @hostile = ('x' x 65536, "caf\xc3\xa9-\xe2\x98\x83", "a:b}{c*?[]");
for my $h (@hostile) {
    is visit('/hostile/x', $t, $h)->{status}, 200,
        'hostile cookie of ' . length($h) . ' bytes: counted';
}
is visit('/hostile/x', $t, undef, 'X-Visitor' => "caf\xc3\xa9")->{status}, 200,
    'UTF-8 in a header: counted';
for my $claim ("line\r\nbreak", "nul\x00byte", "\xe2\x80\xae") {
    my $tok = jwt_hs('HS256', $secret, { sub => 'site-i', exp => time + 3600, vid => $claim });
    my $st = visit('/hostile/x', $tok, undef)->{status};
    ok $st == 200 || $st == 401, 'a claim with control bytes: counted or refused, never a crash';
}
settled('site-i');
my $keys = $redis->cmd('KEYS', 'credits:{site-i}*');
my @bad = grep { !/^credits:\{site-i\}:(balance|holds|ledger|v:hostile:3600:\d+:[0-9a-f]{32})$/ } @$keys;
is_deeply \@bad, [], 'every key of the project is one of ours, visitors as hashes';
cmp_ok scalar(keys %{ counters('site-i', 'v') }), '>=', 5, 'a counter per hostile visitor';
my $all = join "\n", @{ $redis->cmd('KEYS', '*') };
unlike $all, qr/xxxx|caf\xc3|\r|line|nul|a:b\}/, 'no visitor value in any key';
cmp_ok length($all), '<', 10000, 'keys stay short';

# ---- outcomes and counters; the books ----

like CreditsTest::slurp("$dir/outcome.log"), qr/^visitor_limited 429$/m,
    '$credits_outcome: visitor_limited';
like CreditsTest::slurp("$dir/outcome.log"), qr/^budget_exhausted 429$/m,
    '$credits_outcome: budget_exhausted';
my $log = CreditsTest::slurp("$dir/outcome.log");
my $vl = () = $log =~ /^visitor_limited 429$/mg;
my $be = () = $log =~ /^budget_exhausted 429$/mg;
is metric('credits_requests_total{outcome="visitor_limited"}'), $vl + 1,
    'credits_status counts visitor_limited (the move\'s 429 too)';
is metric('credits_requests_total{outcome="budget_exhausted"}'), $be,
    'credits_status counts budget_exhausted';

for my $p (sort keys %start) {
    settled($p);
    my ($balance, $charged, $held) = audit($redis, $p);
    is $balance + $charged + $held, $start{$p}, "$p: balance + charged + held = start";
    cmp_ok $balance, '>=', 0, "$p: balance never below 0";
}

unlike $ngx->error_log, qr/\[(alert|emerg|crit)\]|signal \d+|exited on/,
    'no worker crashed';

# ---- creditsctl budget and visitors ----

my $bin = $ENV{CREDITSCTL} || 'build/creditsctl';
sub ctl {
    my $out = `$bin --redis @{[ $redis->addr ]} @_ 2>&1`;
    return ($? >> 8, $out);
}

my ($rc, $out) = ctl('budget', 'site-b');
is $rc, 0, 'creditsctl budget P';
like $out, qr/^chat\s+52\s+52\s+3600s$/m, '... lists the own budget and its spend';
($rc, $out) = ctl('--json', 'budget', 'site-a');
like $out, qr/^\{"project":"site-a","budgets":\[\]\}$/, '... none where the route has no budget';
($rc, $out) = ctl('--json', 'visitors', 'site-b', '/chat/', '--top', 3);
like $out, qr/^\{"project":"site-b","name":"\/chat\/","visitors":10,"spent":52,"top":\[(\{"visitor":"[0-9a-f]{32}","spent":\d+\},?){3}\]\}$/,
    'creditsctl visitors: ten hashed visitors, 52 in all, the top 3';
($rc, $out) = ctl('visitors', 'site-a', 'embed');
like $out, qr/^2 visitors spent 21 in the current window\n.*\n[0-9a-f]{32} +20\n[0-9a-f]{32} +1\n$/s,
    '... by spend, most first';
($rc, $out) = ctl('budget', 'site-d', 'chat', 0);
is $rc, 0, 'creditsctl budget P NAME 0';
is visit('/chat/x', $t3, 'w')->{status}, 429, '... turns the feature off';
($rc, $out) = ctl('budget', 'site-d', 'chat', '--unset');
is visit('/chat/x', $t3, 'w')->{status}, 200, '... --unset turns it back on';
for my $bad (['budget', 'site-d', 'a:b'], ['budget', 'site-d', 'chat', -1],
             ['budget', 'site-d', 'chat', 'x'], ['visitors', 'site-d'],
             ['visitors', 'site-d', 'chat', '--top', 0]) {
    ($rc, $out) = ctl(@$bad);
    is $rc, 2, "creditsctl @$bad: usage error";
}
($rc, $out) = ctl('holds', 'site-a');
unlike $out, qr/;/, 'creditsctl holds shows the hold id without its counters';

# ---- nginx -t rejects what cannot work ----

my @bad_conf = (
    [ 'credits_visitor_limit 10 per 0s;', 'invalid period' ],
    [ 'credits_visitor_limit 10 per 31d;', 'invalid period' ],
    [ 'credits_budget 10 per 1x;', 'invalid period' ],
    [ 'credits_budget 10 each 1h;', '"per" expected' ],
    [ 'credits_budget -1 per 1h;', 'invalid number' ],
    [ 'credits_budget 10 per 1h nom=x;', 'invalid parameter' ],
    [ 'credits_budget 10 per 1h name=a:b;', 'cannot name counters' ],
    [ 'credits_budget 10 per 1h; credits_budget 5 per 1h;', 'is duplicate' ],
    [ 'credits_visitor_limit 10 per 1h name=x;', 'needs "credits_visitor"' ],
);
for my $c (@bad_conf) {
    my ($directive, $error) = @$c;
    my ($rc, $out) = location_test($redis, $directive);
    ok $rc, "nginx -t rejects '$directive'";
    like $out, qr/\Q$error\E/, "... saying $error";
}

my $n = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
                                vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%%;
        location ~ ^/re/(.*)$ {
            credits on;
            credits_budget 10 per 1d;
        }
    }
END
($rc, $out) = $n->test;
ok $rc, 'nginx -t rejects a regex route as a counter name';
like $out, qr/set name=/, '... asking for name=';

# ---- limits set for a whole server: each location's route names them ----

my $srv = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%%;
        credits on;
        credits_jwt_token $arg_t;
        credits_visitor $arg_v;
        credits_visitor_limit 2 per 1h;
        credits_budget 3 per 1h;
        location /srv-a { proxy_pass http://%%UPSTREAM%%; }
        location /srv-b { proxy_pass http://%%UPSTREAM%%; }
    }
END
($rc, $out) = $srv->test;
is $rc, 0, 'nginx -t: credits_visitor_limit and credits_budget at server '
           . 'level, named by each location' or diag $out;
$srv->start;
my $t5 = project('site-s', 100);
my @got = map { $srv->get("/srv-a?t=$t5&v=$_")->{status} } qw(x x x);
is "@got", '200 200 429', 'server-level limit: the visitor stops at 2 in /srv-a';
@got = map { $srv->get("/srv-b?t=$t5&v=y$_")->{status} } 1 .. 4;
is "@got", '200 200 200 429', '... /srv-b has counters of its own: its budget stops at 3';
ok scalar(grep { m{:b:/srv-a:} } keys %{ counters('site-s', 'b') }),
    '... the budget of /srv-a counted under its route';
$log = length $srv->error_log;
is $srv->get("/elsewhere?t=$t5&v=z")->{status}, 500,
    'a request that matches no location: refused, no counter can be named';
like substr($srv->error_log, $log), qr/matches no location.*set name=/,
    '... saying why';
ok wait_for(sub { $redis->cmd('GET', 'credits:{site-s}:balance') == 100 - 5
                  && $redis->cmd('ZCARD', 'credits:{site-s}:holds') == 0 }, 5),
    '... and charged nothing: the 5 requests that passed paid 1 each';
$srv->stop;

done_testing;
