# Each algorithm family with its key, the algorithm pinned against the key
# (an HS256 token signed with the public key's PEM bytes must never pass),
# the verified-token cache, and key and configuration errors at nginx -t.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;
use MIME::Base64 ();

my $dir = test_dir();
my ($rsa, $rsa_pub) = gen_rsa_key($dir);
my %ec = map { $_->[0] => [gen_ec_key($dir, $_->[1])] }
         ['ES256', 'prime256v1'], ['ES384', 'secp384r1'], ['ES512', 'secp521r1'];

my $hs = write_file('hs.key', 'a-secret-of-enough-length-0123456789');

my $up = CreditsTest::Upstream->start;

my $locations = '';
for my $alg (qw(RS256 RS384 RS512)) {
    $locations .= "location /$alg { credits on; credits_jwt_algorithms $alg; "
                . "credits_jwt_key_file $rsa_pub; proxy_pass http://%%UPSTREAM%%; }\n";
}
for my $alg (sort keys %ec) {
    $locations .= "location /$alg { credits on; credits_jwt_algorithms $alg; "
                . "credits_jwt_key_file $ec{$alg}[1]; proxy_pass http://%%UPSTREAM%%; }\n";
}
for my $alg (qw(HS256 HS384 HS512)) {
    $locations .= "location /$alg { credits on; credits_jwt_algorithms $alg; "
                . "credits_jwt_key_file $hs; proxy_pass http://%%UPSTREAM%%; }\n";
}

