# docs/examples/platform.conf, as shipped, passes nginx -t and meters the
# whole platform: AI routes charge, embedded features charge the site
# owner through a cookie token, editor, uploads and settings are free.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;
use Cwd ();

my $dir = test_dir();
my ($priv, $pub) = gen_rsa_key($dir, 'builder');
rename $pub, "$dir/builder.pub";
write_file('site-token.key', 'site-token-secret');

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;

my $conf = CreditsTest::slurp('docs/examples/platform.conf');
my $module = $ENV{CREDITS_MODULE}
    || Cwd::abs_path('build/nginx/objs/ngx_http_credits_module.so');

# the substitutions the file's header names, and no others
$conf =~ s{/usr/lib/nginx/modules/ngx_http_credits_module\.so}{$module} or die;
$conf =~ s{127\.0\.0\.1:6379}{$redis->addr}ge or die;
$conf =~ s{127\.0\.0\.1:900\d}{$up->addr}ge;
$conf =~ s{/etc/nginx/credits/}{$dir/}g;
$conf =~ s{/var/log/nginx/}{%%TMP%%/}g;
$conf =~ s{listen 8080;}{listen 127.0.0.1:%%PORT%%;} or die;
$conf =~ s{worker_processes auto;}{worker_processes 2;\npid %%TMP%%/nginx.pid;}
    or die;
$conf =~ s#^http \{#http {\n    client_body_temp_path %%TMP%%/body;\n    proxy_temp_path %%TMP%%/proxy;#m
    or die;

my $ngx = CreditsTest::Nginx->new(conf => $conf, redis => $redis);
my ($rc, $out) = $ngx->test;
is $rc, 0, 'platform.conf passes nginx -t' or diag $out;
$ngx->start;

my $now = time;
my $owner = jwt_pem('RS256', $priv, { sub => 'site-42',
    iss => 'https://accounts.builder.example', aud => 'ai-gateway',
    exp => $now + 600 });
my %auth = (Authorization => "Bearer $owner");
$redis->cmd('SET', 'credits:{site-42}:balance', 1000);

sub balance { $redis->cmd('GET', 'credits:{site-42}:balance') }

sub charged {
    my ($method, $path, %h) = @_;
    my $before = balance();
    my $r = $ngx->request($method, $path, headers => \%h,
                          body => $method eq 'POST' ? 'x' : '');
    wait_for(sub { $redis->cmd('ZCARD', 'credits:{site-42}:holds') == 0 }, 5);
    return ($r, $before - balance());
}

my @routes = (
    ['/api/sites/generate', 20, 'site-generate'],
    ['/api/sites/refine', 5, 'site-refine'],
    ['/api/apps/chatbot', 1, 'chatbot'],
    ['/api/apps/voice', 3, 'voice'],
    ['/api/apps/scraper', 2, 'scraper'],
    ['/api/images/generate', 4, 'image'],
    ['/api/images/generate?size=large', 8, 'image'],
);

for (@routes) {
    my ($path, $price, $route) = @$_;
    my ($r, $spent) = charged('POST', $path, %auth);
    is $r->{status}, 200, "$path: 200";
    is $r->{headers}{'x-credits-held'}, $price, "$path: held $price";
    is $spent, $price, "$path: charged $price";
    is ledger($redis, 'site-42')->[-1]{route}, $route, "$path: route $route";
}

my ($r, $spent) = charged('POST', '/api/sites/generate?hdr=X-Credits-Cost:%2012', %auth);
is $r->{headers}{'x-credits-charged'}, 12, 'generation reports its cost';
is $spent, 12, 'charged the reported 12 of 20';
ok !exists $r->{headers}{'x-credits-cost'}, 'cost header not shown';

($r, $spent) = charged('POST', '/api/sites/generate');
is $r->{status}, 401, 'AI without a token: 401';

# a visitor of the published site: the cookie's site token names the owner
my $site = jwt_hs('HS256', 'site-token-secret', { owner => 'site-42',
    iss => 'https://publish.builder.example', aud => 'embedded',
    exp => $now + 600 });
($r, $spent) = charged('POST', '/embed/chatbot', Cookie => "site_token=$site");
is $r->{status}, 200, 'embedded feature: 200';
is $spent, 1, "embedded feature: the owner's project pays";
($r) = charged('POST', '/embed/chatbot', %auth);
is $r->{status}, 401, 'embedded feature ignores the Authorization header';

# one visitor spends at most 30 credits an hour (the one above counted as
# the anonymous visitor), another is not held back by the first
my @st = map { $ngx->request('POST', '/embed/chatbot', body => 'x',
                   headers => { Cookie => "site_token=$site; vid=v1" })->{status} }
             1 .. 31;
is_deeply [ @st[0 .. 29] ], [ (200) x 30 ], 'a visitor: 30 requests pass';
$r = $ngx->request('POST', '/embed/chatbot', body => 'x',
                   headers => { Cookie => "site_token=$site; vid=v1" });
is $r->{status}, 429, '... the next ones get 429';
like $r->{body}, qr/^\{"error":"visitor_limit_reached","limit":30,"retry_after":\d+\}$/,
    '... visitor_limit_reached';
($r) = charged('POST', '/embed/chatbot', Cookie => "site_token=$site; vid=v2");
is $r->{status}, 200, 'another visitor passes';

# manual work is free: no token, no charge, no ledger entry
my $entries = @{ ledger($redis, 'site-42') };
for my $path ('/api/editor/page/1', '/api/uploads/logo.png',
              '/api/settings/domain')
{
    ($r, $spent) = charged('POST', $path);
    is $r->{status}, 200, "$path: free and open";
    is $spent, 0, "$path: nothing charged";
}
is scalar @{ ledger($redis, 'site-42') }, $entries, 'no ledger entries';

like $ngx->get('/credits/status')->{body},
     qr/^credits_requests_total\{outcome="committed"\} 40$/m,
     'status counts the commits';
like CreditsTest::slurp($ngx->dir . '/credits.log'),
     qr/project=site-42 route=chatbot price=1 held=1 charged=1 balance=\d+ outcome=committed hold=[0-9a-f]{32}/,
     'the credits log line';

done_testing;
