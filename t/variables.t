# Reading a $credits_* variable never decides or freezes what a request is
# charged: every variable read in the rewrite, access and content phases
# (proxy_set_header, proxy_cache_key, a mirror's headers), in add_header
# and in log_format, and the hold still commits exactly as without them.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = 'vars-secret-0123456789abcdef';
write_file('hs.key', $secret);
chmod 0755, $dir;    # the cache is written by the workers' user

my @vars = qw(project route price held charged balance outcome hold_id);
my $all = join '|', map { "\$credits_$_" } @vars;
my $sets = join "\n", map { "            set \$rw_$_ \$credits_$_;" } @vars;
my $headers = join "\n",
    map { "            proxy_set_header X-C-$_ \$credits_$_;" } @vars;

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up,
                                  vars => { DIR => $dir }, http => <<"END");
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;
    proxy_cache_path %%DIR%%/cache keys_zone=ai:1m;

    log_format vars '\$uri $all';
    access_log %%DIR%%/vars.log vars;

    server {
        listen 127.0.0.1:%%PORT%%;

        # rewrite phase: before the gate ran
        location /rewrite {
$sets
            credits on;
            credits_price 5;
            credits_route rw;
            proxy_pass http://%%UPSTREAM%%;
        }

        # access phase, after the gate: auth_request_set
        location /access {
            credits on;
            credits_price 5;
            credits_route acc;
            auth_request /auth;
            auth_request_set \$acc \$credits_hold_id\$credits_outcome;
            proxy_set_header X-Acc \$acc;
            proxy_pass http://%%UPSTREAM%%/?echo=1;
        }

        location = /auth {
            internal;
            return 204;
        }

        # content phase: every variable to the upstream, and in the cache key
        location /content {
            credits on;
            credits_price 5;
            credits_route content;
            credits_cost_header X-Cost;
$headers
            proxy_cache ai;
            proxy_cache_key \$credits_project\$credits_hold_id\$uri;
            mirror /mirror;
            add_header X-Added "$all" always;
            proxy_pass http://%%UPSTREAM%%/?echo=1&cost=3;
        }

        location = /mirror {
            internal;
            proxy_set_header X-Mirror-Hold \$credits_hold_id;
            proxy_set_header X-Mirror-Outcome \$credits_outcome;
            proxy_pass http://%%UPSTREAM%%/mirrored;
        }
    }
END
$ngx->start;

my $token = jwt_hs('HS256', $secret, { sub => 'vars', exp => time + 600 });
my %auth = (Authorization => "Bearer $token");
$redis->cmd('SET', 'credits:{vars}:balance', 100);

sub entry_for {
    my ($id) = @_;
    my $e;
    wait_for(sub {
        ($e) = grep { $_->{request_id} eq $id } @{ ledger($redis, 'vars') };
        $e;
    }, 10);
    return $e;
}

sub hold_of {
    my ($r) = @_;
    my ($id) = ($r->{headers}{'x-added'} // '') =~ /([0-9a-f]{32})/;
    return $id;
}

# rewrite phase
my $r = $ngx->get('/rewrite', %auth);
is $r->{status}, 200, 'rewrite: forwarded';
is $r->{headers}{'x-credits-held'}, 5, 'rewrite: held 5';
wait_for(sub { $redis->cmd('ZCARD', 'credits:{vars}:holds') == 0 }, 5);
my $e = ledger($redis, 'vars')->[-1];
is_deeply [ @$e{qw(route outcome charged)} ], [ 'rw', 'commit', 5 ],
    'rewrite-phase reads: committed 5';

# access phase
$r = $ngx->get('/access', %auth);
is $r->{status}, 200, 'access: forwarded';
my ($acc) = $r->{body} =~ /^x-acc: (\S+)$/m;
like $acc // '', qr/^[0-9a-f]{32}$/,
    'access phase: $credits_hold_id known, $credits_outcome still empty';
$e = entry_for($acc);
is_deeply [ @$e{qw(route outcome charged)} ], [ 'acc', 'commit', 5 ],
    'access-phase reads: committed 5';

# content phase, add_header, cache key, mirror
$r = $ngx->get('/content', %auth);
is $r->{status}, 200, 'content: forwarded';
my %seen = $r->{body} =~ /^x-c-(\w+): (.*)$/mg;
is $seen{project}, 'vars', 'upstream got $credits_project';
is $seen{route}, 'content', 'upstream got $credits_route';
is $seen{price}, 5, 'upstream got $credits_price';
is $seen{held}, 5, 'upstream got $credits_held';
is $seen{balance}, 85, 'upstream got $credits_balance';
like $seen{hold_id}, qr/^[0-9a-f]{32}$/, 'upstream got $credits_hold_id';
ok !length($seen{charged} // ''), '$credits_charged empty before the response';
ok !length($seen{outcome} // ''), '$credits_outcome empty before the response';
is $r->{headers}{'x-credits-charged'}, 3, 'cost header read: charged 3';
like $r->{headers}{'x-added'}, qr/^vars\|content\|5\|5\|\|85\|\|[0-9a-f]{32}$/,
    'add_header: outcome and charge not decided at header time';

$e = entry_for($seen{hold_id});
is_deeply [ @$e{qw(route held charged outcome status)} ],
          [ 'content', 5, 3, 'commit', 200 ],
    'content-phase reads, cache key, mirror: committed the reported 3';

ok wait_for(sub { slurp($up->{log}) =~ m{/mirrored} }, 5),
    'the mirror reached its (unmetered) upstream';

# log_format: the decided outcome, on the same line as the rest
ok wait_for(sub { slurp("$dir/vars.log") =~ m{^/content }m }, 5),
    'access log written';
my ($line) = grep { m{^/content } } split /\n/, slurp("$dir/vars.log");
is $line, "/content vars|content|5|5|3|85|committed|$seen{hold_id}",
    'log_format: every variable, outcome committed, charged 3';

my ($balance, $charged, $held) = audit($redis, 'vars');
is $held, 0, 'no open hold';
is $balance + $charged, 100, 'every credit accounted for';
is $balance, 87, 'charged 5 + 5 + 3';

done_testing;
