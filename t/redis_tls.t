# TLS to Redis (credits_redis ... ssl, credits_redis_ssl_*) against a real
# redis-server on its TLS port, with a CA made by the test: the right CA
# with verification charges exactly; a wrong CA, a wrong name, a server
# that wants a client certificate and gets none or a stranger's answer 503
# with a clear error log line (or forward uncharged under credits_fail
# open); verification off takes any certificate; the name in
# credits_redis is the name verified; `nginx -t` refuses bad TLS settings.
use strict;
use warnings;
use Test::More;
use Time::HiRes qw(sleep time);
use lib 't/lib';
use CreditsTest;
use CreditsManaged;

my $dir = test_dir();
my $secret = 'tls-secret-0123456789abcdef';
write_file('hs.key', $secret);
write_file('junk.crt', "not a certificate\n");

my $pki = CreditsManaged::PKI->new;
my $P = $pki->{dir};
my $redis = CreditsManaged::TLSRedis->start(pki => $pki);
my $mtls = CreditsManaged::TLSRedis->start(pki => $pki, auth_clients => 1);
my $up = CreditsTest::Upstream->start;
my %auth = (Authorization => 'Bearer '
            . jwt_hs('HS256', $secret, { sub => 'tls', exp => time + 600 }));

# a gateway whose Redis settings are $settings (credits_redis is http-level)
sub gateway {
    my ($settings) = @_;
    return CreditsManaged::gateway(upstream => $up, redis => $settings,
                                   price => 3);
}

sub balance { $_[0]->cmd('GET', 'credits:{tls}:balance') }

# $n requests all charged 3, each committed once
sub charges {
    my ($name, $ngx, $r, $n) = @_;
    $r->cmd('SET', 'credits:{tls}:balance', 100);
    $r->cmd('DEL', 'credits:{tls}:ledger');
    my @st = map { $ngx->get('/ai', %auth) } 1 .. $n;
    is_deeply [ map { $_->{status} } @st ], [ (200) x $n ], "$name: 200s"
        or diag $ngx->error_log;
    is_deeply [ map { $_->{headers}{'x-credits-held'} } @st ], [ (3) x $n ],
        "$name: each held 3";
    ok wait_for(sub { $r->cmd('ZCARD', 'credits:{tls}:holds') == 0 }, 5),
        "$name: settled";
    is balance($r), 100 - 3 * $n, "$name: charged exactly";
    my %commits;
    $commits{$_->{request_id}}++
        for grep { $_->{outcome} eq 'commit' } @{ ledger($r, 'tls') };
    is_deeply \%commits, { map { $_->{headers}{'x-hold'} => 1 } @st },
        "$name: one commit per request";
}

# 503, nothing held, the upstream not called, and the log says why; under
# credits_fail open the request goes on uncharged.  The worker tries
# again with a growing backoff (100 ms, doubled: 5 tries in 2 s), not at
# a steady pace, and quits promptly (timeout=500ms for what it keeps).
sub refused {
    my ($name, $ngx, $r, $log) = @_;
    my $t0 = time;
    $r->cmd('SET', 'credits:{tls}:balance', 100);
    my $calls = $up->requests;
    my $res = $ngx->get('/ai', %auth);
    is $res->{status}, 503, "$name: 503";
    is $up->requests, $calls, "$name: upstream not called";
    like $ngx->error_log, $log, "$name: the error log says why";
    $res = $ngx->get('/open', %auth);
    is $res->{status}, 200, "$name, credits_fail open: forwarded";
    ok !exists $res->{headers}{'x-credits-held'}, "$name, open: nothing held";
    is balance($r), 100, "$name: balance untouched";

    sleep 2 - (time - $t0) if time - $t0 < 2;
    my $addr = $r->tls_addr;
    my $tries = () = $ngx->error_log
        =~ /\[(?:error|crit)\][^\n]*credits: redis \Q$addr\E: /g;
    ok $tries <= 8, "$name: $tries failures logged in 2 s: it backs off";
    $t0 = time;
    $ngx->stop;
    my $secs = time - $t0;
    ok $secs < 3, sprintf "%s: nginx quits in %.1f s", $name, $secs;
}

my $right = "credits_redis_ssl_trusted_certificate $P/ca.crt;";
my $verify = "credits_redis_ssl_verify on;";

# -- the right CA, verified against the name it was issued for ------------

