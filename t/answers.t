# The answers the module writes itself: 401, 402 and 503 as JSON with their
# headers; an operator's error_page still overrides each; a negative
# balance (a chargeback made with INCRBY) is an ordinary 402, under
# credits_fail closed and open alike.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = 'answers-secret-0123456789abcdef';
write_file('hs.key', $secret);

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;

my $locations = <<'END';
        location /ai {
            credits on;
            credits_price 5;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /ai-open {
            credits on;
            credits_price 5;
            credits_fail open;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /ai-pages {
            credits on;
            credits_price 5;
            error_page 401 = /login;
            error_page 402 = /buy;
            error_page 503 /busy;
            proxy_pass http://%%UPSTREAM%%;
        }

        location = /login { return 200 "please log in\n"; }
        location = /buy { return 200 "buy credits\n"; }
        location = /busy { return 503 "operator's busy page\n"; }
END

my %ngx;
for my $which ('up', 'down') {
    my $addr = $which eq 'up' ? '%%REDIS%%' : '127.0.0.1:%%PORT3%%';
    $ngx{$which} = CreditsTest::Nginx->new(
        redis => $redis, upstream => $up, vars => { DIR => $dir },
        http => <<"END")->start;
    credits_redis $addr timeout=200ms;
    credits_jwt_key_file %%DIR%%/hs.key;

    server {
        listen 127.0.0.1:%%PORT%%;
$locations
    }
END
}

my $token = jwt_hs('HS256', $secret, { sub => 'ans', exp => time + 600 });
my %auth = (Authorization => "Bearer $token");

sub is_json_answer {
    my ($r, $status, $body, $name) = @_;
    is $r->{status}, $status, "$name: $status";
    is $r->{headers}{'content-type'}, 'application/json',
        "$name: Content-Type: application/json";
    is $r->{body}, "$body\n", "$name: body";
    is $r->{headers}{'content-length'}, length($body) + 1,
        "$name: Content-Length";
}

# 401
my $r = $ngx{up}->get('/ai');
is_json_answer($r, 401, '{"error":"invalid_token"}', 'no token');
is $r->{headers}{'www-authenticate'}, 'Bearer error="invalid_token"',
    '401: WWW-Authenticate';

$r = $ngx{up}->get('/ai', Authorization => 'Bearer not.a.token');
is_json_answer($r, 401, '{"error":"invalid_token"}', 'bad token');

# 402, and a negative balance is one too
$redis->cmd('SET', 'credits:{ans}:balance', 3);
$r = $ngx{up}->get('/ai', %auth);
is_json_answer($r, 402,
    '{"error":"insufficient_credits","required":5,"balance":3}', 'too low');

$redis->cmd('SET', 'credits:{ans}:balance', 0);
$redis->cmd('INCRBY', 'credits:{ans}:balance', -7);
for my $path ('/ai', '/ai-open') {
    $r = $ngx{up}->get($path, %auth);
    is_json_answer($r, 402,
        '{"error":"insufficient_credits","required":5,"balance":-7}',
        "negative balance at $path");
}
is $up->requests, 0, 'the upstream was never called';
is $redis->cmd('GET', 'credits:{ans}:balance'), -7, 'negative balance kept';
is $redis->cmd('ZCARD', 'credits:{ans}:holds'), 0, 'no hold placed';
unlike $ngx{up}->error_log, qr/unexpected reply/,
    'a negative balance is no Redis error';

$r = $ngx{up}->request('HEAD', '/ai', headers => \%auth);
is $r->{status}, 402, 'HEAD: 402';
is $r->{body}, '', 'HEAD: no body';

# 503
$r = $ngx{down}->get('/ai', %auth);
is_json_answer($r, 503, '{"error":"credits_unavailable"}', 'redis down');
is $r->{headers}{'retry-after'}, 1, '503: Retry-After';

$r = $ngx{down}->get('/ai-open', %auth);
is $r->{status}, 200, 'redis down, credits_fail open: forwarded';

# the operator's error_page wins over each
$r = $ngx{up}->get('/ai-pages');
is_deeply [ $r->{status}, $r->{body} ], [ 200, "please log in\n" ],
    'error_page 401 = /login';
$r = $ngx{up}->get('/ai-pages', %auth);
is_deeply [ $r->{status}, $r->{body} ], [ 200, "buy credits\n" ],
    'error_page 402 = /buy';
$r = $ngx{down}->get('/ai-pages', %auth);
is_deeply [ $r->{status}, $r->{body} ], [ 503, "operator's busy page\n" ],
    'error_page 503 /busy';
is $up->requests, 1, 'only the fail-open request reached the upstream';

done_testing;
