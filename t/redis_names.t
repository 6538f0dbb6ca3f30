# A name that moves: credits_redis redis.test:P with nginx's resolver
# pointed at the test's DNS server (TTL 1).  Two redis-servers on one
# port of two loopback addresses, B replicating A; under steady traffic
# their roles swap (B REPLICAOF NO ONE, A REPLICAOF B: A answers READONLY
# from then on) and the name moves to B.  Charging comes back within 5 s
# without a reload, and the books are exact request by request.  Then
# back to A, the name following 2 s after the roles: 5 s after it moved.
use strict;
use warnings;
use Test::More;
use Time::HiRes qw(sleep time);
use lib 't/lib';
use CreditsTest;
use CreditsManaged;

my $secret = 'names-secret-0123456789abcdef';
write_file('hs.key', $secret);

my $port = CreditsManaged::port_free_on('127.0.0.2', '127.0.0.3');
my ($ra, $rb) = CreditsManaged::replicated_pair(
    hosts => [ '127.0.0.2', '127.0.0.3' ], port => $port);
my $dns = CreditsManaged::DNS->start('redis.test' => '127.0.0.2');
my $up = CreditsTest::Upstream->start;

my $ngx = CreditsManaged::gateway(upstream => $up, workers => 2, price => 2,
    redis => "resolver @{[ $dns->addr ]} valid=1s ipv6=off;
    resolver_timeout 1s;
    credits_redis redis.test:$port timeout=500ms;")->start;

my $token = jwt_hs('HS256', $secret, { sub => 'names', exp => time + 600 });
my $start = 1_000_000;
$ra->cmd('SET', 'credits:{names}:balance', $start);

my $r = $ngx->get('/ai', Authorization => "Bearer $token");
is $r->{status}, 200, 'charged through the name';
ok $dns->queries('redis.test') > 0, 'the name was asked of the resolver';
ok wait_for(sub { $ra->cmd('XLEN', 'credits:{names}:ledger') == 1 }, 5),
    'on A, the address the name gave';
my @workers = sort $ngx->workers;
my $master = $ngx->pid;

my $load = traffic($ngx, token => $token, clients => 3, seconds => 8);
sleep 2;
my $asked = $dns->queries('redis.test');
my $t0 = CreditsManaged::switch_over($ra, $rb,
    promote => sub { $rb->cmd('REPLICAOF', 'NO', 'ONE') },
    moved => sub { $dns->set('redis.test' => '127.0.0.3') });
is CreditsManaged::role($ra), 'slave', 'A is a replica now';
my $reqs = $load->finish;
unshift @$reqs, { status => 200, hold => $r->{headers}{'x-hold'},
                  start => 0, end => 0 };

ok recovered($reqs, $t0, 5), 'charging is back within 5 s of the switch';
ok $dns->queries('redis.test') > $asked, 'the name was resolved again';
is_deeply [ sort $ngx->workers ], \@workers, 'the same workers: no reload';
is $ngx->pid, $master, 'the same master';
my $on_b = grep { $_->{status} == 200 && $_->{start} > $t0 + 5 } @$reqs;
ok $on_b > 0, "$on_b requests charged on B after the switch";

books_exact('after the switch', $rb, 'names', $reqs, price => 2,
            start => $start);

# back to A, and the name follows 2 s later (a DNS that lags the switch):
# meanwhile B answers READONLY and the workers keep looking the name up
$load = traffic($ngx, token => $token, clients => 3, seconds => 7);
sleep 1;
CreditsManaged::switch_over($rb, $ra,
    promote => sub { $ra->cmd('REPLICAOF', 'NO', 'ONE') });
sleep 2;
my $t1 = time;
$dns->set('redis.test' => '127.0.0.2');
my $more = $load->finish;
ok recovered($more, $t1, 5), 'charging is back within 5 s of the name moving';
is_deeply [ sort $ngx->workers ], \@workers, 'still the same workers';
books_exact('after the switch back', $ra, 'names', [ @$reqs, @$more ],
            price => 2, start => $start);
unlike $ngx->error_log, qr/\[alert\]|exited on signal/, 'no worker crashed';

done_testing;
