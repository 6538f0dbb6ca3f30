package CreditsCluster;

# A real Redis Cluster on loopback for the tests: masters and replicas
# started as CreditsTest::Redis servers in cluster mode, joined by
# redis-cli --cluster create.  Ports are picked so that each node's bus
# port (port + 10000) is free too.  Core Perl only.

use strict;
use warnings;

use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(sleep time);
use CreditsTest;

sub port_free {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port,
                                  Proto => 'tcp', Listen => 1, ReuseAddr => 1);
    return 0 unless $s;
    close $s;
    return 1;
}

sub pick_ports {
    my ($n) = @_;
    my (@ports, %taken);
    while (@ports < $n) {
        my $p = 20000 + int(rand(9000));
        next if $taken{$p} || !port_free($p) || !port_free($p + 10000);
        $taken{$p} = 1;
        push @ports, $p;
    }
    return @ports;
}

# start(masters => 3, replicas => 1): a cluster whose state is ok
sub start {
    my ($class, %o) = @_;
    my $masters = $o{masters} || 3;
    my $replicas = $o{replicas} // 1;
    my @ports = pick_ports($masters * (1 + $replicas));
    my @nodes = map {
        CreditsTest::Redis->start(port => $_, args => [
            '--cluster-enabled', 'yes',
            '--cluster-config-file', "nodes-$_.conf",
            '--cluster-node-timeout', 1000,
            '--cluster-require-full-coverage', 'no',
            '--cluster-replica-validity-factor', 0 ]);
    } @ports;

    my $out = `redis-cli --cluster create @{[ map { "127.0.0.1:$_" } @ports ]} --cluster-replicas $replicas --cluster-yes 2>&1`;
    die "redis-cli --cluster create failed:\n$out" if $?;

    my $self = bless { nodes => \@nodes }, $class;
    $self->wait_ok(20) or die "the cluster did not become ok";
    return $self;
}

sub nodes { @{ $_[0]->{nodes} } }

sub node_by_port {
    my ($self, $port) = @_;
    my ($n) = grep { $_->{pid} && $_->port == $port } $self->nodes;
    return $n;
}

sub live { grep { $_->{pid} } $_[0]->nodes }

# every live node answers cluster_state:ok and agrees on 16384 slots
sub wait_ok {
    my ($self, $timeout) = @_;
    return CreditsTest::wait_for(sub {
        for my $n ($self->live) {
            my $info = eval { $n->cmd('CLUSTER', 'INFO') } // '';
            return 0 unless $info =~ /cluster_state:ok/
                         && $info =~ /cluster_slots_assigned:16384/;
        }
        1;
    }, $timeout);
}

# [start, end, port of the master] for every range
sub slots {
    my ($self) = @_;
    for my $n ($self->live) {
        my $r = eval { $n->cmd('CLUSTER', 'SLOTS') };
        next unless ref $r eq 'ARRAY';
        return [ map { [ $_->[0], $_->[1], $_->[2][1] ] } @$r ];
    }
    return [];
}

sub masters {
    my ($self) = @_;
    my %seen;
    return sort { $a <=> $b } grep { !$seen{$_}++ } map { $_->[2] } @{ $self->slots };
}

sub keyslot {
    my ($self, $key) = @_;
    my ($n) = $self->live;
    return $n->cmd('CLUSTER', 'KEYSLOT', $key);
}

# the port of the master serving the slot
sub slot_owner {
    my ($self, $slot) = @_;
    for (@{ $self->slots }) {
        return $_->[2] if $slot >= $_->[0] && $slot <= $_->[1];
    }
    return undef;
}

# the port of the master serving the key
sub owner { $_[0]->slot_owner($_[0]->keyslot($_[1])) }

# a command sent straight to the owner of its key ($args[1]): nothing
# redirected, nothing counted by the nodes' errorstats
sub owner_cmd {
    my ($self, @args) = @_;
    return $self->node_by_port($self->owner($args[1]))->cmd(@args);
}

# a command for the key's owner, following MOVED and ASK
sub cmd {
    my ($self, @args) = @_;
    my ($node) = $self->live;
    my $asking = 0;
    for (1 .. 10) {
        $node->cmd('ASKING') if $asking;
        my $r = $node->cmd(@args);
        if (ref $r eq 'CreditsTest::RedisError'
            && $r->message =~ /^(MOVED|ASK) \d+ [\d.]+:(\d+)/)
        {
            $asking = $1 eq 'ASK';
            $node = $self->node_by_port($2) or die "no node on port $2";
            next;
        }
        if (ref $r eq 'CreditsTest::RedisError'
            && $r->message =~ /^(TRYAGAIN|CLUSTERDOWN)/)
        {
            sleep 0.1;
            next;
        }
        return $r;
    }
    die "cluster cmd @args: too many redirections";
}

# "project" names whose keys live on each master: { port => name }
sub projects_per_master {
    my ($self, $prefix) = @_;
    my %per;
    my @masters = $self->masters;
    for my $i (0 .. 999) {
        my $p = "$prefix$i";
        my $port = $self->owner("credits:{$p}:balance");
        $per{$port} //= $p;
        last if keys %per == @masters;
    }
    return \%per;
}

