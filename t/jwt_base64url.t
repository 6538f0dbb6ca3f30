# RFC 7515: a token's three segments are base64url without padding.  A
# segment with "=" padding or the "+" "/" alphabet is refused with 401 even
# when its signature matches the bytes as sent (nginx's decoder stops at
# "=", libjwt maps "+" and "/" like "-" and "_"), and Redis is not touched.
# The same token spelled the canonical way passes, before and after (so a
# verified-token cache holding it must not let the other spelling in).
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;
use Digest::SHA qw(hmac_sha256);
use MIME::Base64 qw(encode_base64);

my $dir = test_dir();
my $secret = 'b64url-secret-0123456789abcdef';
write_file('hs.key', $secret);

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;
    credits_price 3;

    server {
        listen 127.0.0.1:%%PORT%%;

        location /ai {
            credits on;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /nocache {
            credits on;
            credits_jwt_cache_size 0;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$ngx->start;

my $P = 'b64';
$redis->cmd('SET', "credits:{$P}:balance", 1000);

sub std64 { my $s = encode_base64(shift, ''); $s =~ s/=+$//; $s }
sub padded { my $s = encode_base64(shift, ''); $s =~ tr{+/}{-_}; $s }

# the header and claims as JSON texts, a segment's spelling as a function
# of its bytes; the signature is over the two first segments as sent
sub token {
    my ($header, $claims, %spell) = @_;
    my @seg = map { ($spell{$_->[0]} || \&b64url)->($_->[1]) }
              [h => $header], [p => $claims];
    my $input = "$seg[0].$seg[1]";
    return "$input." . ($spell{s} || \&b64url)->(hmac_sha256($input, $secret));
}

my $exp = time + 600;

# JSON texts whose canonical spelling contains $want: a "kid" or claim
# grows until it does
sub header_with {
    my ($want) = @_;
    for my $i (0 .. 500) {
        my $h = qq({"alg":"HS256","kid":"k$i?>~","typ":"JWT"});
        return $h if $want->($h);
    }
    die 'no header found';
}

sub claims_with {
    my ($want, $n) = @_;
    for my $i (0 .. 500) {
        my $c = qq({"exp":$exp,"n":"$n$i?>~","sub":"$P"});
        return $c if $want->($c);
    }
    die 'no claims found';
}

my $plain_h = '{"alg":"HS256","typ":"JWT"}';
my $unpadded = sub { length(b64url($_[0])) % 4 != 0 };
my $has = sub { my $c = shift; sub { b64url($_[0]) =~ /\Q$c\E/ } };
my $sig_has = sub {
    my $c = shift;
    sub { b64url(hmac_sha256(b64url($plain_h) . '.' . b64url($_[0]), $secret))
          =~ /\Q$c\E/ }
};

my $plus = sub { (my $s = b64url($_[0])) =~ tr{-}{+}; $s };
my $slash = sub { (my $s = b64url($_[0])) =~ tr{_}{/}; $s };

# name => header, claims, spelling of the header (h), claims (p), signature (s)
my @cases = (
    [ 'padded header', header_with($unpadded), claims_with(sub { 1 }, 'a'),
      h => \&padded ],
    [ 'padded claims', $plain_h, claims_with($unpadded, 'b'), p => \&padded ],
    [ 'padded signature', $plain_h, claims_with(sub { 1 }, 'c'),
      s => \&padded ],
    [ '"+" in the header', header_with($has->('-')),
      claims_with(sub { 1 }, 'd'), h => $plus ],
    [ '"/" in the header', header_with($has->('_')),
      claims_with(sub { 1 }, 'e'), h => $slash ],
    [ '"+" in the claims', $plain_h, claims_with($has->('-'), 'f'),
      p => $plus ],
    [ '"/" in the claims', $plain_h, claims_with($has->('_'), 'g'),
      p => $slash ],
    [ '"+" in the signature', $plain_h, claims_with($sig_has->('-'), 'h'),
      s => $plus ],
    [ '"/" in the signature', $plain_h, claims_with($sig_has->('_'), 'i'),
      s => $slash ],
    [ 'standard alphabet throughout', header_with($has->('-')),
      claims_with($has->('_'), 'j'), h => \&std64, p => \&std64,
      s => \&std64 ],
);

sub evals {
    my $info = $redis->cmd('INFO', 'commandstats');
    my $n = 0;
    $n += $1 while $info =~ /^cmdstat_eval(?:sha)?:calls=(\d+)/mg;
    return $n;
}

sub state {
    return join ' ', evals(), $redis->cmd('GET', "credits:{$P}:balance"),
        $redis->cmd('XLEN', "credits:{$P}:ledger"),
        $redis->cmd('ZCARD', "credits:{$P}:holds");
}

sub entries { $redis->cmd('XLEN', "credits:{$P}:ledger") }

# a canonical token: 200, held, settled in the ledger
sub charged {
    my ($path, $token, $where) = @_;
    my $n = entries();
    my $r = $ngx->get($path, Authorization => "Bearer $token");
    is $r->{status}, 200, "$where: 200";
    is $r->{headers}{'x-credits-held'}, 3, "$where: held";
    ok wait_for(sub { entries() == $n + 1 }, 10), "$where: settled";
}

for my $path ('/ai', '/nocache') {
    for my $c (@cases) {
        my ($name, $header, $claims, %spell) = @$c;
        my $good = token($header, $claims);
        my $bad = token($header, $claims, %spell);
        my $where = "$path, $name";

        isnt $bad, $good, "$where: spelled another way";
        like $bad, qr/[=+\/]/, "$where: has a character outside base64url";

        # the canonical spelling passes and is charged (and may be cached)
        charged($path, $good, "$where: canonical token");

        my $before = state();
        my $calls = $up->requests;
        my $log = length $ngx->error_log;

        my $r = $ngx->get($path, Authorization => "Bearer $bad");
        is $r->{status}, 401, "$where: 401";
        is $r->{headers}{'www-authenticate'}, 'Bearer error="invalid_token"',
            "$where: WWW-Authenticate";
        like substr($ngx->error_log, $log),
            qr/\[info\].*credits: invalid token: malformed token/,
            "$where: malformed token logged";
        is $up->requests, $calls, "$where: upstream not called";
        is state(), $before, "$where: Redis untouched (no script, balance, "
                             . "ledger, holds)";

        charged($path, $good, "$where: canonical token again");
    }
}

is $redis->cmd('GET', "credits:{$P}:balance"), 1000 - 3 * entries(),
    'only canonical tokens were charged';

done_testing;