my $ngx = gateway("credits_redis @{[ $redis->tls_addr ]} ssl timeout=1s;
    $right $verify credits_redis_ssl_name redis.test;")->start;
charges('right CA, verify on', $ngx, $redis, 6);
$ngx->stop;

# the name as written in credits_redis is the name verified (and sent as
# SNI): redis.test through a resolver, no credits_redis_ssl_name
my $dns = CreditsManaged::DNS->start('redis.test' => '127.0.0.1');
$ngx = gateway("resolver @{[ $dns->addr ]} valid=1s ipv6=off;
    credits_redis redis.test:@{[ $redis->tls_port ]} ssl timeout=1s;
    $right $verify")->start;
charges('the name in credits_redis verified', $ngx, $redis, 2);
$ngx->stop;

# -- wrong CA, wrong name -------------------------------------------------

$ngx = gateway("credits_redis @{[ $redis->tls_addr ]} ssl timeout=500ms;
    credits_redis_ssl_trusted_certificate $P/wrong-ca.crt; $verify
    credits_redis_ssl_name redis.test;")->start;
refused('wrong CA', $ngx, $redis, qr/certificate verify error/);
unlike $ngx->error_log, qr/\[alert\]|exited on signal/, 'wrong CA: no crash';

$ngx = gateway("credits_redis @{[ $redis->tls_addr ]} ssl timeout=500ms;
    $right $verify credits_redis_ssl_name other.test;")->start;
refused('wrong name', $ngx, $redis, qr/does not match/);

# -- verification off: any CA, any name -----------------------------------

$ngx = gateway("credits_redis @{[ $redis->tls_addr ]} ssl timeout=1s;
    credits_redis_ssl_trusted_certificate $P/wrong-ca.crt;
    credits_redis_ssl_verify off; credits_redis_ssl_name other.test;")->start;
charges('verify off, wrong CA and name', $ngx, $redis, 3);
$ngx->stop;

$ngx = gateway("credits_redis @{[ $redis->tls_addr ]} ssl timeout=1s;")->start;
charges('ssl alone (verify off by default)', $ngx, $redis, 2);
$ngx->stop;

# plain TCP to the TLS port is no Redis at all: 503, not a hang
$ngx = gateway("credits_redis @{[ $redis->tls_addr ]} timeout=500ms;")->start;
is $ngx->get('/ai', %auth)->{status}, 503, 'no ssl against a TLS port: 503';
$ngx->stop;

# -- mutual TLS (--tls-auth-clients yes) ----------------------------------

$ngx = gateway("credits_redis @{[ $mtls->tls_addr ]} ssl timeout=500ms;
    $right $verify credits_redis_ssl_name redis.test;")->start;
refused('mutual TLS, no client certificate', $ngx, $mtls, qr/SSL|TLS/);

$ngx = gateway("credits_redis @{[ $mtls->tls_addr ]} ssl timeout=500ms;
    $right $verify credits_redis_ssl_name redis.test;
    credits_redis_ssl_certificate $P/wrong-client.crt;
    credits_redis_ssl_certificate_key $P/wrong-client.key;")->start;
refused('mutual TLS, a certificate of another CA', $ngx, $mtls, qr/SSL|TLS/);

$ngx = gateway("credits_redis @{[ $mtls->tls_addr ]} ssl timeout=1s;
    $right $verify credits_redis_ssl_name redis.test;
    credits_redis_ssl_certificate $P/client.crt;
    credits_redis_ssl_certificate_key $P/client.key;")->start;
charges('mutual TLS with the client certificate', $ngx, $mtls, 4);
$ngx->stop;

# -- nginx -t -------------------------------------------------------------

my $ssl = "credits_redis @{[ $redis->tls_addr ]} ssl;";
my $client = "credits_redis_ssl_certificate $P/client.crt;
    credits_redis_ssl_certificate_key $P/client.key;";

my ($rc, $out) = gateway("$ssl $right $verify $client
    credits_redis_ssl_verify_depth 2; credits_redis_ssl_name redis.test;")
    ->test;
is $rc, 0, 'nginx -t: every TLS setting at once is accepted' or diag $out;

for my $case (
    [ 'a missing trusted certificate',
      "$ssl credits_redis_ssl_trusted_certificate $dir/none.crt; $verify",
      qr/\Q$dir\E\/none\.crt/ ],
    [ 'a trusted certificate that is no certificate',
      "$ssl credits_redis_ssl_trusted_certificate $dir/junk.crt; $verify",
      qr/\Q$dir\E\/junk\.crt/ ],
    [ 'a missing client certificate',
      "$ssl credits_redis_ssl_certificate $dir/none.crt;
       credits_redis_ssl_certificate_key $P/client.key;",
      qr/cannot load certificate "\Q$dir\E\/none\.crt"/ ],
    [ 'a client certificate that is no certificate',
      "$ssl credits_redis_ssl_certificate $dir/junk.crt;
       credits_redis_ssl_certificate_key $P/client.key;",
      qr/cannot load certificate "\Q$dir\E\/junk\.crt"/ ],
    [ 'a missing key',
      "$ssl credits_redis_ssl_certificate $P/client.crt;
       credits_redis_ssl_certificate_key $dir/none.key;",
      qr/cannot load certificate key "\Q$dir\E\/none\.key"/ ],
    [ 'a key that is not the certificate\'s',
      "$ssl credits_redis_ssl_certificate $P/client.crt;
       credits_redis_ssl_certificate_key $P/server.key;",
      qr/SSL_CTX_use_PrivateKey|key values mismatch/ ],
    [ 'verify on without a trusted certificate', "$ssl $verify",
      qr/credits_redis_ssl_trusted_certificate/ ],
    [ 'a certificate without its key',
      "$ssl credits_redis_ssl_certificate $P/client.crt;",
      qr/credits_redis_ssl_certificate_key/ ],
    [ 'a verify depth that is no number',
      "$ssl $right credits_redis_ssl_verify_depth x;",
      qr/credits_redis_ssl_verify_depth/ ],
    [ 'verify neither on nor off',
      "$ssl $right credits_redis_ssl_verify maybe;",
      qr/credits_redis_ssl_verify/ ],
    )
{
    my ($name, $settings, $msg) = @$case;
    ($rc, $out) = gateway($settings)->test;
    isnt $rc, 0, "nginx -t fails: $name";
    like $out, qr/\[emerg\][^\n]*$msg/, "nginx -t says so: $name"
        or diag $out;
}

done_testing;
