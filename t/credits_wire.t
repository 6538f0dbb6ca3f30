# Every row of the contract's "On the wire" table, the cost header, the
# ledger entries' fields and runtime prices, with exact values.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = 'wire-secret-0123456789abcdef';
write_file('hs.key', $secret);

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;

    map $arg_size $image_price { default 4; large 9; }

    server {
        listen 127.0.0.1:%%PORT%%;
        add_header X-Hold $credits_hold_id always;
        add_header X-Request-Id $request_id always;

        location /gen {
            credits on;
            credits_price 5;
            credits_route generate;
            credits_cost_header X-Cost;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /image {
            credits on;
            credits_price $image_price;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /down {
            credits on;
            credits_price 2;
            credits_route down;
            proxy_pass http://127.0.0.1:%%PORT3%%;
        }

        location /slowup {
            credits on;
            credits_price 2;
            credits_route slowup;
            proxy_read_timeout 300ms;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /early {
            set $early $request_id;
            add_header X-Early $early always;
            add_header X-Hold $credits_hold_id always;
            credits on;
            credits_route early;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /editor {
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$ngx->start;

my $token = jwt_hs('HS256', $secret, { sub => 'wire', exp => time + 600 });
my %auth = (Authorization => "Bearer $token");

sub balance { $redis->cmd('GET', 'credits:{wire}:balance') }
sub entries { ledger($redis, 'wire') }
sub last_entry { entries()->[-1] }

# the settle runs after the response: a held request waits for its entry
sub call {
    my ($path, %h) = @_;
    my $r = $ngx->get($path, %h);
    my $id = $r->{headers}{'x-hold'} // '';
    diag "no hold for $path: ", explain($r), substr($ngx->error_log, -3000)
        if $path =~ m{^/gen\?cost=} && $r->{status} == 200 && !$id;
    wait_for(sub { grep { $_->{request_id} eq $id } @{ entries() } }, 10)
        or diag "no ledger entry for hold $id of $path"
        if exists $r->{headers}{'x-credits-held'};
    return $r;
}

$redis->cmd('SET', 'credits:{wire}:balance', 100);

# hold placed, upstream 200, no cost header: charged = held
my $r = call('/gen', %auth);
is $r->{status}, 200, 'forwarded';
is $r->{headers}{'x-credits-held'}, 5, 'X-Credits-Held';
is $r->{headers}{'x-credits-balance'}, 95, 'X-Credits-Balance after the hold';
ok !exists $r->{headers}{'x-credits-charged'},
    'no X-Credits-Charged without a cost header';
is balance(), 95, 'committed: charged the held 5';
my $e = last_entry();
is_deeply [ @$e{qw(route held charged status outcome)} ],
          [ 'generate', 5, 5, 200, 'commit' ], 'ledger entry fields';
is $e->{request_id}, $r->{headers}{'x-hold'}, 'ledger request_id is the hold id';
like $e->{request_id}, qr/^[0-9a-f]{32}$/, 'hold id is $request_id';
like $e->{ts}, qr/^\d{13}$/, 'ts in ms';
ok abs($e->{ts} / 1000 - time) < 5, 'ts is now';

# the cost header: lower, higher, garbage; never seen by the client
$r = call('/gen?cost=2', %auth);
is $r->{headers}{'x-credits-charged'}, 2, 'cost 2: X-Credits-Charged 2';
ok !exists $r->{headers}{'x-cost'}, 'cost header removed';
is balance(), 93, 'cost 2: charged 2, 3 refunded';
is last_entry()->{charged}, 2, 'ledger charged 2';
is last_entry()->{held}, 5, 'ledger held 5';

$r = call('/gen?cost=50', %auth);
is $r->{headers}{'x-credits-charged'}, 5, 'cost 50: charged capped at held';
is balance(), 88, 'cost 50: charged 5';

$r = call('/gen?cost=0', %auth);
is $r->{headers}{'x-credits-charged'}, 0, 'cost 0: charged 0';
is balance(), 88, 'cost 0: all refunded';
is last_entry()->{outcome}, 'commit', 'cost 0 is still a commit';

for my $garbage ('abc', '-3', '2.5', '', '99999999999999999999', '0x10') {
    $r = call("/gen?cost=$garbage", %auth);
    is $r->{status}, 200, "garbage cost '$garbage': forwarded";
    ok !exists $r->{headers}{'x-cost'}, "garbage cost '$garbage': removed";
    ok !exists $r->{headers}{'x-credits-charged'},
        "garbage cost '$garbage': no X-Credits-Charged";
    is last_entry()->{charged}, 5, "garbage cost '$garbage': charged held"
        or diag explain entries()->[-2], last_entry(), $r->{headers};
}
is balance(), 58, 'six garbage costs charged 5 each';
like $ngx->error_log, qr/project "wire" route "generate": unusable "X-Cost"/,
    'garbage cost logged with project and route';

$r = call('/gen?cost=1&hdr=X-Cost:%202', %auth);
is last_entry()->{charged}, 5, 'two cost headers: charged held';
ok !exists $r->{headers}{'x-cost'}, 'both copies removed';
is balance(), 53, 'balance after two cost headers';

# upstream status >= 400: released
$r = call('/gen?status=500&cost=1', %auth);
is $r->{status}, 500, 'upstream 500 passed through';
is $r->{headers}{'x-credits-held'}, 5, '500 still says what was held';
ok !exists $r->{headers}{'x-credits-charged'}, 'no charge header on 500';
is balance(), 53, 'released: nothing charged';
is_deeply [ @{ last_entry() }{qw(held charged status outcome)} ],
          [ 5, 0, 500, 'release' ], 'release entry';

$r = call('/gen?status=404', %auth);
is balance(), 53, '404 released';
is last_entry()->{status}, 404, 'release status 404';

$r = call('/gen?status=302', %auth);
is balance(), 48, '302 committed (below 400)';

# upstream error and timeout: 502 and 504, released
$r = call('/down', %auth);
is $r->{status}, 502, 'upstream down: 502';
is balance(), 48, '502 released';
is_deeply [ @{ last_entry() }{qw(route held charged status outcome)} ],
          [ 'down', 2, 0, 502, 'release' ], 'release entry for 502';

$r = call('/slowup?sleep=1', %auth);
is $r->{status}, 504, 'upstream timeout: 504';
is balance(), 48, '504 released';
is last_entry()->{status}, 504, 'release entry for 504';

# price from a variable (map)
$r = call('/image?size=large', %auth);
is $r->{headers}{'x-credits-held'}, 9, 'map price 9';
is last_entry()->{route}, '/image', 'route defaults to the location name';
$r = call('/image', %auth);
is $r->{headers}{'x-credits-held'}, 4, 'map default price 4';
is balance(), 35, 'charged 9 + 4';

# balance lower than the price: 402, upstream not called
$redis->cmd('SET', 'credits:{wire}:balance', 4);
my $calls = $up->requests;
my $n = @{ entries() };
$r = call('/gen', %auth);
is $r->{status}, 402, 'insufficient: 402';
is $r->{headers}{'content-type'}, 'application/json', 'JSON body';
is $r->{body}, qq({"error":"insufficient_credits","required":5,"balance":4}\n),
    'exact 402 body';
is $up->requests, $calls, '402: upstream not called';
is balance(), 4, '402: balance untouched';
is scalar @{ entries() }, $n, '402: no ledger entry';
is $redis->cmd('ZCARD', 'credits:{wire}:holds'), 0, '402: no hold';

$r = call('/image', %auth);
is $r->{status}, 200, 'a price of 4 still fits a balance of 4';
is $r->{headers}{'x-credits-balance'}, 0, 'balance 0 after the hold';
is balance(), 0, 'balance exactly 0, never below';

# a missing balance key is a balance of 0
$redis->cmd('DEL', 'credits:{wire}:balance');
$r = call('/gen', %auth);
is $r->{body}, qq({"error":"insufficient_credits","required":5,"balance":0}\n),
    'missing balance key: 402 with balance 0';

# a balance that is not a number: an error, so 503 (fail closed)
$redis->cmd('SET', 'credits:{wire}:balance', 'lots');
$r = call('/gen', %auth);
is $r->{status}, 503, 'garbage balance: 503';
is $r->{headers}{'retry-after'}, 1, 'Retry-After';
like $ngx->error_log, qr/project "wire" route "generate": hold failed: .*not a whole number/,
    'the script error is logged with project and route';

# editor routes pass through untouched
$redis->cmd('SET', 'credits:{wire}:balance', 10);
$r = call('/editor');
is $r->{status}, 200, 'editor: no token needed';
ok !exists $r->{headers}{'x-credits-held'}, 'editor: not metered';
is balance(), 10, 'editor: free';

# runtime prices: HSET takes effect within 2 s, 0 is free, HDEL restores
$redis->cmd('SET', 'credits:{wire}:balance', 1000);
$redis->cmd('HSET', 'credits:prices', 'generate', 7);
ok wait_for(sub { call('/gen', %auth)->{headers}{'x-credits-held'} == 7 }, 2.5),
    'override 7 within 2 s';

$redis->cmd('HSET', 'credits:prices', 'generate', 0);
ok wait_for(sub { !exists call('/gen', %auth)->{headers}{'x-credits-held'} }, 2.5),
    'override 0 within 2 s';
my $b = balance();
$n = @{ entries() };
$r = call('/gen', %auth);
is $r->{status}, 200, 'free route forwarded';
is balance(), $b, 'price 0: balance unchanged';
is scalar @{ entries() }, $n, 'price 0: no ledger entry';

$redis->cmd('HSET', 'credits:prices', 'generate', 'cheap');
$redis->cmd('HDEL', 'credits:prices', 'generate');
ok wait_for(sub { (call('/gen', %auth)->{headers}{'x-credits-held'} // 0) == 5 }, 2.5),
    'HDEL restores the configured price within 2 s';

# the hold id is $request_id, drawn from the worker's random buffer (4 KB:
# 256 ids, so these requests cross a refill), or kept when set earlier
$redis->cmd('INCRBY', 'credits:{wire}:balance', 10_000);
my %seen;
my $same = 0;
for (1 .. 300) {
    my $h = $ngx->get('/gen', %auth)->{headers};
    $seen{ $h->{'x-hold'} // '' }++;
    $same++ if ($h->{'x-hold'} // '') eq ($h->{'x-request-id'} // 'none');
}
is scalar(grep { /^[0-9a-f]{32}$/ } keys %seen), 300, '300 distinct 32-hex hold ids';
is $same, 300, 'each is the request\'s $request_id';
$r = call('/early', %auth);
like $r->{headers}{'x-early'}, qr/^[0-9a-f]{32}$/, '$request_id evaluated before the hold';
is $r->{headers}{'x-hold'}, $r->{headers}{'x-early'}, 'is kept as the hold id';
ok wait_for(sub { $redis->cmd('ZCARD', 'credits:{wire}:holds') == 0 }, 5), 'all settled';

# the invariant over everything above (start 100, then the SETs)
is $redis->cmd('ZCARD', 'credits:{wire}:holds'), 0, 'no hold left open';

done_testing;
