# The Debian packages of make deb, installed on this machine for real:
# apt-get install puts the module where Debian's nginx modules go and
# enables it in /etc/nginx/modules-enabled/, the stock nginx -t loads it
# from there, it serves a charged request, creditsctl and its man page
# work; apt-get remove disables it, apt-get purge leaves no file behind and
# the stock nginx -t still passes.  Services stay down (without-services);
# the request goes through a test nginx and redis-server on free ports.
# Run by make test-package only: CREDITS_TEST_PACKAGE is the .deb files'
# directory.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;

my $debs = $ENV{CREDITS_TEST_PACKAGE}
    or plan skip_all => 'make test-package runs this (it installs packages)';
$> == 0 or BAIL_OUT('make test-package installs packages: run it as root');

my $SO = '/usr/lib/nginx/modules/ngx_http_credits_module.so';
my $AVAILABLE = '/usr/share/nginx/modules-available/mod-http-credits.conf';
my $ENABLED = '/etc/nginx/modules-enabled/50-mod-http-credits.conf';
my $DOC = '/usr/share/doc/libnginx-mod-http-credits';

my @packages = split ' ', `dh_listpackages`;
my %deb = map { $_ => (glob "$debs/${_}_*.deb")[0] } @packages;

# packages known to dpkg (installed, or config files left), with status
sub packages {
    my %p;
    for (`dpkg-query -W -f='\${db:Status-Abbrev} \${Package}\\n'`) {
        $p{$2} = $1 if /^(\S+)\s+(\S+)$/ && $1 !~ /^[up]n/;
    }
    return \%p;
}

sub ours_installed { my $p = packages(); return grep { $p->{$_} } @packages }

sub apt {
    my $log = test_dir() . '/apt.log';
    local $ENV{DEBIAN_FRONTEND} = 'noninteractive';
    system("tools/without-services apt-get -y -q @_ >>$log 2>&1") == 0
        and return 1;
    diag CreditsTest::slurp($log);
    return 0;
}

# the files apt could have touched (Python's byte code caches aside)
sub files {
    return { map { $_ => 1 } split /\n/,
             `find /etc /usr /var/lib/dpkg/info -xdev -path '*/__pycache__' -prune -o -print` };
}

sub stock_nginx_t {
    my $out = `/usr/sbin/nginx -T 2>&1`;
    return ($? >> 8, $out);
}

# whatever fails, the packages do not stay on the machine
my $tried;
END {
    local $?;
    apt('purge', @packages) if $tried && ours_installed();
}

ok -f $deb{$_}, "$_: a .deb to install" for @packages;

# a leftover of an interrupted run goes first
if (my @left = ours_installed()) {
    note "purging the left-over @left";
    apt('purge', @left) or BAIL_OUT('cannot purge a left-over install');
}

my ($rc, $out) = stock_nginx_t();
is $rc, 0, 'the stock nginx -t passes before the install'
    or BAIL_OUT("the machine's nginx -t fails before the test: $out");

my $files = files();
my $before = packages();

$tried = 1;
ok apt('install', map { $deb{$_} } @packages), 'apt-get install ./*.deb'
    or BAIL_OUT('install failed');

is_deeply [sort grep { !$before->{$_} } keys %{ packages() }],
    [sort @packages], 'apt installed ours and nothing else';

# where Debian's nginx modules go
ok -f $SO, "the module in /usr/lib/nginx/modules/";
is CreditsTest::slurp($AVAILABLE),
    "load_module modules/ngx_http_credits_module.so;\n",
    'mod-http-credits.conf in modules-available';
is readlink($ENABLED), $AVAILABLE, 'enabled by a link in modules-enabled';
ok -x '/usr/bin/creditsctl', 'creditsctl in /usr/bin';
ok -f "$DOC/examples/platform.conf", 'the example conf';
like CreditsTest::slurp("$DOC/copyright"),
    qr{^Format: \S+/copyright-format/1\.0/\n}, 'copyright in Debian format';

