# Streamed AI answers (text/event-stream): cost events taken out of what
# the client gets and split anywhere, the hold grown while the stream
# runs, the stream ended at the balance, the client gone after three cost
# events, and responses without cost events byte-identical.
use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use Time::HiRes qw(sleep);
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = 'stream-secret-0123456789abcdef';
write_file('hs.key', $secret);

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;

    server {
        listen 127.0.0.1:%%PORT%%;
        add_header X-Hold $credits_hold_id always;

        location /chat {
            credits on;
            credits_price 5;
            credits_route chat;
            credits_cost_event credits;
            credits_hold_step 5;
            proxy_buffering off;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /counted {
            credits on;
            credits_price 5;
            credits_route counted;
            credits_cost_event credits;
            credits_hold_step 5;
            credits_visitor $arg_vid;
            credits_visitor_limit 100 per 1h;
            credits_budget 1000 per 1h;
            proxy_buffering off;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /fixed {
            credits on;
            credits_price 10;
            credits_route fixed;
            credits_cost_event credits;
            proxy_buffering off;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /whole {
            credits on;
            credits_price 10;
            credits_route whole;
            credits_cost_event credits;
            proxy_buffering off;
            proxy_buffer_size 16k;      # a 4 KB event in one read
            proxy_busy_buffers_size 16k;
            proxy_buffers 4 16k;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /plain {
            credits on;
            credits_price 10;
            credits_route plain;
            proxy_buffering off;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$ngx->start;

my $token = jwt_hs('HS256', $secret, { sub => 'sse', exp => time + 600 });
my %auth = (Authorization => "Bearer $token");
my $start = 0;

sub topup {
    my ($n) = @_;
    $redis->cmd('INCRBY', 'credits:{sse}:balance', $n);
    $start += $n;
}

sub entry_of {
    my ($id) = @_;
    my $e;
    wait_for(sub {
        ($e) = grep { $_->{request_id} eq ($id // '') }
               @{ ledger($redis, 'sse') };
        $e && $redis->cmd('ZCARD', 'credits:{sse}:holds') == 0;
    }, 10);
    return $e;
}

sub books_close {
    my ($name) = @_;
    my ($balance, $charged, $held) = audit($redis, 'sse');
    is $held, 0, "$name: no open hold";
    is $balance + $charged, $start, "$name: every credit accounted for";
}

sub messages { scalar(() = $_[0] =~ /^event: message$/mg) }

# -- a stream that grows its hold: 5 -> 10 -> 15 -> 23, charged 23 ----------

topup(100);
my $r = $ngx->get('/chat?sse=20&costs=3,8,14,23', %auth);
is $r->{status}, 200, 'stream served';
is messages($r->{body}), 20, 'every message event reached the client';
unlike $r->{body}, qr/event: credits/, 'no cost event reached the client';
my $e = entry_of($r->{headers}{'x-hold'});
is_deeply [ @$e{qw(route held charged outcome)} ], [ 'chat', 23, 23, 'commit' ],
    'held grew 5, 10, 15, 23; charged the last cost 23';
is $redis->cmd('GET', 'credits:{sse}:balance'), 77, 'balance 100 - 23';
books_close('grown stream');

# -- a grown hold is charged the last cost when it is less --------------------
# (the hold grows to 10 at cost 8; a settle once charged the whole 10)

for my $c (['3,8', 8], ['3,8,6', 6]) {
    my ($costs, $want) = @$c;
    my $before = $redis->cmd('GET', 'credits:{sse}:balance');
    $r = $ngx->get("/chat?sse=12&costs=$costs", %auth);
    $e = entry_of($r->{headers}{'x-hold'});
    is_deeply [ @$e{qw(held charged)} ], [ 10, $want ],
        "costs $costs: held grew to 10, charged the last cost $want";
    is $redis->cmd('GET', 'credits:{sse}:balance'), $before - $want,
        "costs $costs: the balance pays $want";
}
books_close('grown streams charged less than held');

# -- a growing stream in window counters: each growth counted in both ---------

$r = $ngx->get('/counted?sse=20&costs=3,8,14,23&vid=v1', %auth);
is messages($r->{body}), 20, 'counted stream: every message event';
$e = entry_of($r->{headers}{'x-hold'});
is_deeply [ @$e{qw(held charged outcome)} ], [ 23, 23, 'commit' ],
    'counted stream: held grew to 23, charged 23';
for my $kind ('v', 'b') {
    my @keys = @{ $redis->cmd('KEYS', "credits:{sse}:$kind:counted:*") };
    is scalar(@keys), 1, "counted stream: one $kind counter";
    is $redis->cmd('GET', $keys[0]), 23, "... it counts the grown hold, 23";
}
books_close('counted stream');

$r = $ngx->get('/counted?sse=12&costs=3,8&vid=v2', %auth);
$e = entry_of($r->{headers}{'x-hold'});
is_deeply [ @$e{qw(held charged)} ], [ 10, 8 ],
    'counted stream, costs 3,8: held grew to 10, charged 8';
my ($v2) = grep { $redis->cmd('GET', $_) == 8 }
           @{ $redis->cmd('KEYS', 'credits:{sse}:v:counted:*') };
ok $v2, "... the new visitor's counter keeps 8, the 2 not charged given back";
is $redis->cmd('GET', (@{ $redis->cmd('KEYS', 'credits:{sse}:b:counted:*') })[0]),
    31, '... the budget counts 23 + 8';
books_close('counted stream charged less than held');

# -- the balance runs out: credits_exhausted, upstream closed -------------------

$redis->cmd('SET', 'credits:{sse}:balance', 12);
$start = 12 + do { my ($b, $c) = audit($redis, 'sse'); $c };
$r = $ngx->get('/chat?sse=20&costs=3,8,14,23&gap=0.05', %auth);
is $r->{status}, 200, 'exhausted stream: 200 header';
like $r->{body}, qr/event: credits_exhausted\ndata: \{"required":5,"balance":2\}\n\n\z/,
    'it ends with credits_exhausted (5 more required, 2 left)';
my $before = messages($r->{body});
cmp_ok $before, '<', 20, "no message after the end ($before of 20 given)";
unlike $r->{body}, qr/event: credits\n/, 'no cost event reached the client';
$e = entry_of($r->{headers}{'x-hold'});
is_deeply [ @$e{qw(held charged outcome)} ], [ 10, 10, 'commit' ],
    'what was held (10) committed';
is $redis->cmd('GET', 'credits:{sse}:balance'), 2, 'balance + charged = 12';
ok wait_for(sub { slurp($up->{log}) =~ /sse wrote (\d+) of 24\n\z/ && $1 < 24 }, 10),
    'the upstream was closed before it finished'
    or diag slurp($up->{log});
books_close('exhausted stream');

# -- a client gone after three cost events: the last one committed ------------

topup(100);
my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $ngx->port)
    or die;
# cost events after messages 4, 8, 12, 16, 20; a pause after the 15th piece
# (message 12 and its cost event 6): the client leaves during it
print $s "GET /chat?sse=20&costs=2,4,6,8,10&pause_after=15 HTTP/1.1\r\n"
       . "Host: x\r\nAuthorization: $auth{Authorization}\r\n"
       . "Connection: close\r\n\r\n";
my $got = '';
while (sysread($s, my $buf, 4096)) {
    $got .= $buf;
    last if messages($got) >= 12;
}
sleep 0.3;
close $s;
my ($id) = $got =~ /^X-Hold: (\S+)\r$/mi;
$e = entry_of($id);
is_deeply [ @$e{qw(held outcome)} ], [ 10, 'commit' ],
    'client gone after the third cost event: committed' or diag explain $e;
# nginx reads on until a write to the gone client fails: the charge is the
# last cost it passed, the third (6) or one after it
like $e->{charged}, qr/^(6|8|10)$/,
    "client gone: the last cost reported before the end ($e->{charged})";
books_close('client gone');

# -- a cost event split at every byte offset --------------------------------------

# raw=BYTES from the upstream as an event stream (more in %q): the answer
# and the hold's ledger entry
sub raw_get {
    my ($path, $raw, %q) = @_;
    (my $enc = $raw) =~ s/([^A-Za-z0-9])/sprintf '%%%02X', ord $1/ge;
    my $r = $ngx->get("$path?raw=$enc" . join('', map { "&$_=$q{$_}" } keys %q), %auth);
    return ($r, entry_of($r->{headers}{'x-hold'}));
}


my $raw = "event: message\ndata: a\n\n: comment\r\nevent: credits\r\ndata: 7\r\n\r\n"
        . "data: b\rdata: c\r\r";
(my $want = $raw) =~ s/: comment\r\nevent: credits\r\ndata: 7\r\n\r\n//;
topup(1000);
my @bad;
for my $k (0 .. length $raw) {
    ($r, $e) = raw_get('/fixed', $raw, split => $k, gap => 0.01);
    push @bad, $k unless $r->{body} eq $want && $e && $e->{charged} == 7;
}
is_deeply \@bad, [], 'split at each of ' . (1 + length $raw)
    . ' offsets: the cost event (with its comment) removed, every other byte kept, charged 7';

# -- whole events in one read (read where they are): the same rules ------------

$raw = "event: message\ndata: a\n\n"
     . "event: credits\ndata: 4\n\n"
     . "event: message\nevent: credits\ndata: 5\n\n"        # the last type wins
     . ": c\nevent: credits\nevent: message\ndata: 6\n\n"    # not a cost event
     . "event: credits\ndata: 1\ndata: 2\n\n"                # dropped, no cost
     . "\n" . "event:credits\n\n" . "data:x\n\n";
$want = "event: message\ndata: a\n\n"
      . ": c\nevent: credits\nevent: message\ndata: 6\n\n" . "\ndata:x\n\n";
($r, $e) = raw_get('/whole', $raw);
is $r->{body}, $want, 'events in one read: the cost events removed, the rest as sent';
is $e->{charged}, 5, 'events in one read: charged the last whole-number cost (5)';

# an event of up to 4096 bytes can be a cost event; a longer one passes
for my $len (4096, 4097) {
    my $head = "event: credits\ndata: 7\n:";
    my $long = $head . ('p' x ($len - length($head) - 2)) . "\n\n";
    ($r, $e) = raw_get('/whole', "event: message\ndata: a\n\n$long");
    if ($len == 4096) {
        is $r->{body}, "event: message\ndata: a\n\n", "a $len-byte cost event removed";
        is $e->{charged}, 7, "a $len-byte cost event: its cost charged";
    } else {
        is $r->{body}, "event: message\ndata: a\n\n$long", "a $len-byte event given as it came";
        is $e->{charged}, 10, "a $len-byte event: no cost read, the price charged";
    }
}

# -- no cost event: byte-identical, today's rules ------------------------------------

$r = $ngx->get('/fixed?sse=5', %auth);
is messages($r->{body}), 5, 'no cost event: every event given';
$e = entry_of($r->{headers}{'x-hold'});
is $e->{charged}, 10, 'no cost event: charged the price';

$raw = "event: credits\ndata: 3\n\nevent: message\ndata: x\n\n";
($r, $e) = raw_get('/plain', $raw, split => 9);
is $r->{body}, $raw, 'without credits_cost_event: byte-identical';
is $e->{charged}, 10, 'without credits_cost_event: charged the price';

books_close('after every stream');

# -- nginx -t refuses what cannot work -----------------------------------------

for my $c (['credits_cost_event "";', 'invalid credits_cost_event ""'],
           [qq{credits_cost_event "a\nb";}, 'invalid credits_cost_event'],
           ['credits_cost_event a; credits_cost_event b;', 'is duplicate'],
           ['credits_hold_step 0;', 'invalid credits_hold_step "0"'],
           ['credits_hold_step 1.5;', 'invalid credits_hold_step "1.5"']) {
    my ($directive, $error) = @$c;
    my ($rc, $out) = location_test($redis, $directive);
    ok $rc, "nginx -t rejects '$directive'";
    like $out, qr/\Q$error\E/, "... saying $error";
}

done_testing;
