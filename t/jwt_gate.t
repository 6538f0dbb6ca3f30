# The JWT gate: every rejection cause answers 401 with the contract's
# WWW-Authenticate, logs its reason at info and never reaches the upstream;
# a valid token sets $credits_project.  Price 0: no Redis work is needed.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = "s3cret-\x00-bytes-with-newline\n";
write_file('hs.key', $secret);

my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(upstream => $up, vars => { DIR => $dir },
                                  http => <<'END');
    credits_jwt_key_file %%DIR%%/hs.key;
    credits_price 0;

    large_client_header_buffers 4 32k;

    server {
        listen 127.0.0.1:%%PORT%%;
        add_header X-Project $credits_project always;

        location /ai {
            credits on;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /strict {
            credits on;
            credits_jwt_algorithms HS256 HS384 HS512;
            credits_jwt_issuer https://builder.example;
            credits_jwt_audience ai-gateway;
            credits_jwt_leeway 30s;
            credits_jwt_project_claim project;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /cookie {
            credits on;
            credits_jwt_token $cookie_site_token;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /arg {
            credits on;
            credits_jwt_token $arg_token;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$ngx->start;

my $now = time;
my %ok = (sub => 'proj-1', exp => $now + 600);

sub call {
    my ($path, $token, %h) = @_;
    $h{Authorization} = "Bearer $token" if defined $token;
    return $ngx->get($path, %h);
}

sub rejected {
    my ($name, $path, $token, $reason, %h) = @_;
    my $before = $up->requests;
    my $log = length $ngx->error_log;
    my $r = call($path, $token, %h);
    is $r->{status}, 401, "$name: 401";
    is $r->{headers}{'www-authenticate'}, 'Bearer error="invalid_token"',
        "$name: WWW-Authenticate";
    is $up->requests, $before, "$name: upstream not called";
    like substr($ngx->error_log, $log),
        qr/\[info\].*credits: invalid token: \Q$reason\E/,
        "$name: reason logged at info";
}

sub accepted {
    my ($name, $path, $token, $project, %h) = @_;
    my $r = call($path, $token, %h);
    is $r->{status}, 200, "$name: 200";
    is $r->{headers}{'x-project'}, $project, "$name: \$credits_project";
}

# valid tokens
accepted('HS256', '/ai', jwt_hs('HS256', $secret, \%ok), 'proj-1');
accepted('lower-case bearer', '/ai', undef, 'proj-1',
         Authorization => 'bearer ' . jwt_hs('HS256', $secret, \%ok));
accepted('mixed-case BeArEr', '/ai', undef, 'proj-1',
         Authorization => 'BeArEr ' . jwt_hs('HS256', $secret, \%ok));
accepted('no exp claim', '/ai', jwt_hs('HS256', $secret, { sub => 'p' }), 'p');
accepted('project id charset', '/ai',
         jwt_hs('HS256', $secret, { %ok, sub => 'Ab.9_-z' }), 'Ab.9_-z');
accepted('project id of 128 chars', '/ai',
         jwt_hs('HS256', $secret, { %ok, sub => 'x' x 128 }), 'x' x 128);

# every rejection cause
rejected('no token', '/ai', undef, 'no token');
rejected('another scheme', '/ai', undef, 'no token',
         Authorization => 'Basic ' . jwt_hs('HS256', $secret, \%ok));
rejected('"Bearer" without its space', '/ai', undef, 'no token',
         Authorization => 'Bearer:' . jwt_hs('HS256', $secret, \%ok));
rejected('empty bearer', '/ai', '', 'no token');
rejected('two segments', '/ai', 'abc.def', 'malformed token');
rejected('four segments', '/ai', jwt_hs('HS256', $secret, \%ok) . '.x',
         'malformed token');
rejected('bad base64', '/ai', '!!!.' . (split /\./, jwt_hs('HS256', $secret, \%ok))[1] . '.x',
         'malformed token header');
rejected('header not JSON', '/ai', jwt_raw('not json', '{}', 'HS256', $secret),
         'malformed token header');
rejected('claims not JSON', '/ai',
         jwt_raw('{"alg":"HS256"}', '{"sub":', 'HS256', $secret),
         'malformed token claims');
rejected('claims not an object', '/ai',
         jwt_raw('{"alg":"HS256"}', '["proj-1"]', 'HS256', $secret),
         'malformed token claims');

my $good = jwt_hs('HS256', $secret, \%ok);
my ($h, $p, $s) = split /\./, $good;
rejected('bad signature', '/ai', "$h.$p." . b64url('x' x 32), 'bad signature');
rejected('wrong secret', '/ai', jwt_hs('HS256', 'other', \%ok), 'bad signature');
rejected('claims swapped', '/ai',
         "$h." . b64url(json_encode({ %ok, sub => 'other' })) . ".$s",
         'bad signature');

rejected('HS384 not accepted', '/ai', jwt_hs('HS384', $secret, \%ok),
         'alg not accepted');
for my $none (qw(none None NONE nOnE)) {
    rejected("alg $none", '/ai',
             jwt_raw(qq({"alg":"$none","typ":"JWT"}), json_encode(\%ok),
                     'none', ''),
             'malformed token');
    rejected("alg $none with a signature", '/ai',
             jwt_raw(qq({"alg":"$none"}), json_encode(\%ok), 'HS256', $secret),
             'alg not accepted');
}
rejected('no alg', '/ai', jwt_raw('{"typ":"JWT"}', json_encode(\%ok),
                                  'HS256', $secret),
         'token header has no "alg"');

rejected('expired', '/ai', jwt_hs('HS256', $secret, { %ok, exp => $now - 5 }),
         'token expired');
rejected('exp not a number', '/ai',
         jwt_hs('HS256', $secret, { %ok, exp => \"$now" }), '"exp" is not');
rejected('not yet valid', '/ai',
         jwt_hs('HS256', $secret, { %ok, nbf => $now + 60 }),
         'token not yet valid');

rejected('no project claim', '/ai',
         jwt_hs('HS256', $secret, { exp => $now + 60 }), 'no project claim');
rejected('project claim not a string', '/ai',
         jwt_hs('HS256', $secret, { exp => $now + 60, sub => 42 }),
         'invalid project id');
rejected('empty project id', '/ai',
         jwt_hs('HS256', $secret, { %ok, sub => \'' }), 'invalid project id');
rejected('project id too long', '/ai',
         jwt_hs('HS256', $secret, { %ok, sub => 'x' x 129 }),
         'invalid project id');
for my $bad ('a b', 'a:b', 'a}b', "a\nb", 'a{b', "caf\xc3\xa9") {
    my $t = jwt_raw('{"alg":"HS256"}',
                    '{"sub":' . CreditsTest::json_str($bad) . '}',
                    'HS256', $secret);
    rejected("project id with a bad character", '/ai', $t,
             'invalid project id');
}

rejected('project id with a NUL', '/ai',
         jwt_raw('{"alg":"HS256"}', '{"sub":"a\u0000b"}', 'HS256', $secret),
         'malformed token claims');

my $long = jwt_hs('HS256', $secret, { %ok, pad => 'x' x 8200 });
rejected('token over 8 KB', '/ai', $long, 'token longer than 8 KB');

# issuer, audience, leeway, custom project claim
my %strict = (project => 'proj-2', iss => 'https://builder.example',
              aud => 'ai-gateway', exp => $now + 60);
accepted('iss and aud', '/strict', jwt_hs('HS512', $secret, \%strict),
         'proj-2');
accepted('aud array', '/strict',
         jwt_hs('HS384', $secret, { %strict, aud => ['x', 'ai-gateway'] }),
         'proj-2');
accepted('exp within leeway', '/strict',
         jwt_hs('HS256', $secret, { %strict, exp => $now - 10 }), 'proj-2');
accepted('nbf within leeway', '/strict',
         jwt_hs('HS256', $secret, { %strict, nbf => $now + 10 }), 'proj-2');
rejected('exp beyond leeway', '/strict',
         jwt_hs('HS256', $secret, { %strict, exp => $now - 60 }),
         'token expired');
rejected('nbf beyond leeway', '/strict',
         jwt_hs('HS256', $secret, { %strict, nbf => $now + 60 }),
         'token not yet valid');
rejected('wrong iss', '/strict',
         jwt_hs('HS256', $secret, { %strict, iss => 'https://evil' }),
         'wrong issuer');
rejected('no iss', '/strict',
         jwt_hs('HS256', $secret, { %strict, iss => undef }), 'wrong issuer');
rejected('wrong aud', '/strict',
         jwt_hs('HS256', $secret, { %strict, aud => 'other' }),
         'wrong audience');
rejected('aud array without it', '/strict',
         jwt_hs('HS256', $secret, { %strict, aud => ['a', 'b'] }),
         'wrong audience');
rejected('custom claim missing', '/strict',
         jwt_hs('HS256', $secret, { %strict, project => undef,
                                    sub => 'proj-2' }),
         'no project claim');
my %no_project = %strict;
delete $no_project{project};
rejected('custom claim absent', '/strict',
         jwt_hs('HS256', $secret, { %no_project, sub => 'proj-2' }),
         'no project claim');

# other token sources
accepted('cookie', '/cookie', undef, 'proj-1',
         Cookie => 'a=b; site_token=' . jwt_hs('HS256', $secret, \%ok));
rejected('cookie missing', '/cookie', undef, 'no token',
         Authorization => 'Bearer ' . jwt_hs('HS256', $secret, \%ok));
accepted('argument', '/arg?token=' . jwt_hs('HS256', $secret, \%ok), undef,
         'proj-1');

done_testing;
