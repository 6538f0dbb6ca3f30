# creditsctl against managed Redis: --tls with --cacert, --sni, --cert
# and --key (mutual TLS), --user with --password, and --sentinel (with
# --sentinel-user / --sentinel-password for protected sentinels), each
# against a real server.  A wrong CA, name, certificate or password fails
# with exit 3 and one clear line.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;
use CreditsManaged;

my $bin = $ENV{CREDITSCTL} || 'build/creditsctl';
my $pki = CreditsManaged::PKI->new;
my $P = $pki->{dir};

sub ctl {
    my $out = `$bin @_ 2>&1`;
    return ($? >> 8, $out);
}

# $args reach the server: a topup and the balance it left
sub works {
    my ($name, $args, $redis, $project) = @_;
    my $before = $redis->cmd('GET', "credits:{$project}:balance") // 0;
    my ($rc, $out) = ctl("$args topup $project 5");
    is_deeply [ $rc, $out ], [ 0, $before + 5 . "\n" ], "$name: topup";
    ($rc, $out) = ctl("$args balance $project");
    is_deeply [ $rc, $out ], [ 0, $before + 5 . "\n" ], "$name: balance";
    is $redis->cmd('GET', "credits:{$project}:balance"), $before + 5,
        "$name: in Redis";
}

# $args fail: exit 3, one line naming the cause, nothing written
sub fails {
    my ($name, $args, $msg, $redis, $project) = @_;
    my $before = $redis->cmd('GET', "credits:{$project}:balance");
    my ($rc, $out) = ctl("$args topup $project 5");
    is $rc, 3, "$name: exit 3";
    like $out, qr/^creditsctl: [^\n]*$msg[^\n]*\n\z/, "$name: says why"
        or diag $out;
    is $redis->cmd('GET', "credits:{$project}:balance"), $before,
        "$name: nothing written";
}

# -- TLS ---------------------------------------------------------------

my $tls = CreditsManaged::TLSRedis->start(pki => $pki);
my $t = '--redis ' . $tls->tls_addr . ' --tls';

works('--tls --cacert --sni', "$t --cacert $P/ca.crt --sni redis.test",
      $tls, 'ctl');
works('--tls --cacert, the address verified (IP in the certificate)',
      "$t --cacert $P/ca.crt", $tls, 'ctl');
works('--tls without --cacert: no verification',
      "$t --sni other.test", $tls, 'ctl');
fails('a wrong CA', "$t --cacert $P/wrong-ca.crt --sni redis.test",
      qr/certificate verif/, $tls, 'ctl');
fails('a wrong name', "$t --cacert $P/ca.crt --sni other.test",
      qr/hostname mismatch|does not match|other\.test/, $tls, 'ctl');
fails('plain TCP to the TLS port', '--redis ' . $tls->tls_addr,
      qr/redis/, $tls, 'ctl');

my ($rc, $out) = ctl("$t --cacert $P/none.crt balance ctl");
isnt $rc, 0, 'a missing --cacert file fails';
like $out, qr/\Q$P\E\/none\.crt/, 'and names the file';
($rc, $out) = ctl("$t --cert $P/client.crt balance ctl");
is $rc, 2, '--cert without --key: usage error';
($rc, $out) = ctl("--redis " . $tls->addr . " --cacert $P/ca.crt balance ctl");
is $rc, 2, '--cacert without --tls: usage error' or diag $out;

# -- mutual TLS ------------------------------------------------------------

my $mtls = CreditsManaged::TLSRedis->start(pki => $pki, auth_clients => 1);
my $m = '--redis ' . $mtls->tls_addr
      . " --tls --cacert $P/ca.crt --sni redis.test";
works('--cert --key', "$m --cert $P/client.crt --key $P/client.key",
      $mtls, 'ctl');
fails('no client certificate', $m, qr/TLS|SSL|certificate/, $mtls, 'ctl');
fails('a client certificate of another CA',
      "$m --cert $P/wrong-client.crt --key $P/wrong-client.key",
      qr/TLS|SSL|certificate|reset/, $mtls, 'ctl');

# -- an ACL user, over TLS ---------------------------------------------------

$tls->cmd('ACL', 'SETUSER', 'ctl', 'on', '>ctl-pw-0123', '~credits:*',
          '+@all');
$tls->cmd('ACL', 'SETUSER', 'default', 'off');
$tls->{auth} = [ 'ctl', 'ctl-pw-0123' ];
delete $tls->{sock};
my $u = "$t --cacert $P/ca.crt --sni redis.test";
works('--user --password', "$u --user ctl --password ctl-pw-0123",
      $tls, 'ctl');
fails('a wrong password', "$u --user ctl --password nope-4567",
      qr/WRONGPASS|AUTH/, $tls, 'ctl');
($rc, $out) = ctl("$u --user ctl --password nope-4567 balance ctl");
unlike $out, qr/nope-4567/, 'the password is not printed';
fails('no credentials', $u, qr/NOAUTH|AUTH/, $tls, 'ctl');
($rc, $out) = ctl("$u --user ctl balance ctl");
is $rc, 2, '--user without --password: usage error';

# -- Sentinel ----------------------------------------------------------------

my $master = CreditsTest::Redis->start;
my $sentinel = CreditsManaged::Sentinels->start(master => $master,
    count => 1, quorum => 1, replicas => 0);
my $s = '--redis ' . ($sentinel->all)[0]->addr;
works('--sentinel', "$s --sentinel mymaster", $master, 'ctl');
fails('--sentinel of a name it does not watch', "$s --sentinel nosuch",
      qr/nosuch/, $master, 'ctl');

my $guarded = CreditsManaged::Sentinels->start(master => $master,
    name => 'guarded', count => 1, quorum => 1, replicas => 0,
    auth => [ 'spw-0123' ],
    conf => "requirepass spw-0123\n");
($guarded->all)[0]->cmd(
    CreditsManaged::documented_acl('credits-sentinel', 'gwpw-4567'));
my $g = '--redis ' . ($guarded->all)[0]->addr . ' --sentinel guarded';
works('--sentinel-password', "$g --sentinel-password spw-0123",
      $master, 'ctl');
works('--sentinel-user --sentinel-password',
      "$g --sentinel-user credits-sentinel --sentinel-password gwpw-4567",
      $master, 'ctl');
fails('a wrong sentinel password', "$g --sentinel-password nope-8910",
      qr/WRONGPASS|AUTH/, $master, 'ctl');
fails('no sentinel password', $g, qr/NOAUTH|AUTH/, $master, 'ctl');

done_testing;