my $ngx = CreditsTest::Nginx->new(upstream => $up, log_level => 'debug',
                                  http => <<"END");
    credits_price 0;
    server {
        listen 127.0.0.1:%%PORT%%;
        add_header X-Project \$credits_project always;
        $locations
        location /small {
            credits on;
            credits_jwt_key_file $hs;
            credits_jwt_cache_size 2;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /nocache {
            credits on;
            credits_jwt_key_file $hs;
            credits_jwt_cache_size 0;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /default {
            credits on;
            credits_jwt_key_file $hs;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$ngx->start;

my %claims = (sub => 'proj-k', exp => time + 600);

sub status_of {
    my ($path, $token) = @_;
    my $r = $ngx->get($path, Authorization => "Bearer $token");
    return $r->{status} == 200 ? "200 $r->{headers}{'x-project'}"
                               : $r->{status};
}

for my $alg (qw(RS256 RS384 RS512)) {
    is status_of("/$alg", jwt_pem($alg, $rsa, \%claims)), '200 proj-k',
        "$alg token accepted";
}
for my $alg (sort keys %ec) {
    is status_of("/$alg", jwt_pem($alg, $ec{$alg}[0], \%claims)),
        '200 proj-k', "$alg token accepted";
}
for my $alg (qw(HS256 HS384 HS512)) {
    is status_of("/$alg", jwt_hs($alg, 'a-secret-of-enough-length-0123456789',
                                 \%claims)),
        '200 proj-k', "$alg token accepted";
}

# the pinned algorithm: wrong family, wrong size, the key-confusion attack
my $pem = CreditsTest::slurp($rsa_pub);
is status_of('/RS256', jwt_hs('HS256', $pem, \%claims)), 401,
    'HS256 token signed with the RSA public key PEM as secret: 401';
is status_of('/ES256', jwt_hs('HS256', CreditsTest::slurp($ec{ES256}[1]),
                              \%claims)), 401,
    'HS256 token signed with the EC public key PEM as secret: 401';
is status_of('/RS256', jwt_pem('RS384', $rsa, \%claims)), 401,
    'RS384 token where only RS256 is accepted: 401';
is status_of('/ES256', jwt_pem('ES384', $ec{ES384}[0], \%claims)), 401,
    'ES384 token on an ES256 location: 401';
my ($other) = gen_rsa_key($dir, 'other');
is status_of('/RS256', jwt_pem('RS256', $other, \%claims)), 401,
    'RS256 token signed by another key: 401';
is status_of('/ES256', jwt_raw('{"alg":"ES256"}', json_encode(\%claims),
                               'HS256', 'x')), 401,
    'ES256 token with a garbage signature: 401';

# the verified-token cache: hits, no cross-token hits, bounded, expiry
sub cache_log {
    my ($from) = @_;
    my $log = substr($ngx->error_log, $from);
    return (scalar(() = $log =~ /token cache hit/g),
            scalar(() = $log =~ /token cache full, evicting/g));
}

my $t1 = jwt_hs('HS256', 'a-secret-of-enough-length-0123456789',
                { sub => 'one', exp => time + 600 });
my $t2 = jwt_hs('HS256', 'a-secret-of-enough-length-0123456789',
                { sub => 'two', exp => time + 600 });
my $t3 = jwt_hs('HS256', 'a-secret-of-enough-length-0123456789',
                { sub => 'three', exp => time + 600 });

my $mark = length $ngx->error_log;
is status_of('/small', $t1), '200 one', 'first use of a token';
is status_of('/small', $t1), '200 one', 'second use';
is status_of('/small', $t2), '200 two', 'another token: its own project';
is status_of('/small', $t2), '200 two', 'another token again';
my ($hits, $evictions) = cache_log($mark);
is $hits, 2, 'repeated tokens were served from the cache';
is $evictions, 0, 'nothing evicted yet';

my ($h, $p, $s) = split /\./, $t1;
is status_of('/small', "$h.$p." . b64url('forged' x 6)), 401,
    'same claims, another signature: verified, not a cache hit';

# the cache finds an entry by a hash of the token's end (its signature):
# a token of the same length and signature but other claims shares the
# cached token's bucket and hash, and must fail the full compare
(my $claims_twin = MIME::Base64::decode_base64url($p)) =~ s/"one"/"onf"/ or die;
my $twin = "$h." . b64url($claims_twin) . ".$s";
is length($twin), length($t1), 'the twin token has the cached one\'s length';
$mark = length $ngx->error_log;
is status_of('/small', $twin), 401,
    'same length and signature, other claims: verified and refused';
($hits) = cache_log($mark);
is $hits, 0, 'the twin token was not a cache hit';

$mark = length $ngx->error_log;
is status_of('/small', $t3), '200 three', 'a third token';
($hits, $evictions) = cache_log($mark);
is $evictions, 1, 'the cache of size 2 evicted one entry';
is status_of('/small', $t1), '200 one', 'the evicted token verifies again';
($hits, $evictions) = cache_log($mark);
is $hits, 0, 'the least recently used token was the one evicted';

$mark = length $ngx->error_log;
is status_of('/nocache', $t1), '200 one', 'cache size 0';
is status_of('/nocache', $t1), '200 one', 'cache size 0 again';
($hits) = cache_log($mark);
is $hits, 0, 'credits_jwt_cache_size 0 disables the cache';

# the default cache starts with few buckets and doubles them as tokens
# come: 300 tokens, then each again, all served from the cache
my @many = map { jwt_hs('HS256', 'a-secret-of-enough-length-0123456789',
                        { sub => "p$_", exp => time + 600 }) } 1 .. 300;
my @first = map { status_of('/default', $_) } @many;
$mark = length $ngx->error_log;
my @again = map { status_of('/default', $_) } @many;
is_deeply \@again, [map { "200 p$_" } 1 .. 300],
    '300 tokens again: each its own project';
is_deeply \@first, \@again, 'as the first time';
($hits, $evictions) = cache_log($mark);
is $hits, 300, 'the default cache held all 300 as it grew';
is $evictions, 0, 'nothing evicted';

my $short = jwt_hs('HS256', 'a-secret-of-enough-length-0123456789',
                   { sub => 'brief', exp => time + 2 });
is status_of('/small', $short), '200 brief', 'short-lived token accepted';
is status_of('/small', $short), '200 brief', 'and cached';
sleep 3;
is status_of('/small', $short), 401, 'a cached token is refused at its exp';

$ngx->stop;

# configuration errors at nginx -t
sub conf_error {
    my ($name, $loc, $want) = @_;
    my $n = CreditsTest::Nginx->new(http => <<"END");
    server {
        listen 127.0.0.1:%%PORT%%;
        location / { $loc return 204; }
    }
END
    my ($rc, $out) = $n->test;
    isnt $rc, 0, "$name: nginx -t fails";
    like $out, $want, "$name: the error names the problem";
}

my $empty = write_file('empty.key', '');
my $badpem = write_file('bad.pem', "-----BEGIN PUBLIC KEY-----\nnot base64\n"
                                 . "-----END PUBLIC KEY-----\n");

conf_error('credits on without a key', 'credits on;',
           qr/"credits on" requires "credits_jwt_key_file"/);
conf_error('missing key file', "credits on; credits_jwt_key_file $dir/nope;",
           qr/credits_jwt_key_file: cannot open "\Q$dir\E\/nope"/);
conf_error('empty key file', "credits on; credits_jwt_key_file $empty;",
           qr/credits_jwt_key_file: "\Q$empty\E" is empty/);
conf_error('unusable PEM', "credits on; credits_jwt_key_file $badpem;",
           qr/"\Q$badpem\E" is not a usable PEM public key/);
conf_error('private key instead of public',
           "credits on; credits_jwt_key_file $rsa;",
           qr/is not a usable PEM public key/);
conf_error('unknown algorithm',
           "credits on; credits_jwt_key_file $hs; credits_jwt_algorithms HS257;",
           qr/unknown algorithm "HS257"/);
conf_error('none listed',
           "credits on; credits_jwt_key_file $hs; credits_jwt_algorithms none;",
           qr/"none" is never accepted/);
conf_error('None listed',
           "credits on; credits_jwt_key_file $hs; credits_jwt_algorithms HS256 None;",
           qr/"None" is never accepted/);
conf_error('HS256 with an RSA key',
           "credits on; credits_jwt_key_file $rsa_pub; credits_jwt_algorithms HS256;",
           qr/HS256 does not fit the key/);
conf_error('default HS256 with an RSA key',
           "credits on; credits_jwt_key_file $rsa_pub;",
           qr/HS256 does not fit the key/);
conf_error('RS256 with an HMAC secret',
           "credits on; credits_jwt_key_file $hs; credits_jwt_algorithms RS256;",
           qr/RS256 does not fit the key/);
conf_error('ES256 with a P-384 key',
           "credits on; credits_jwt_key_file $ec{ES384}[1]; credits_jwt_algorithms ES256;",
           qr/ES256 does not fit the key/);
conf_error('RS256 with an EC key',
           "credits on; credits_jwt_key_file $ec{ES256}[1]; credits_jwt_algorithms RS256;",
           qr/RS256 does not fit the key/);
conf_error('negative price', "credits_price -1;", qr/invalid price "-1"/);

my $n = CreditsTest::Nginx->new(http => <<'END');
    credits_redis 127.0.0.1:6379 dbx=1;
    server { listen 127.0.0.1:%%PORT%%; }
END
my ($rc, $out) = $n->test;
isnt $rc, 0, 'unknown credits_redis parameter: nginx -t fails';
like $out, qr/invalid parameter "dbx=1"/, 'and names it';

$n = CreditsTest::Nginx->new(http => <<"END");
    credits_jwt_key_file $hs;
    server { listen 127.0.0.1:%%PORT%%; location / { credits off; } }
END
($rc, $out) = $n->test;
is $rc, 0, 'a key without "credits on" is fine' or diag $out;

done_testing;