my ($abi) = `dpkg-query -W -f='\${Provides}' nginx` =~ /(nginx-abi-[^,\s]+)/;
like `dpkg-query -W -f='\${Depends}' libnginx-mod-http-credits`,
    qr/(?:^|, )\Q$abi\E(?:,|$)/,
    "depends on $abi, the ABI the installed nginx provides";

($rc, $out) = stock_nginx_t();
is $rc, 0, 'the stock nginx -t passes with the module' or diag $out;
ok index($out, "# configuration file $ENABLED:\n"
              . "load_module modules/ngx_http_credits_module.so;\n") >= 0,
    'the stock nginx.conf loads it through modules-enabled';

charged_request();

my $man = `MANWIDTH=80 MANPAGER=cat man --warnings creditsctl 2>&1`;
is $?, 0, 'man creditsctl';
like $man, qr/^CREDITSCTL\(1\) .*\n\nNAME\n\s+creditsctl\s+-\s+balances/, 'renders';
like $man, qr/^\s+topup project n$/m, 'with the commands';
unlike $man, qr/warning|can't/i, 'without a warning';

ok apt('remove', @packages), 'apt-get remove';
ok !-e $SO, 'the module is gone';
ok !-e $ENABLED, 'disabled';
is readlink("$ENABLED.removed"), $AVAILABLE,
    'the link kept as .removed, as Debian does (a reinstall enables it)';
($rc, $out) = stock_nginx_t();
is $rc, 0, 'the stock nginx -t passes after remove' or diag $out;

ok apt('purge', @packages), 'apt-get purge';
is_deeply packages(), $before, 'dpkg knows the packages it knew before';
my $now = files();
is_deeply [sort grep { !$files->{$_} } keys %$now], [],
    'no file left behind in /etc, /usr, dpkg';
is_deeply [sort grep { !$now->{$_} } keys %$files], [],
    'no file of the machine taken away';
($rc, $out) = stock_nginx_t();
is $rc, 0, 'the stock nginx -t passes after purge' or diag $out;

done_testing;


# one request charged by the installed module, loaded the way the stock
# nginx.conf loads it, topped up and audited by the installed creditsctl
sub charged_request {
    my $secret = 'package-secret-0123456789abcdef';
    my $key = write_file('hs.key', $secret);

    my $redis = CreditsTest::Redis->start;
    my $up = CreditsTest::Upstream->start;
    my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
        load => 'include /etc/nginx/modules-enabled/*.conf;',
        vars => { KEY => $key }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%KEY%%;

    server {
        listen 127.0.0.1:%%PORT%%;

        location /ai/generate {
            credits on;
            credits_price 5;
            credits_route generate;
            credits_cost_header X-Cost;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END

    # "modules/" is relative to the prefix, as /usr/share/nginx/modules is
    # for the stock nginx
    symlink '/usr/lib/nginx/modules', $ngx->dir . '/modules' or die $!;
    $ngx->start;

    my $addr = $redis->addr;
    my $ctl = sub { my $o = `/usr/bin/creditsctl --redis $addr @_ 2>&1`;
                    return ($? >> 8, $o) };

    is_deeply [$ctl->('topup', 'site-1', 100)], [0, "100\n"],
        'creditsctl tops up';

    my $token = jwt_hs('HS256', $secret, { sub => 'site-1',
                                           exp => time + 600 });
    my $r = $ngx->get('/ai/generate?cost=3', Authorization => "Bearer $token");
    is $r->{status}, 200, 'a charged request through the installed module';
    is $r->{headers}{'x-credits-held'}, 5, 'held the price';
    is $r->{headers}{'x-credits-balance'}, 95, 'balance after the hold';

    ok wait_for(sub {
        ($redis->cmd('GET', 'credits:{site-1}:balance') // 0) == 97 }),
        'committed: 3 charged, 2 returned';
    my ($rc, $out) = $ctl->('audit', 'site-1');
    is $rc, 0, 'creditsctl audit: the books balance' or diag $out;

    $ngx->stop;
    $up->stop;
    $redis->stop;
}
