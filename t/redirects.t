# The charge follows the AI upstream that answered: error_page, internal
# redirects, try_files, named locations and X-Accel-Redirect.  Every
# metered location a request enters applies its own token rules and
# price; a request holds once (the hold grows to a higher price) and is
# never charged twice; a page that stands in for a failed upstream
# releases the hold.  Subrequests (mirror) into metered locations are
# refused.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
chmod 0755, $dir;    # the static files are read by the workers' user
my $secret = 'redirect-secret-0123456789abcdef';
write_file('hs.key', $secret);
mkdir "$dir/files";
write_file('files/answer.txt', "generated\n");

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;

    server {
        listen 127.0.0.1:%%PORT%%;
        add_header X-Hold $credits_hold_id always;

        # a failed AI upstream, a free page standing in for it
        location /intercepted {
            credits on;
            credits_price 5;
            proxy_intercept_errors on;
            error_page 502 504 = /fallback;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /dead {
            credits on;
            credits_price 5;
            error_page 502 = /fallback;
            proxy_pass http://127.0.0.1:%%PORT3%%;
        }

        location /to-named {
            credits on;
            credits_price 5;
            proxy_intercept_errors on;
            error_page 500 = @fallback;
            proxy_pass http://%%UPSTREAM%%;
        }

        location = /fallback {
            return 200 "fallback\n";
        }

        location @fallback {
            return 200 "named fallback\n";
        }

        # handed on to another metered location
        location /free {
            credits on;
            credits_price 0;
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

        location /loose {
            credits on;
            credits_price 2;
            credits_route loose;
            proxy_intercept_errors on;
            error_page 404 = /strict;
            proxy_pass http://%%UPSTREAM%%;
        }

        location = /strict {
            credits on;
            credits_price 3;
            credits_route strict;
            credits_jwt_issuer platform;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /big {
            credits on;
            credits_price 5;
            credits_route big;
            proxy_intercept_errors on;
            error_page 404 = @small;
            proxy_pass http://%%UPSTREAM%%;
        }

        location @small {
            credits on;
            credits_price 2;
            credits_route small;
            set $args "";
            proxy_pass http://%%UPSTREAM%%;
        }

        location /paid-to-free {
            credits on;
            credits_price 5;
            proxy_intercept_errors on;
            error_page 404 = @free-answer;
            proxy_pass http://%%UPSTREAM%%;
        }

        location @free-answer {
            credits on;
            credits_price 0;
            set $args "";
            proxy_pass http://%%UPSTREAM%%;
        }

        location /site {
            credits on;
            credits_price 4;
            credits_route site;
            proxy_intercept_errors on;
            error_page 404 = @owner;
            proxy_pass http://%%UPSTREAM%%;
        }

        location @owner {
            credits on;
            credits_price 6;
            credits_route owner;
            credits_jwt_project_claim owner;
            set $args "";
            proxy_pass http://%%UPSTREAM%%;
        }

        # try_files into a named metered location
        location /tf {
            credits on;
            credits_price 1;
            try_files /nonexistent @tf;
        }

        location /tf-open {
            try_files /nonexistent @tf;
        }

        location @tf {
            credits on;
            credits_price 6;
            credits_route tf;
            proxy_pass http://%%UPSTREAM%%;
        }

        # X-Accel-Redirect: from an unmetered front into metered AI, and
        # from metered AI to a file it made
        location /front {
            proxy_pass http://%%UPSTREAM%%;
        }

        location = /internal-ai {
            internal;
            credits on;
            credits_price 4;
            credits_route accel;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /makes-file {
            credits on;
            credits_price 3;
            credits_route makes-file;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /files/ {
            internal;
            root %%DIR%%;
        }

        # subrequests
        location /mirrored {
            credits on;
            credits_price 2;
            credits_route mirrored;
            mirror /mirror-ai;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /mirror-open {
            mirror /mirror-ai;
            proxy_pass http://%%UPSTREAM%%;
        }

        location = /mirror-ai {
            internal;
            credits on;
            credits_price 9;
            proxy_pass http://%%UPSTREAM%%/mirror-ai-reached;
        }
    }
END
$ngx->start;

my $exp = time + 600;
my %auth = (Authorization => 'Bearer '
    . jwt_hs('HS256', $secret, { sub => 'rd', owner => 'rd-owner', exp => $exp }));
my %issued = (Authorization => 'Bearer '
    . jwt_hs('HS256', $secret, { sub => 'rd', iss => 'platform', exp => $exp }));

my %start = (rd => 1000, 'rd-owner' => 1000);
$redis->cmd('SET', "credits:{$_}:balance", $start{$_}) for keys %start;

sub settled {
    my ($project) = @_;
    wait_for(sub { $redis->cmd('ZCARD', "credits:{$project}:holds") == 0 }, 5);
}

sub entries_of {
    my ($project, $id) = @_;
    settled($project);
    return [ grep { $_->{request_id} eq $id } @{ ledger($redis, $project) } ];
}

sub fields { [ map { [ @$_{qw(route held charged outcome)} ] } @{ $_[0] } ] }

sub books_close {
    my ($name) = @_;
    for my $p (sort keys %start) {
        my ($balance, $charged, $held) = audit($redis, $p);
        is $held, 0, "$name: no open hold on $p";
        is $balance + $charged, $start{$p}, "$name: $p accounted for";
    }
}

# -- a stand-in page after a failed upstream: released ----------------------

for my $case ([ '/intercepted?status=502', 'error_page after 502' ],
              [ '/dead', 'error_page after a dead upstream' ],
              [ '/to-named?status=500', 'error_page to a named location' ]) {
    my ($path, $name) = @$case;
    my $r = $ngx->get($path, %auth);
    is $r->{status}, 200, "$name: the stand-in answered 200";
    ok !exists $r->{headers}{'x-credits-held'},
        "$name: no X-Credits-Held on the stand-in";
    settled('rd');
    my $e = ledger($redis, 'rd')->[-1];
    is_deeply [ @$e{qw(held charged outcome)} ], [ 5, 0, 'release' ],
        "$name: hold released, nothing charged";
}
is $redis->cmd('GET', 'credits:{rd}:balance'), 1000, 'stand-ins: all refunded';

# -- free location handing on to a paid one ---------------------------------

my $r = $ngx->get('/free?status=404', %auth);
is $r->{status}, 200, 'free -> paid: the paid upstream answered';
is $r->{headers}{'x-credits-held'}, 7, 'free -> paid: held the paid price';
is_deeply fields(entries_of('rd', $r->{headers}{'x-hold'})),
    [ [ 'paid', 7, 7, 'commit' ] ], 'free -> paid: charged 7 once';

# -- loose location handing on to a strict one ------------------------------

$r = $ngx->get('/loose?status=404', %auth);
is $r->{status}, 401, 'loose -> strict: the strict rules refuse the token';
is $r->{headers}{'content-type'}, 'application/json', '401 is JSON';
like $r->{body}, qr/^\{"error":"invalid_token"\}$/, '401 body';
settled('rd');
is_deeply fields([ grep { $_->{route} =~ /^(loose|strict)$/ }
                   @{ ledger($redis, 'rd') } ]),
    [ [ 'loose', 2, 0, 'release' ] ], 'loose -> strict refused: released';

$r = $ngx->get('/loose?status=404', %issued);
is $r->{status}, 200, 'loose -> strict with an issuer: served';
is $r->{headers}{'x-credits-held'}, 3, 'loose -> strict: the hold grew to 3';
is_deeply fields(entries_of('rd', $r->{headers}{'x-hold'})),
    [ [ 'strict', 3, 3, 'commit' ] ], 'loose -> strict: one entry, charged 3';

# -- a cheaper location answers: charged its price, the rest refunded -------

$r = $ngx->get('/big?status=404', %auth);
is $r->{headers}{'x-credits-held'}, 5, 'big -> small: the hold stays 5';
is_deeply fields(entries_of('rd', $r->{headers}{'x-hold'})),
    [ [ 'small', 5, 2, 'commit' ] ], 'big -> small: charged the small price';

# -- a free location answers: nothing charged ---------------------------------

$r = $ngx->get('/paid-to-free?status=404', %auth);
is $r->{status}, 200, 'paid -> free: served';
ok !exists $r->{headers}{'x-credits-held'}, 'paid -> free: nothing held';
settled('rd');
is_deeply fields([ grep { $_->{route} eq '/paid-to-free' }
                   @{ ledger($redis, 'rd') } ]),
    [ [ '/paid-to-free', 5, 0, 'release' ] ], 'paid -> free: released';

# -- another project pays at the next location ------------------------------

$r = $ngx->get('/site?status=404', %auth);
is $r->{status}, 200, 'site -> owner: served';
is_deeply fields(entries_of('rd', $r->{headers}{'x-hold'})),
    [ [ 'site', 4, 0, 'release' ] ], 'site -> owner: the site hold released';
is_deeply fields(entries_of('rd-owner', $r->{headers}{'x-hold'})),
    [ [ 'owner', 6, 6, 'commit' ] ], 'site -> owner: the owner charged 6';

# -- try_files ---------------------------------------------------------------

$r = $ngx->get('/tf', %auth);
is $r->{status}, 200, 'try_files -> named: served';
is_deeply fields(entries_of('rd', $r->{headers}{'x-hold'})),
    [ [ 'tf', 6, 6, 'commit' ] ], 'try_files from metered: one hold, 6';

$r = $ngx->get('/tf-open', %auth);
is_deeply fields(entries_of('rd', $r->{headers}{'x-hold'})),
    [ [ 'tf', 6, 6, 'commit' ] ], 'try_files from unmetered: charged 6';

$r = $ngx->get('/tf-open');
is $r->{status}, 401, 'try_files from unmetered: the token is still checked';

# -- X-Accel-Redirect ---------------------------------------------------------

$r = $ngx->get('/front?hdr=X-Accel-Redirect:%20/internal-ai', %auth);
is $r->{status}, 200, 'X-Accel-Redirect into metered AI: served';
is_deeply fields(entries_of('rd', $r->{headers}{'x-hold'})),
    [ [ 'accel', 4, 4, 'commit' ] ], 'X-Accel-Redirect into AI: charged 4';

$r = $ngx->get('/front?hdr=X-Accel-Redirect:%20/internal-ai');
is $r->{status}, 401, 'X-Accel-Redirect into AI: token checked';

$r = $ngx->get('/makes-file?hdr=X-Accel-Redirect:%20/files/answer.txt',
               %auth);
is $r->{body}, "generated\n", 'AI -> its file: the file served';
my $id = $r->{headers}{'x-hold'};
ok $id, 'AI -> its file: hold id known';
is_deeply fields(entries_of('rd', $id)), [ [ 'makes-file', 3, 3, 'commit' ] ],
    'AI -> its file: the upstream answered, committed';

$r = $ngx->get('/makes-file?hdr=X-Accel-Redirect:%20/files/missing.txt',
               %auth);
is $r->{status}, 404, 'AI -> a missing file: 404';
is_deeply fields(entries_of('rd', $r->{headers}{'x-hold'})),
    [ [ 'makes-file', 3, 0, 'release' ] ], 'AI -> a missing file: released';

# -- mirror: the subrequest is refused, the main request charged once ----------

my $mirror_hits = sub { scalar grep { m{/mirror-ai-reached} }
                        split /\n/, slurp($up->{log}) };
$r = $ngx->get('/mirrored', %auth);
is $r->{status}, 200, 'mirrored: the main request served';
is_deeply fields(entries_of('rd', $r->{headers}{'x-hold'})),
    [ [ 'mirrored', 2, 2, 'commit' ] ], 'mirrored: charged the main price once';
$r = $ngx->get('/mirror-open', %auth);
is $r->{status}, 200, 'unmetered mirror source: served';
ok wait_for(sub { $ngx->error_log =~ /subrequest "\/mirror-ai" to a metered location refused/ }, 5),
    'the mirror subrequest refusal is logged';
is $mirror_hits->(), 0, 'the metered mirror target never reached its upstream';

books_close('after every redirect');

done_testing;
