package CreditsTest;

# The test harness: real nginx (the stock binary loading the built module),
# real redis-server, a real upstream, all on 127.0.0.1.  Core Perl only.

use strict;
use warnings;

use Exporter 'import';
use File::Path qw(make_path remove_tree);
use File::Temp qw(tempdir);
use IO::Socket::INET;
use MIME::Base64 qw(encode_base64);
use Digest::SHA qw(hmac_sha256 hmac_sha384 hmac_sha512);
use POSIX qw(WNOHANG);
use Time::HiRes qw(sleep time);
use Scalar::Util ();

our @EXPORT = qw(free_port http_request b64url jwt_hs jwt_pem jwt_raw
    gen_rsa_key gen_ec_key json_encode parallel slurp write_file wait_for
    test_dir ledger audit settle_args location_test);

use Cwd qw(abs_path);
use File::Basename qw(dirname);

my $TOP = abs_path(dirname(__FILE__) . '/../..');

my $DIR;
my @RUNNING;    # servers to stop before the temp dir goes

END {
    local $?;
    $_ && $_->stop for @RUNNING;
}

# one temp dir per test file, kept when TEST_KEEP is set
sub test_dir {
    return $DIR if $DIR;
    make_path("$TOP/t/tmp");
    $DIR = tempdir('credits-XXXXXX', DIR => "$TOP/t/tmp",
                   CLEANUP => !$ENV{TEST_KEEP});
    return $DIR;
}

sub free_port {
    my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                  Proto => 'tcp', Listen => 1, ReuseAddr => 1)
        or die "free_port: $!";
    my $port = $s->sockport;
    close $s;
    return $port;
}

# In a child that becomes a server: die with the test process (prctl
# PR_SET_PDEATHSIG, SIGKILL), so that even a test killed outright (-9, a
# closed pipe) leaves no server behind.  The syscall's number is x86-64's.
sub die_with_parent {
    require Config;
    syscall(157, 1, 9) if $Config::Config{archname} =~ /^x86_64/;
}

sub slurp {
    my ($path) = @_;
    open my $f, '<', $path or return '';
    local $/;
    return scalar <$f>;
}

# a file of the test dir with exactly these bytes (a key, say); its path
sub write_file {
    my ($name, $data) = @_;
    my $path = test_dir() . "/$name";
    open my $f, '>', $path or die "$path: $!";
    print $f $data;
    close $f;
    return $path;
}

sub wait_for {
    my ($cond, $timeout) = @_;
    my $end = time + ($timeout // 10);
    while (time < $end) {
        my $v = $cond->();
        return $v if $v;
        sleep 0.05;
    }
    return $cond->();
}

sub port_open {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => 1);
    return $s ? 1 : 0;
}

# ---- HTTP client -----------------------------------------------------

sub http_request {
    my ($addr, $method, $path, %o) = @_;
    my ($host, $port) = split /:/, $addr;
    my $s = IO::Socket::INET->new(PeerAddr => $host, PeerPort => $port,
                                  Proto => 'tcp', Timeout => 5)
        or return { status => 0, headers => {}, body => "connect: $!" };

    my $body = $o{body} // '';
    my $req = "$method $path HTTP/1.1\r\nHost: localhost\r\n"
            . "Connection: close\r\n";
    my $h = $o{headers} || {};
    $req .= "$_: $h->{$_}\r\n" for sort keys %$h;
    $req .= "Content-Length: " . length($body) . "\r\n"
        if length $body || $method eq 'POST';
    $req .= "\r\n" . $body;

    print $s $req;

    my $raw = '';
    my $timeout = $o{timeout} // 10;
    eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        alarm $timeout;
        while (sysread($s, my $buf, 65536)) { $raw .= $buf }
        alarm 0;
    };
    close $s;

    return parse_response($raw);
}

