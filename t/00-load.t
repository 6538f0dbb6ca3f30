# The module loads into the stock nginx, and "credits off" passes through.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;

my $up = CreditsTest::Upstream->start;

my $ngx = CreditsTest::Nginx->new(upstream => $up, http => <<'END');
    server {
        listen 127.0.0.1:%%PORT%%;
        location /free { proxy_pass http://%%UPSTREAM%%; }
        location /off  { credits off; proxy_pass http://%%UPSTREAM%%; }
    }
END

my ($rc, $out) = $ngx->test;
is $rc, 0, 'nginx -t accepts the module' or diag $out;

$ngx->start;

my $r = $ngx->get('/free');
is $r->{status}, 200, 'pass-through without a token';
is $r->{body}, '{"ok":true}', 'upstream body';
ok !exists $r->{headers}{'x-credits-held'}, 'no credits headers';

$r = $ngx->get('/off', Authorization => 'Bearer garbage');
is $r->{status}, 200, 'credits off ignores a bad token';
is $up->requests, 2, 'upstream called twice';

done_testing;
