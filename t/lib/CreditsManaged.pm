package CreditsManaged;

# Fixtures for managed Redis, all on loopback and made by the test: a CA
# and certificates made with openssl, redis-server speaking TLS, a DNS
# server whose answers move (Net::DNS::Nameserver), Sentinel, a planned
# switch of a master to its replica, and traffic whose books are checked
# request by request.  Every process started here is ended when the test
# ends, however it ends: its END block, a signal, or (Linux) the test
# process killed outright (CreditsTest::die_with_parent).

use strict;
use warnings;

use Cwd ();
use Exporter 'import';
use File::Basename ();
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(sleep time);
use Test::More ();
use CreditsTest;

our @EXPORT = qw(traffic recovered books_exact switch_over);

my @PIDS;    # processes started here that are not CreditsTest's
my $TRAFFIC = 0; # traffic runs so far: their files' names
my $TOP = Cwd::abs_path(File::Basename::dirname(__FILE__) . '/../..');

END {
    local $?;
    stop_pid($_) for reverse @PIDS;
}

# a test stopped by a signal still runs the END blocks that end its servers
for my $sig (qw(INT TERM HUP)) {
    $SIG{$sig} = sub { exit 128 } if !$SIG{$sig} || $SIG{$sig} eq 'DEFAULT';
}

# forks $code (a command's argv, or a sub), its output to $log; its pid
sub spawn {
    my ($log, @cmd) = @_;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        CreditsTest::die_with_parent();
        $SIG{$_} = 'DEFAULT' for qw(INT TERM HUP);
        open STDOUT, '>>', $log or POSIX::_exit(127);
        open STDERR, '>&', \*STDOUT;
        if (ref $cmd[0] eq 'CODE') {
            eval { $cmd[0]->() };
            print STDERR $@ if $@;
            POSIX::_exit(1);
        }
        { exec @cmd };
        POSIX::_exit(127);
    }
    push @PIDS, $pid;
    return $pid;
}

sub stop_pid {
    my ($pid) = @_;
    return unless $pid && kill 0, $pid;
    kill 'TERM', $pid;
    my $end = time + 5;
    while (time < $end) {
        return if waitpid($pid, POSIX::WNOHANG()) != 0;
        sleep 0.02;
    }
    kill 'KILL', $pid;
    waitpid $pid, 0;
}

sub forget_pid {
    my ($pid) = @_;
    @PIDS = grep { $_ != $pid } @PIDS;
}

sub run_quiet {
    my ($what, @cmd) = @_;
    my $out = `@cmd 2>&1`;
    die "$what failed: @cmd\n$out" if $?;
    return $out;
}


