# Hostile input, each with its exact answer: token header tricks, duplicate
# keys, nested and huge claims, project ids that must never reach a Redis
# key, a cost header abused by the upstream, oversized headers and request
# smuggling through the free routes.
use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = 'hostile-secret-0123456789';
write_file('hs.key', $secret);
my ($other_key) = gen_rsa_key($dir, 'attacker');

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%%;
        location /ai {
            credits on;
            credits_price 1;
            credits_cost_header X-Cost;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /editor/ {
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$ngx->start;
$redis->cmd('SET', 'credits:{victim}:balance', 100);

my %ok = (sub => 'victim', exp => time + 600);

sub status {
    my ($token, $path) = @_;
    return $ngx->get($path // '/ai', Authorization => "Bearer $token")->{status};
}


# alg spellings of none, signed or not
for my $alg (qw(none None NONE nOnE)) {
    is status(jwt_raw(qq({"alg":"$alg"}), json_encode(\%ok), 'none', '')
              . 'x'), 401, "alg $alg with garbage signature: 401";
    is status(jwt_raw(qq({"alg":"$alg"}), json_encode(\%ok), 'HS256', $secret)),
        401, "alg $alg with a valid HMAC: 401";
}

# kid and jku are ignored: the configured key decides
is status(jwt_hs('HS256', $secret, \%ok, { kid => '../../etc/passwd',
                                           jku => 'http://evil/jwks' })),
    200, 'kid and jku ignored, configured key verifies: 200';
is status(jwt_pem('RS256', $other_key, \%ok, { jku => 'http://evil/jwks' })),
    401, "attacker's RS256 key via jku: 401";
is status(jwt_hs('HS256', 'guess', \%ok, { kid => 'other' })), 401,
    'kid naming another key does not switch keys: 401';

# duplicate keys: one reader could see one value, another the other
is status(jwt_raw('{"alg":"none","alg":"HS256"}', json_encode(\%ok),
                  'HS256', $secret)), 401, 'duplicate alg: 401';
is status(jwt_raw('{"alg":"HS256"}',
                  '{"sub":"victim","sub":"other","exp":' . (time + 60) . '}',
                  'HS256', $secret)), 401, 'duplicate sub: 401';
is status(jwt_raw('{"alg":"HS256","crit":["exp"]}', json_encode(\%ok),
                  'HS256', $secret)), 401, 'crit header: 401';

# nested and huge claims
my $deep = '{"sub":"victim","x":' . ('[' x 3000) . (']' x 3000) . '}';
is status(jwt_raw('{"alg":"HS256"}', $deep, 'HS256', $secret)), 401,
    'claims nested 3000 deep: 401';
my $nested = '{"sub":"victim","x":' . ('[' x 100) . (']' x 100) . '}';
is status(jwt_raw('{"alg":"HS256"}', $nested, 'HS256', $secret)), 200,
    'claims nested 100 deep: 200';
is status(jwt_hs('HS256', $secret, { %ok, blob => 'y' x 5000 })), 200,
    'a 5 KB claim under the 8 KB limit: 200';

# project ids that are not strings or not safe for a key
for my $v ('42', '["victim"]', '{"a":1}', 'true', 'null', '1.5') {
    is status(jwt_raw('{"alg":"HS256"}', qq({"sub":$v}), 'HS256', $secret)),
        401, "sub $v: 401";
}
for my $id ("vic\x{0}tim", "vic\ttim", "vic\r\ntim", "v\x7fim", "vic tim",
            "vi\xc3\xa7tim", "\xe2\x80\xae", "victim}:balance", "{victim}",
            "victim:1", "../victim", "victim*")
{
    my $t = jwt_raw('{"alg":"HS256"}', '{"sub":' . CreditsTest::json_str($id)
                    . '}', 'HS256', $secret);
    is status($t), 401, 'hostile project id ' . join('', map {
        /[ -~]/ ? $_ : sprintf '\\x%02x', ord } split //, $id) . ': 401';
}
is_deeply [ grep { !/^credits:\{victim\}:(balance|ledger|holds)$/ }
            @{ $redis->cmd('KEYS', '*') } ], [],
    'no hostile project id reached a Redis key';

# the cost header abused by the upstream
my $r = $ngx->get('/ai?hdr=X-Cost:%201%0d%0aSet-Cookie:%20a=b&cost=1',
                  Authorization => "Bearer " . jwt_hs('HS256', $secret, \%ok));
is $r->{status}, 200, 'two cost headers from the upstream: forwarded';
ok !exists $r->{headers}{'x-cost'}, 'every copy of the cost header removed';
ok !exists $r->{headers}{'x-credits-charged'}, 'and none of them trusted';

$r = $ngx->get('/ai?hdr=X-Cost:%201%0dX-Evil:%202',
               Authorization => "Bearer " . jwt_hs('HS256', $secret, \%ok));
is $r->{status}, 502, 'a bare CR in an upstream header: 502 from nginx';
ok wait_for(sub { $redis->cmd('ZCARD', 'credits:{victim}:holds') == 0 }, 3),
    'settled';
is ledger($redis, 'victim')->[-1]{outcome}, 'release', 'and released';

# oversized headers never reach the module
$r = $ngx->get('/ai', Authorization => 'Bearer ' . ('a' x 9000));
is $r->{status}, 400, 'Authorization over the header buffer: 400 from nginx';
$r = $ngx->get('/ai', Authorization => 'Bearer ' . ('a.' x 2000) . 'b');
is $r->{status}, 401, 'a token of 4000 dots: 401';

# request smuggling through a free route
sub raw {
    my ($req) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                  PeerPort => $ngx->port) or die;
    print $s $req;
    my $out = '';
    eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        alarm 2;
        while (sysread($s, my $buf, 65536)) { $out .= $buf }
        alarm 0;
    };
    return $out;
}

sub ai_calls {
    scalar grep { m{^GET /ai} } split /\n/, CreditsTest::slurp("$dir/upstream.log");
}
my $ai_before = ai_calls();
my $smuggled = "GET /ai HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
my $out = raw("POST /editor/save HTTP/1.1\r\nHost: x\r\n"
              . "Content-Length: " . length($smuggled) . "\r\n"
              . "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n$smuggled");
like $out, qr{^HTTP/1\.1 400 }, 'Content-Length with Transfer-Encoding: 400';
unlike $out, qr{HTTP/1\.1 200}, 'and nothing behind it was served';

$out = raw("POST /editor/save HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
           . $smuggled);
my @statuses = $out =~ m{HTTP/1\.1 (\d{3})}g;
is_deeply \@statuses, [200, 401],
    'a request pipelined behind a free one is gated on its own: 401';

$out = raw("GET /editor/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           . "Transfer-Encoding: chunked, identity\r\n\r\n");
like $out, qr{^HTTP/1\.1 (400|501) }, 'unknown transfer coding: refused';

is ai_calls(), $ai_before, 'no smuggled request reached the metered upstream';

unlike $ngx->error_log, qr/exited on signal|\[alert\]/, 'no worker crashed';

done_testing;