# the node replicating the master on $port
sub replica_of {
    my ($self, $port) = @_;
    my ($r) = grep {
        ($_->cmd('INFO', 'replication') // '') =~ /master_port:$port\b/
    } grep { $_->port != $port } $self->live;
    return $r;
}

# -- a project's books, read from its owner ------------------------------

sub balance { $_[0]->cmd('GET', "credits:{$_[1]}:balance") // 0 }

# true once the project holds nothing
sub settled {
    my ($self, $p, $timeout) = @_;
    return CreditsTest::wait_for(sub {
        $self->cmd('ZCARD', "credits:{$p}:holds") == 0 }, $timeout // 5);
}

sub commits {
    my ($self, $p) = @_;
    return scalar grep { $_->{outcome} eq 'commit' }
                  @{ CreditsTest::ledger($self, $p) };
}

# -- moving a slot from one master to another ------------------------------

sub id_of { $_[0]->node_by_port($_[1])->cmd('CLUSTER', 'MYID') }

# the slot starts moving: importing on $to, migrating on $from; true if
# both nodes took it
sub migrating {
    my ($self, $slot, $from, $to) = @_;
    my $in = $self->node_by_port($to)->cmd('CLUSTER', 'SETSLOT', $slot,
                                           'IMPORTING', $self->id_of($from));
    my $out = $self->node_by_port($from)->cmd('CLUSTER', 'SETSLOT', $slot,
                                              'MIGRATING', $self->id_of($to));
    return "$in" eq 'OK' && "$out" eq 'OK';
}

# MIGRATE of the slot's keys one by one, $pause s apart; how many moved
sub migrate_keys {
    my ($self, $slot, $from, $to, $pause) = @_;
    my $src = $self->node_by_port($from);
    my $moved = 0;
    while (1) {
        my $keys = $src->cmd('CLUSTER', 'GETKEYSINSLOT', $slot, 10);
        last unless @$keys;
        for my $k (@$keys) {
            my $r = $src->cmd('MIGRATE', '127.0.0.1', $to, $k, 0, 5000);
            $moved++ if "$r" eq 'OK';
            sleep $pause if $pause;
        }
    }
    return $moved;
}

# the slot is $to's: told to every master
sub assign {
    my ($self, $slot, $to) = @_;
    my $id = $self->id_of($to);
    $self->node_by_port($_)->cmd('CLUSTER', 'SETSLOT', $slot, 'NODE', $id)
        for $to, grep { $_ != $to } $self->masters;
}

# -- load: clients cycling over projects, a line per request --------------

# forks $n clients calling $request->($project) until "$out.stop" exists
sub load_start {
    my ($n, $projects, $out, $request) = @_;
    my @pids;
    for my $i (0 .. $n - 1) {
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            open my $f, '>', "$out.$i" or POSIX::_exit(1);
            $f->autoflush(1);
            my $k = $i;
            until (-e "$out.stop") {
                my $p = $projects->[$k++ % @$projects];
                my $t = time;
                my $r = $request->($p);
                print $f join(' ', $t, $p, $r->{status}), "\n";
            }
            close $f;
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    return \@pids;
}

# every request so far: { t => start, p => project, s => status }, by time
sub load_read {
    my ($n, $out) = @_;
    my @r;
    for my $i (0 .. $n - 1) {
        for (split /\n/, CreditsTest::slurp("$out.$i")) {
            my ($t, $p, $s) = split / /;
            push @r, { t => $t, p => $p, s => $s };
        }
    }
    return [ sort { $a->{t} <=> $b->{t} } @r ];
}

sub load_stop {
    my ($pids, $out) = @_;
    open my $f, '>', "$out.stop" or die "$out.stop: $!";
    close $f;
    waitpid $_, 0 for @$pids;
}

sub share_200 {
    my ($r) = @_;
    return 0 unless @$r;
    return (grep { $_->{s} == 200 } @$r) / @$r;
}

# -- what a node saw: INFO errorstats and commandstats --------------------

# { errors => { MOVED => n, ... }, calls => { evalsha => { calls => n,
#   rejected_calls => n, failed_calls => n }, ... } } since CONFIG RESETSTAT
sub stats {
    my ($self, $port) = @_;
    my $info = $self->node_by_port($port)->cmd('INFO', 'all');
    my %s = (errors => {}, calls => {});
    $s{errors}{$1} = $2 while $info =~ /^errorstat_(\w+):count=(\d+)/mg;
    while ($info =~ /^cmdstat_([\w|]+):(\S+)/mg) {
        my ($cmd, $f) = ($1, $2);
        $s{calls}{$cmd} = { map { split /=/ } split /,/, $f };
    }
    return \%s;
}

sub reset_stats {
    my ($self) = @_;
    $_->cmd('CONFIG', 'RESETSTAT') for $self->live;
}

sub stop { $_->stop for $_[0]->nodes }

1;