# The ACL rule for $user that docs/redis.md gives, as the command to
# send (ACL SETUSER $user ...), its password $password: the docs write a
# shell command over lines, redis-cli ACL SETUSER ...
sub documented_acl {
    my ($user, $password) = @_;
    my $doc = CreditsTest::slurp("$TOP/docs/redis.md");
    my ($section) = $doc =~ /^## ACL user\n(.*?)(?=^## |\z)/ms
        or die "docs/redis.md has no ACL user section";
    my ($block) =
        $section =~ /^(    redis-cli [^\n]*ACL SETUSER \Q$user\E .*?)\n\n/ms
        or die "docs/redis.md: no redis-cli ACL SETUSER $user block";
    $block =~ s/\\\n/ /g;
    my @words = map { s/'//gr } split ' ', $block;
    shift @words while @words && $words[0] ne 'ACL';
    return map { $_ eq '>PASSWORD' ? ">$password" : $_ } @words;
}


# A gateway (not started) in front of $o{upstream}, its Redis settings
# $o{redis} (http level: credits_redis, credits_redis_ssl_*, resolver),
# tokens signed with the test dir's hs.key: /ai charges $o{price}
# (credits_fail closed), /open the same under credits_fail open; every
# answer says its hold id in X-Hold.
sub gateway {
    my (%o) = @_;
    my $price = $o{price} // 1;
    return CreditsTest::Nginx->new(upstream => $o{upstream},
        workers => $o{workers} || 1,
        vars => { DIR => CreditsTest::test_dir() }, http => <<"END");
    $o{redis}
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%% backlog=512;
        add_header X-Hold \$credits_hold_id always;
        location /ai {
            credits on;
            credits_price $price;
            credits_route ai;
            proxy_pass http://%%UPSTREAM%%;
        }
        location /open {
            credits on;
            credits_price $price;
            credits_route open;
            credits_fail open;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
}


# ---- traffic and books -------------------------------------------------

# traffic($ngx, path => '/ai', token => T, clients => 4, seconds => 6)
# starts clients that send requests back to back; ->finish waits for them
# and returns every request as { start, end, status, hold }, in the order
# they ended.  The location must add `X-Hold: $credits_hold_id`.
sub traffic {
    my ($ngx, %o) = @_;
    my $dir = CreditsTest::test_dir();
    my $tag = "traffic." . ++$TRAFFIC;
    my @pids;
    for my $c (1 .. ($o{clients} || 4)) {
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            $SIG{$_} = 'DEFAULT' for qw(INT TERM HUP);
            open my $out, '>', "$dir/$tag.$c" or POSIX::_exit(1);
            $out->autoflush(1);
            my $end = time + ($o{seconds} || 6);
            while (time < $end) {
                my $t0 = time;
                my $r = $ngx->request('GET', $o{path} || '/ai', timeout => 15,
                    headers => { Authorization => "Bearer $o{token}" });
                printf $out "%.3f %.3f %d %s\n", $t0, time, $r->{status},
                    $r->{headers}{'x-hold'} // '-';
            }
            close $out;
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    return bless { pids => \@pids, glob => "$dir/$tag.*" },
                 'CreditsManaged::Traffic';
}

# true when no answer other than 200 ended later than $limit seconds
# after $t0, and only 200s came after the last one (10 at least); diag
# says what was seen
sub recovered {
    my ($reqs, $t0, $limit) = @_;
    my @bad = grep { $_->{status} != 200 } @$reqs;
    my $last_bad = @bad ? $bad[-1]{end} : $t0;
    my $ok_after = grep { $_->{start} > $last_bad } @$reqs;
    my %count;
    $count{$_->{status}}++ for @$reqs;
    Test::More::diag(sprintf "answers %s; the last non-200 ended %.2f s "
        . "after the event, %d 200s after it",
        join(' ', map { "$_=$count{$_}" } sort keys %count),
        $last_bad - $t0, $ok_after);
    return $last_bad - $t0 <= $limit && $ok_after >= 10;
}

# The books, request by request: every 200 committed once at $price,
# every other answer charged nothing, no hold id twice in the ledger, no
# hold left open, and the project's invariant.  $redis is the master
# now; $start the balance before the traffic (no top-ups during it).
sub books_exact {
    my ($name, $redis, $project, $reqs, %o) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $price = $o{price} // 1;

    my $settled = CreditsTest::wait_for(sub {
        my $n = eval { $redis->cmd('ZCARD', "credits:{$project}:holds") };
        defined $n && !ref $n && $n == 0;
    }, $o{settle} // 10);
    Test::More::ok($settled, "$name: no hold left open")
        or Test::More::diag(Test::More::explain(
               $redis->cmd('ZRANGE', "credits:{$project}:holds", 0, -1)));

    my %entries;
    push @{ $entries{$_->{request_id} // ''} }, $_
        for @{ CreditsTest::ledger($redis, $project) };
    my @twice = grep { @{ $entries{$_} } > 1 } sort keys %entries;
    Test::More::is_deeply(\@twice, [], "$name: no hold settled twice")
        or Test::More::diag(Test::More::explain([ @entries{@twice} ]));

    my @others = grep { $_->{status} !~ /^(200|503)$/ } @$reqs;
    Test::More::is_deeply([ map { $_->{status} } @others ], [],
                          "$name: only 200 and 503 answered");

    my (@uncharged, @charged_503);
    my $ok = 0;
    for my $r (@$reqs) {
        my $e = $entries{$r->{hold}} // [];
        my @commits = grep { $_->{outcome} eq 'commit' } @$e;
        if ($r->{status} == 200) {
            $ok++;
            push @uncharged, $r
                unless @commits == 1 && $commits[0]{charged} == $price;
        } elsif (@commits) {
            push @charged_503, $r;
        }
    }
    Test::More::ok($ok > 0, "$name: $ok requests answered 200");
    Test::More::is_deeply([ map { $_->{hold} } @uncharged ], [],
                          "$name: every 200 committed once at $price")
        or Test::More::diag(Test::More::explain(
               [ map { [ $_, $entries{$_->{hold}} ] } grep { defined }
                     @uncharged[0 .. 4] ]));
    Test::More::is_deeply([ map { $_->{hold} } @charged_503 ], [],
                          "$name: no other answer charged");

    my $commits = grep { $_->{outcome} eq 'commit' }
                  map { @$_ } values %entries;
    Test::More::is($commits, $ok, "$name: as many commits as 200s");

    my ($balance, $charged, $held) = CreditsTest::audit($redis, $project);
    Test::More::is($balance, $o{start} - $price * $ok,
                   "$name: the balance is the start less what the 200s cost");
    Test::More::is($balance + $charged + $held, $o{start} + ($o{topups} // 0),
                   "$name: the invariant holds");
}

# A planned switch of the master $old to its replica $new, the way a
# managed service does it: writes paused on $old until $new has all of
# them, so that Redis itself loses nothing and the books measure the
# gateway only.  $promote->() makes $new the master (REPLICAOF NO ONE, or
# SENTINEL FAILOVER); then $old replicates from $new, $moved->() runs
# (the DNS answer moves) and $old takes commands again: the paused ones
# and every later write get READONLY.  Returns the time of the switch.
sub switch_over {
    my ($old, $new, %o) = @_;
    $old->cmd('CLIENT', 'PAUSE', 5000, 'WRITE');
    my $t0 = time;
    CreditsTest::wait_for(sub {
        my $want = info_field($old, 'master_repl_offset');
        my $have = info_field($new, 'slave_repl_offset') // -1;
        $want == $have;
    }, 3) or die "the replica did not catch up";
    $o{promote}->();
    CreditsTest::wait_for(sub { role($new) eq 'master' }, 5)
        or die "the replica was not promoted";
    $old->cmd('REPLICAOF', $new->host, $new->port);
    $o{moved}->() if $o{moved};
    $old->cmd('CLIENT', 'UNPAUSE');
    return $t0;
}

sub info_field {
    my ($redis, $field) = @_;
    my $info = $redis->cmd('INFO', 'replication');
    return $info =~ /^$field:(\S+)/m ? $1 : undef;
}

sub role {
    my ($redis) = @_;
    my $r = eval { $redis->cmd('ROLE') };
    return ref $r eq 'ARRAY' ? $r->[0] : '';
}

# a master and its replica, in sync; (master, replica)
sub replicated_pair {
    my (%o) = @_;
    my @hosts = @{ $o{hosts} || ['127.0.0.1', '127.0.0.1'] };
    my @port = $o{port} ? (port => $o{port}) : ();
    # a full sync starts at once, not after diskless sync's 5 s wait
    my @args = ('--repl-diskless-sync-delay', 0, @{ $o{args} || [] });
    my $master = CreditsTest::Redis->start(host => $hosts[0], @port,
                                           args => \@args);
    my $replica = CreditsTest::Redis->start(host => $hosts[1], @port,
                                            args => \@args);
    $replica->cmd('REPLICAOF', $master->host, $master->port);
    CreditsTest::wait_for(sub {
        (info_field($replica, 'master_link_status') // '') eq 'up';
    }, 10) or die "the replica did not sync";
    return ($master, $replica);
}

# a port free on every one of @hosts (both roles of a name on one port)
sub port_free_on {
    my (@hosts) = @_;
    for (1 .. 50) {
        my $port = 20000 + int rand 20000;
        my $free = 1;
        for my $h (@hosts) {
            my $s = IO::Socket::INET->new(LocalAddr => $h, LocalPort => $port,
                                          Proto => 'tcp', Listen => 1,
                                          ReuseAddr => 1);
            $free = 0, last unless $s;
            close $s;
        }
        return $port if $free;
    }
    die "no port free on @hosts";
}


package CreditsManaged::Traffic;

sub finish {
    my ($self) = @_;
    waitpid $_, 0 for @{ $self->{pids} };
    my @reqs;
    for my $file (glob $self->{glob}) {
        for (split /\n/, CreditsTest::slurp($file)) {
            my ($start, $end, $status, $hold) = split / /;
            push @reqs, { start => $start, end => $end, status => $status,
                          hold => $hold };
        }
        unlink $file;
    }
    return [ sort { $a->{end} <=> $b->{end} } @reqs ];
}


# ---- certificates ------------------------------------------------------

package CreditsManaged::PKI;

# A CA, a second CA that signed nothing of the server's, a server
# certificate for redis.test and 127.0.0.1, and a client certificate;
# P-256 keys, valid two days.  $pki->path('ca.crt') and so on.
sub new {
    my ($class, $dir) = @_;
    $dir //= CreditsTest::test_dir() . '/pki';
    mkdir $dir;
    my $self = bless { dir => $dir }, $class;
    $self->ca('ca', 'Credits Test CA');
    $self->ca('wrong-ca', 'Credits Wrong CA');
    $self->leaf('server', 'ca', 'redis.test',
                "subjectAltName=DNS:redis.test,IP:127.0.0.1\n"
                . "extendedKeyUsage=serverAuth\n");
    $self->leaf('client', 'ca', 'credits-gateway',
                "extendedKeyUsage=clientAuth\n");
    $self->leaf('wrong-client', 'wrong-ca', 'credits-gateway',
                "extendedKeyUsage=clientAuth\n");
    return $self;
}

sub path { "$_[0]->{dir}/$_[1]" }

sub key {
    my ($self, $name) = @_;
    CreditsManaged::run_quiet('key', 'openssl genpkey -algorithm EC',
        '-pkeyopt ec_paramgen_curve:P-256', '-out', $self->path("$name.key"));
}

sub ca {
    my ($self, $name, $cn) = @_;
    $self->key($name);
    CreditsManaged::run_quiet('CA', 'openssl req -x509 -new -days 2',
        '-key', $self->path("$name.key"), "-subj '/CN=$cn'",
        '-addext basicConstraints=critical,CA:TRUE',
        '-addext keyUsage=critical,keyCertSign,cRLSign',
        '-out', $self->path("$name.crt"));
}

sub leaf {
    my ($self, $name, $ca, $cn, $ext) = @_;
    $self->key($name);
    my $extfile = CreditsTest::write_file("pki-$name.ext",
                                          "basicConstraints=CA:FALSE\n$ext");
    CreditsManaged::run_quiet('CSR', 'openssl req -new',
        '-key', $self->path("$name.key"), "-subj '/CN=$cn'",
        '-out', $self->path("$name.csr"));
    CreditsManaged::run_quiet('certificate', 'openssl x509 -req -days 2',
        '-in', $self->path("$name.csr"), '-CA', $self->path("$ca.crt"),
        '-CAkey', $self->path("$ca.key"),
        '-set_serial', sprintf('0x%08x%08x', rand 2**32, rand 2**32),
        '-extfile', $extfile, '-out', $self->path("$name.crt"));
}


# ---- redis-server with TLS ---------------------------------------------

package CreditsManaged::TLSRedis;

# A redis-server whose clients speak TLS on tls_port; its plain port,
# bound to 127.0.0.1, is the test's own way in (the harness's client has
# no TLS), never given to nginx or creditsctl.
our @ISA = ('CreditsTest::Redis');

sub start {
    my ($class, %o) = @_;
    my $pki = $o{pki};
    my $tls = CreditsTest::free_port();
    my $self = CreditsTest::Redis::start($class, %o, args => [
        '--tls-port', $tls,
        '--tls-cert-file', $pki->path('server.crt'),
        '--tls-key-file', $pki->path('server.key'),
        '--tls-ca-cert-file', $pki->path('ca.crt'),
        '--tls-auth-clients', $o{auth_clients} ? 'yes' : 'no',
        @{ $o{args} || [] } ]);
    $self->{tls_port} = $tls;
    return $self;
}

sub tls_port { $_[0]->{tls_port} }
sub tls_addr { "127.0.0.1:$_[0]->{tls_port}" }


# ---- DNS ---------------------------------------------------------------

package CreditsManaged::DNS;

# An authoritative DNS server on 127.0.0.1, UDP and TCP on one port: A
# records from a file read at every query (so set() moves an answer at
# once), TTL 1; no AAAA; NXDOMAIN for names it does not know.  Every
# query is logged ("name type" a line).
sub start {
    my ($class, %records) = @_;
    require Net::DNS::Nameserver;
    my $dir = CreditsTest::test_dir();
    my $self = bless { file => "$dir/dns.records", log => "$dir/dns.queries",
                       records => {} }, $class;
    $self->set(%records);
    for (1 .. 10) {
        my $port = CreditsTest::free_port();
        pipe(my $r, my $w) or die $!;
        my $pid = CreditsManaged::spawn("$dir/dns.log", sub {
            close $r;
            my $ns = Net::DNS::Nameserver->new(LocalAddr => ['127.0.0.1'],
                LocalPort => $port, Verbose => 0,
                ReplyHandler => sub { $self->answer(@_) });
            # both sockets, or another port
            print $w ($ns && $ns->{select}->count == 2 ? "ok\n" : "no\n");
            close $w;
            $ns->main_loop if $ns;
        });
        close $w;
        my $said = <$r> // '';
        close $r;
        if ($said eq "ok\n") {
            @$self{qw(pid port)} = ($pid, $port);
            return $self;
        }
        CreditsManaged::stop_pid($pid);
        CreditsManaged::forget_pid($pid);
    }
    die "the DNS server found no free port";
}

sub answer {
    my ($self, $qname, $qclass, $qtype) = @_;
    if (open my $l, '>>', $self->{log}) {
        print $l "$qname $qtype\n";
    }
    my %rec = map { split ' ' } split /\n/, CreditsTest::slurp($self->{file});
    my $ip = $rec{lc $qname};
    return ('NXDOMAIN', [], [], [], { aa => 1 }) unless defined $ip;
    my @ans = $qtype eq 'A'
        ? (Net::DNS::RR->new("$qname 1 IN A $ip")) : ();
    return ('NOERROR', \@ans, [], [], { aa => 1 });
}

# set(name => ip, ...): from the next query on
sub set {
    my ($self, %records) = @_;
    $self->{records}{lc $_} = $records{$_} for keys %records;
    my $tmp = "$self->{file}.tmp";
    open my $f, '>', $tmp or die "$tmp: $!";
    my $rec = $self->{records};
    print $f map { "$_ $rec->{$_}\n" } sort keys %$rec;
    close $f;
    rename $tmp, $self->{file} or die "rename: $!";
}

sub port { $_[0]->{port} }
sub addr { "127.0.0.1:$_[0]->{port}" }

# how many queries asked for $name so far
sub queries {
    my ($self, $name) = @_;
    return scalar grep { /^\Q$name\E / } split /\n/,
                       CreditsTest::slurp($self->{log});
}

sub stop {
    my ($self) = @_;
    CreditsManaged::stop_pid(delete $self->{pid}) if $self->{pid};
}

sub DESTROY { local $?; $_[0]->stop }


# ---- Sentinel ----------------------------------------------------------

package CreditsManaged::Sentinel;

# One sentinel (redis-server --sentinel, its own config file, which it
# rewrites); commands through the harness's client.
our @ISA = ('CreditsTest::Redis');

sub start {
    my ($class, %o) = @_;
    my $port = CreditsTest::free_port();
    my $dir = CreditsTest::test_dir();
    my $self = bless { port => $port, host => '127.0.0.1', dir => $dir,
                       auth => $o{auth}, conf => "$dir/sentinel-$port.conf" },
                     $class;
    open my $f, '>', $self->{conf} or die $!;
    print $f "port $port\nbind 127.0.0.1\ndaemonize no\ndir $dir\n"
           . "logfile \"\"\n$o{conf}";
    close $f;
    $self->start_again;
    return $self;
}

sub start_again {
    my ($self) = @_;
    $self->{pid} = CreditsManaged::spawn(
        "$self->{dir}/sentinel-$self->{port}.log",
        'redis-server', $self->{conf}, '--sentinel');
    delete $self->{sock};
    CreditsTest::wait_for(sub {
        my $r = eval { $self->cmd('PING') };
        defined $r && $r eq 'PONG';
    }, 10) or die "sentinel did not start on port $self->{port}";
}

sub stop {
    my ($self) = @_;
    return unless $self->{pid};
    CreditsManaged::stop_pid(delete $self->{pid});
    delete $self->{sock};
}


package CreditsManaged::Sentinels;

# Sentinels (3 by default, quorum 2) watching $o{master} as $o{name}
# (mymaster), down after 1 s; $o{conf}: more lines for every sentinel
# (requirepass, users, sentinel-user/-pass); $o{auth}: how the test's
# client authenticates to them; $o{master_auth}: [user, password] or
# [password] for the master and its replicas.  Starts once every
# sentinel knows the replica and the other sentinels.
sub start {
    my ($class, %o) = @_;
    my $name = $o{name} || 'mymaster';
    my $n = $o{count} || 3;
    my $master = $o{master};
    my $conf = "sentinel monitor $name " . $master->host . " "
             . $master->port . " " . ($o{quorum} || 2) . "\n"
             . "sentinel down-after-milliseconds $name "
             . ($o{down_after} || 1000) . "\n"
             . "sentinel failover-timeout $name 10000\n"
             . "sentinel parallel-syncs $name 1\n";
    if (my $a = $o{master_auth}) {
        $conf .= "sentinel auth-user $name $a->[0]\n" if @$a == 2;
        $conf .= "sentinel auth-pass $name $a->[-1]\n";
    }
    $conf .= $o{conf} // '';

    my $self = bless { name => $name, sentinels => [
        map { CreditsManaged::Sentinel->start(conf => $conf,
                                              auth => $o{auth}) } 1 .. $n ] },
        $class;
    CreditsTest::wait_for(sub {
        for my $s ($self->all) {
            my %m = @{ $s->cmd('SENTINEL', 'MASTER', $name) };
            return 0 unless ($m{'num-other-sentinels'} // 0) == $n - 1
                         && ($m{'num-slaves'} // 0) >= ($o{replicas} // 1);
        }
        1;
    }, 20) or die "the sentinels did not find each other and the replica";
    return $self;
}

sub all { @{ $_[0]->{sentinels} } }
sub addrs { map { $_->addr } $_[0]->all }
sub name { $_[0]->{name} }

# "host:port" of the master, as the first sentinel answering says
sub master_addr {
    my ($self) = @_;
    for my $s ($self->all) {
        my $r = eval { $s->cmd('SENTINEL', 'get-master-addr-by-name',
                               $self->{name}) };
        return "$r->[0]:$r->[1]" if ref $r eq 'ARRAY';
    }
    return '';
}

# SENTINEL FAILOVER, again while a sentinel answers that it cannot yet
# (NOGOODSLAVE while it has not checked the replica, INPROG)
sub failover {
    my ($self) = @_;
    my $r;
    CreditsTest::wait_for(sub {
        $r = $self->{sentinels}[0]->cmd('SENTINEL', 'FAILOVER', $self->{name});
        !ref $r;
    }, 10) or die "SENTINEL FAILOVER: $r";
}

sub stop { $_->stop for $_[0]->all }

1;