sub parse_response {
    my ($raw) = @_;
    my ($head, $body) = split /\r\n\r\n/, $raw, 2;
    return { status => 0, headers => {}, body => $raw } unless defined $body;
    my @lines = split /\r\n/, $head;
    my ($status) = (shift(@lines) // '') =~ m{^HTTP/\S+ (\d+)};
    my %h;
    for (@lines) {
        my ($k, $v) = /^([^:]+):\s*(.*)$/ or next;
        $k = lc $k;
        $h{$k} = exists $h{$k} ? "$h{$k}, $v" : $v;
    }
    if (($h{'transfer-encoding'} // '') =~ /chunked/i) {
        my $out = '';
        while ($body =~ s/^([0-9a-fA-F]+)\r\n//) {
            my $n = hex $1;
            last if $n == 0;
            $out .= substr($body, 0, $n, '');
            $body =~ s/^\r\n//;
        }
        $body = $out;
    }
    return { status => $status // 0, headers => \%h, body => $body };
}

# ---- JWT -------------------------------------------------------------

sub b64url {
    my $s = encode_base64(shift, '');
    $s =~ tr{+/}{-_};
    $s =~ s/=+$//;
    return $s;
}

# integers become JSON numbers unless passed as \"123"; keys are sorted
sub json_encode {
    my ($v) = @_;
    if (ref $v eq 'HASH') {
        return '{' . join(',', map { json_str($_) . ':' . json_encode($v->{$_}) }
                               sort keys %$v) . '}';
    }
    return '[' . join(',', map { json_encode($_) } @$v) . ']'
        if ref $v eq 'ARRAY';
    return json_str($$v) if ref $v eq 'SCALAR';
    return 'null' unless defined $v;
    return $v if $v =~ /^-?(0|[1-9][0-9]*)(\.[0-9]+)?$/;
    return json_str($v);
}

sub json_str {
    my ($s) = @_;
    $s =~ s/(["\\])/\\$1/g;
    $s =~ s/([\x00-\x1f])/sprintf('\\u%04x', ord $1)/ge;
    return "\"$s\"";
}

my %HMAC = (HS256 => \&hmac_sha256, HS384 => \&hmac_sha384,
            HS512 => \&hmac_sha512);

sub jwt_hs {
    my ($alg, $secret, $claims, $header) = @_;
    return jwt_raw(json_encode({ alg => $alg, typ => 'JWT', %{ $header || {} } }),
                   json_encode($claims), $alg, $secret);
}

sub jwt_pem {
    my ($alg, $key, $claims, $header) = @_;
    return jwt_raw(json_encode({ alg => $alg, typ => 'JWT', %{ $header || {} } }),
                   json_encode($claims), $alg, $key);
}

# exact JSON texts, signed with $key (a secret, or a private key's path)
sub jwt_raw {
    my ($header, $payload, $alg, $key) = @_;
    my $input = b64url($header) . '.' . b64url($payload);
    return "$input." . b64url(sign($alg, $key, $input));
}

sub sign {
    my ($alg, $key, $input) = @_;
    return '' if !defined $alg || $alg =~ /^none$/i;
    return $HMAC{$alg}->($input, $key) if $HMAC{$alg};

    my ($bits) = $alg =~ /(\d+)$/;
    my $dir = test_dir();
    my $in = "$dir/sign.in";
    open my $f, '>', $in or die $!;
    print $f $input;
    close $f;
    my $sig = `openssl dgst -sha$bits -sign $key $in`;
    die "openssl dgst failed" if $? || !length $sig;
    return $alg =~ /^ES/ ? der_to_raw($sig, { 256 => 32, 384 => 48,
                                              512 => 66 }->{$bits})
                         : $sig;
}

# ECDSA: DER SEQUENCE { INTEGER r, INTEGER s } -> JOSE's fixed-width r || s
sub der_to_raw {
    my ($der, $n) = @_;
    my @b = unpack 'C*', $der;
    my $i = 1;
    $i += ($b[$i] & 0x80) ? 1 + ($b[$i] & 0x7f) : 1;
    my @out;
    for (1 .. 2) {
        my $len = $b[$i + 1];
        my @v = @b[$i + 2 .. $i + 1 + $len];
        $i += 2 + $len;
        shift @v while @v > $n && $v[0] == 0;
        unshift @v, 0 while @v < $n;
        push @out, @v;
    }
    return pack 'C*', @out;
}

sub gen_rsa_key {
    my ($dir, $name) = @_;
    $name //= 'rsa';
    system("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 "
         . "-out $dir/$name.key 2>/dev/null") == 0 or die "genpkey";
    system("openssl pkey -in $dir/$name.key -pubout -out $dir/$name.pub") == 0
        or die "pkey";
    return ("$dir/$name.key", "$dir/$name.pub");
}

sub gen_ec_key {
    my ($dir, $curve, $name) = @_;
    $name //= "ec-$curve";
    system("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:$curve "
         . "-out $dir/$name.key 2>/dev/null") == 0 or die "genpkey";
    system("openssl pkey -in $dir/$name.key -pubout -out $dir/$name.pub") == 0
        or die "pkey";
    return ("$dir/$name.key", "$dir/$name.pub");
}

# ---- helpers ------------------------------------------------------------

# forks $n children running $code; returns their (scalar) results in order
sub parallel {
    my ($n, $code) = @_;
    my @kids;
    for my $i (0 .. $n - 1) {
        pipe(my $r, my $w) or die $!;
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            close $r;
            my $v = eval { $code->($i) };
            print $w (defined $v ? $v : '');
            close $w;
            POSIX::_exit(0);
        }
        close $w;
        push @kids, [$pid, $r];
    }
    my @out;
    for (@kids) {
        my ($pid, $r) = @$_;
        local $/;
        push @out, scalar <$r>;
        close $r;
        waitpid $pid, 0;
    }
    return \@out;
}

# the ledger stream as a list of hashes (id => entry id, plus the fields)
sub ledger {
    my ($redis, $project) = @_;
    my $entries = $redis->cmd('XRANGE', "credits:{$project}:ledger", '-', '+');
    return [ map { { id => $_->[0], @{ $_->[1] } } } @$entries ];
}

# the settle script's arguments for one hold, as nginx sends them: the
# member "<id><refs>:<held>:<route>", charged, status, outcome, then the
# member's id, held and route
sub settle_args {
    my ($member, $charged, $status, $outcome) = @_;
    my ($id, $held, $route) = $member =~ /^([^:;]*)[^:]*:([^:]*):(.*)$/s
        or die "settle_args: member '$member' is not <id>:<held>:<route>\n";
    return ($member, $charged, $status, $outcome, $id, $held, $route);
}

# nginx -t of a location with "credits on" and the directives given (the
# HMAC key: hs.key in the test's directory): its exit code and output
sub location_test {
    my ($redis, $directives) = @_;
    my $n = CreditsTest::Nginx->new(redis => $redis,
                                    vars => { DIR => test_dir() },
                                    http => <<"END");
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%%;
        location /x {
            credits on;
            $directives
        }
    }
END
    return $n->test;
}

# the contract's invariant: returns (balance, charged, held) sums
sub audit {
    my ($redis, $project) = @_;
    my $balance = $redis->cmd('GET', "credits:{$project}:balance") // 0;
    my $charged = 0;
    $charged += $_->{charged} // 0 for @{ ledger($redis, $project) };
    my $held = 0;
    for (@{ $redis->cmd('ZRANGE', "credits:{$project}:holds", 0, -1) }) {
        $held += (split /:/)[1];
    }
    return ($balance, $charged, $held);
}


package CreditsTest::RedisError;

use overload '""' => sub { $_[0]->{message} }, fallback => 1;

sub new { bless { message => $_[1] }, $_[0] }
sub message { $_[0]->{message} }


package CreditsTest::Redis;

use strict;
use warnings;
use IO::Socket::INET;
use Time::HiRes qw(sleep);

sub start {
    my ($class, %o) = @_;
    my $self = bless { port => $o{port} || CreditsTest::free_port(),
                       host => $o{host} || '127.0.0.1',
                       dir => CreditsTest::test_dir(), aof => $o{aof},
                       auth => $o{auth}, args => $o{args} || [] }, $class;
    $self->start_again;
    return $self;
}

sub start_again {
    my ($self) = @_;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        CreditsTest::die_with_parent();
        open STDOUT, '>>', "$self->{dir}/redis.log";
        open STDERR, '>&', \*STDOUT;
        { exec 'redis-server', '--port', $self->{port},
               '--bind', $self->{host},
               '--save', '', '--appendonly', 'no', '--dir', $self->{dir},
               '--daemonize', 'no', '--enable-debug-command', 'yes',
               ($self->{aof} ? ('--appendonly', 'yes', '--appendfsync', 'always')
                             : ()),
               @{ $self->{args} } };
        POSIX::_exit(127);
    }
    $self->{pid} = $pid;
    push @RUNNING, $self;
    Scalar::Util::weaken($RUNNING[-1]);
    delete $self->{sock};
    CreditsTest::wait_for(sub {
        my $r = eval { $self->cmd('PING') };
        defined $r && $r eq 'PONG';
    }, 10) or die "redis-server did not start on port $self->{port}";
}

sub port { $_[0]->{port} }
sub host { $_[0]->{host} // '127.0.0.1' }
sub addr { $_[0]->host . ":$_[0]->{port}" }

sub kill9 {
    my ($self) = @_;
    kill 'KILL', $self->{pid};
    waitpid $self->{pid}, 0;
    delete $self->{pid};
    delete $self->{sock};
}

sub stop {
    my ($self) = @_;
    return unless $self->{pid};
    kill 'TERM', $self->{pid};
    waitpid $self->{pid}, 0;
    delete $self->{pid};
    delete $self->{sock};
}

sub cmd {
    my ($self, @args) = @_;
    for my $try (1 .. 2) {
        $self->connect unless $self->{sock};
        my $ok = print { $self->{sock} } resp(@args);
        my $reply = $ok ? eval { $self->read_reply } : undef;
        return $reply if $ok && !$@;
        delete $self->{sock};
        die "redis: $@" if $try == 2;
    }
}

sub resp {
    my $req = '*' . @_ . "\r\n";
    $req .= '$' . length($_) . "\r\n$_\r\n" for @_;
    return $req;
}

# a new connection, authenticated when the server wants it (auth =>
# [user, password] or [password])
sub connect {
    my ($self) = @_;
    my $sock = IO::Socket::INET->new(
        PeerAddr => $self->host, PeerPort => $self->{port},
        Proto => 'tcp', Timeout => 5) or die "redis connect: $!";
    $self->{sock} = $sock;
    return unless $self->{auth};
    print $sock resp('AUTH', @{ $self->{auth} });
    my $r = eval { $self->read_reply };
    return if defined $r && !ref $r;
    delete $self->{sock};
    die "redis AUTH: " . ($r // $@) . "\n";
}

sub read_line {
    my ($self) = @_;
    my $line = readline $self->{sock};
    die "connection closed\n" unless defined $line;
    $line =~ s/\r\n$//;
    return $line;
}

sub read_reply {
    my ($self) = @_;
    my $line = $self->read_line;
    my ($t, $v) = (substr($line, 0, 1), substr($line, 1));
    return $v if $t eq '+' || $t eq ':';
    return CreditsTest::RedisError->new($v) if $t eq '-';
    if ($t eq '$') {
        return undef if $v < 0;
        my $data = '';
        while (length $data < $v + 2) {
            read($self->{sock}, my $buf, $v + 2 - length $data) or die "eof\n";
            $data .= $buf;
        }
        return substr($data, 0, $v);
    }
    if ($t eq '*') {
        return undef if $v < 0;
        return [ map { $self->read_reply } 1 .. $v ];
    }
    die "bad reply line: $line\n";
}

sub DESTROY { local $?; $_[0]->stop }


package CreditsTest::Upstream;

# A real HTTP/1.1 server on loopback, one process per connection; the
# query string says how to answer: status, cost, sleep, reset, body, hdr,
# echo (the body is the request's X-* headers, one "name: value" a line),
# and text/event-stream answers: sse=N message events, costs=C,C,... cost
# events (event: credits) spread among them, gap=S between writes; or
# raw=BYTES sent as an event stream in two writes split at split=K;
# pause_after=N waits a second after the Nth piece.

use strict;
use warnings;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(sleep);

sub start {
    my ($class) = @_;
    my $dir = CreditsTest::test_dir();
    my $listen = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
        LocalPort => 0, Proto => 'tcp', Listen => 512, ReuseAddr => 1)
        or die "upstream listen: $!";
    my $self = bless { port => $listen->sockport,
                       log => "$dir/upstream.log" }, $class;
    open my $f, '>', $self->{log};
    close $f;

    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        CreditsTest::die_with_parent();
        $SIG{CHLD} = 'IGNORE';
        while (1) {
            my $c = $listen->accept or next;
            my $kid = fork;
            if (defined $kid && $kid == 0) {
                close $listen;
                serve($c, $self->{log});
                POSIX::_exit(0);
            }
            close $c;
        }
    }
    close $listen;
    $self->{pid} = $pid;
    push @RUNNING, $self;
    Scalar::Util::weaken($RUNNING[-1]);
    return $self;
}

sub serve {
    my ($c, $log) = @_;
    while (1) {
        my $line = <$c>;
        return unless defined $line;
        my ($method, $uri) = $line =~ /^(\S+) (\S+)/ or return;
        my %h;
        while (my $l = <$c>) {
            last if $l =~ /^\r?\n$/;
            $h{lc $1} = $2 if $l =~ /^([^:]+):\s*(.*?)\r?\n$/;
        }
        read($c, my $body, $h{'content-length'}) if $h{'content-length'};

        open my $f, '>>', $log;
        print $f "$method $uri\n";
        close $f;

        my %q;
        my ($qs) = $uri =~ /\?(.*)$/;
        for (split /&/, $qs // '') {
            my ($k, $v) = split /=/, $_, 2;
            $v //= '';
            $v =~ s/%([0-9a-fA-F]{2})/chr hex $1/ge;
            $q{$k} = $v;
        }

        sleep $q{sleep} if $q{sleep};
        return if $q{reset};

        return serve_sse($c, $log, \%q) if defined $q{sse} || defined $q{raw};

        my $status = $q{status} || 200;
        my $out = $q{body} // '{"ok":true}';
        $out = join '', map { "$_: $h{$_}\n" } sort grep { /^x-/ } keys %h
            if $q{echo};
        my $resp = "HTTP/1.1 $status X\r\nContent-Type: application/json\r\n"
                 . "Content-Length: " . length($out) . "\r\n";
        $resp .= "X-Cost: $q{cost}\r\n" if defined $q{cost};
        $resp .= "$q{hdr}\r\n" if defined $q{hdr};
        print $c "$resp\r\n$out";
        return if ($h{connection} // '') =~ /close/i;
    }
}

# an event stream, written piece by piece; the log says how far it got
sub serve_sse {
    my ($c, $log, $q) = @_;
    local $SIG{PIPE} = 'IGNORE';
    $c->autoflush(1);
    my @pieces;
    if (defined $q->{raw}) {
        my $k = $q->{split} // 0;
        @pieces = (substr($q->{raw}, 0, $k), substr($q->{raw}, $k));
    } else {
        my @costs = split /,/, $q->{costs} // '';
        my $every = @costs ? int($q->{sse} / @costs) : 0;
        for my $i (1 .. $q->{sse}) {
            push @pieces, "event: message\ndata: chunk $i\n\n";
            push @pieces, "event: credits\ndata: " . shift(@costs) . "\n\n"
                if $every && $i % $every == 0 && @costs;
        }
    }
    print $c "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           . "Cache-Control: no-cache\r\nConnection: close\r\n\r\n";
    my $sent = 0;
    for my $piece (@pieces) {
        sleep($q->{gap} // 0.02);
        sleep 1 if $q->{pause_after} && $sent == $q->{pause_after};
        last unless print $c $piece;
        $sent++;
    }
    open my $f, '>>', $log;
    print $f "sse wrote $sent of " . @pieces . "\n";
    close $f;
    return;
}

sub port { $_[0]->{port} }
sub addr { "127.0.0.1:$_[0]->{port}" }

sub requests {
    my ($self) = @_;
    my @l = split /\n/, CreditsTest::slurp($self->{log});
    return scalar @l;
}

sub stop {
    my ($self) = @_;
    return unless $self->{pid};
    kill 'KILL', $self->{pid};
    waitpid $self->{pid}, 0;
    delete $self->{pid};
}

sub DESTROY { local $?; $_[0]->stop }


package CreditsTest::Nginx;

use strict;
use warnings;
use Time::HiRes qw(sleep);

sub new {
    my ($class, %o) = @_;
    my $dir = CreditsTest::test_dir();
    my $n = ++$CreditsTest::Nginx::count;
    my $self = bless { %o, dir => "$dir/nginx$n",
                       port => CreditsTest::free_port() }, $class;
    mkdir $self->{dir};
    mkdir "$self->{dir}/$_" for qw(body proxy fastcgi uwsgi scgi logs);
    $self->{vars} = {
        PORT => $self->{port},
        PORT2 => CreditsTest::free_port(),
        PORT3 => CreditsTest::free_port(),
        TMP => $self->{dir},
        TOP => $TOP,
        ($o{redis} ? (REDIS => $o{redis}->addr) : ()),
        ($o{upstream} ? (UPSTREAM => $o{upstream}->addr) : ()),
        %{ $o{vars} || {} },
    };
    $self->write_conf;
    return $self;
}

sub write_conf {
    my ($self) = @_;
    my $d = $self->{dir};
    my $module = $ENV{CREDITS_MODULE}
        || "$TOP/build/nginx/objs/ngx_http_credits_module.so";
    my $load = $self->{load} // "load_module $module;";
    my $conf = $self->{conf} // <<"END";
$load
worker_processes @{[ $self->{workers} || 1 ]};
error_log $d/error.log @{[ $self->{log_level} || 'info' ]};
pid $d/nginx.pid;
@{[ $self->{main} || '' ]}
events { worker_connections 1024; }
http {
    access_log $d/access.log;
    client_body_temp_path $d/body;
    proxy_temp_path $d/proxy;
    fastcgi_temp_path $d/fastcgi;
    uwsgi_temp_path $d/uwsgi;
    scgi_temp_path $d/scgi;
$self->{http}
}
END
    $conf =~ s/%%(\w+)%%/exists $self->{vars}{$1} ? $self->{vars}{$1}
                                                 : die "no value for %%$1%%"/ge;
    open my $f, '>', "$d/nginx.conf" or die $!;
    print $f $conf;
    close $f;
}

sub port { $_[0]->{port} }
sub var { $_[0]->{vars}{$_[1]} }
sub dir { $_[0]->{dir} }

sub nginx {
    my ($self, @args) = @_;
    my $bin = $ENV{NGINX_BIN} || '/usr/sbin/nginx';
    my @cmd = ($bin, '-p', "$self->{dir}/", '-c', "$self->{dir}/nginx.conf",
               '-e', "$self->{dir}/error.log", @args);
    local $ENV{LD_PRELOAD} = $ENV{CREDITS_NGINX_PRELOAD}
        if $ENV{CREDITS_NGINX_PRELOAD};
    my $out = `@cmd 2>&1`;
    return ($? >> 8, $out);
}

sub test { $_[0]->nginx('-t') }

sub pid { 0 + (CreditsTest::slurp("$_[0]->{dir}/nginx.pid") || 0) }

sub start {
    my ($self) = @_;
    my ($rc, $out) = $self->nginx;
    die "nginx did not start: $out\n" . $self->error_log if $rc;
    CreditsTest::wait_for(sub { $self->pid && CreditsTest::port_open($self->{port}) }, 10)
        or die "nginx is not listening:\n" . $self->error_log;
    $self->{started} = 1;
    $self->{master} = $self->pid;
    push @RUNNING, $self;
    Scalar::Util::weaken($RUNNING[-1]);
    return $self;
}

sub workers {
    my ($self) = @_;
    my $master = $self->pid or return ();
    my @pids = map { m{/proc/(\d+)/} ? $1 : () } glob '/proc/[0-9]*/stat';
    return grep {
        my $st = CreditsTest::slurp("/proc/$_/stat");
        $st =~ /^\d+ \(.*?\) \S (\d+)/ && $1 == $master
            && CreditsTest::slurp("/proc/$_/cmdline") =~ /worker process/;
    } @pids;
}

# HUP, then wait until none of the old workers is left
sub reload {
    my ($self, %o) = @_;
    my @old = $self->workers;
    $self->write_conf if $o{http} && ($self->{http} = $o{http});
    kill 'HUP', $self->pid;
    CreditsTest::wait_for(sub {
        my %now = map { $_ => 1 } $self->workers;
        !grep { $now{$_} } @old and %now;
    }, $o{timeout} || 15) or die "reload did not finish";
}

# QUIT, as an operator stops nginx; true when every process exited by
# itself within 10 s.  Otherwise the master and its workers are killed
# (a worker left behind would keep running after the test).
sub stop {
    my ($self) = @_;
    return 1 unless $self->{started};
    my $pid = $self->{master};
    my $graceful = 1;
    if ($pid) {
        my @workers = $self->workers;
        kill 'QUIT', $pid;
        $graceful = CreditsTest::wait_for(sub { !kill 0, $pid, @workers }, 10);
        kill 'KILL', $pid, @workers unless $graceful;
    }
    $self->{started} = 0;
    return $graceful;
}

sub error_log { CreditsTest::slurp("$_[0]->{dir}/error.log") }
sub access_log { CreditsTest::slurp("$_[0]->{dir}/access.log") }

sub request {
    my ($self, $method, $path, %o) = @_;
    return CreditsTest::http_request("127.0.0.1:$self->{port}", $method,
                                     $path, %o);
}

sub get {
    my ($self, $path, %headers) = @_;
    return $self->request('GET', $path, headers => \%headers);
}

sub DESTROY { local $?; $_[0]->stop }

1;
