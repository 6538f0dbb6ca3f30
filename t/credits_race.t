# Concurrency: 200 requests racing on two workers never overdraw, and the
# books reconcile exactly; then the same with a mix of 200 and 500 answers.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;

my $dir = test_dir();
my $secret = 'race-secret-0123456789abcdef';
write_file('hs.key', $secret);

my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;
my $ngx = CreditsTest::Nginx->new(redis => $redis, upstream => $up, workers => 2,
                                  vars => { DIR => $dir }, http => <<'END');
    credits_redis %%REDIS%%;
    credits_jwt_key_file %%DIR%%/hs.key;
    server {
        listen 127.0.0.1:%%PORT%% backlog=512;
        location /ai {
            credits on;
            credits_price 2;
            credits_route race;
            proxy_pass http://%%UPSTREAM%%;
        }
    }
END
$ngx->start;

sub race {
    my ($project, $mixed) = @_;
    my $token = jwt_hs('HS256', $secret, { sub => $project, exp => time + 600 });
    $redis->cmd('SET', "credits:{$project}:balance", 37);

    my $codes = parallel(200, sub {
        my ($i) = @_;
        my $q = ($mixed && $i % 2) ? '?status=500' : '';
        return $ngx->get("/ai$q", Authorization => "Bearer $token")->{status};
    });

    # every settle lands shortly after its response
    wait_for(sub { $redis->cmd('ZCARD', "credits:{$project}:holds") == 0 }, 5);

    my %count;
    $count{$_}++ for @$codes;
    return \%count;
}

my $count = race('race-ok', 0);
is $count->{200}, 18, 'exactly 18 of 200 succeed';
is $count->{402}, 182, 'the other 182 get 402';
is scalar(keys %$count), 2, 'no other status';

my ($balance, $charged, $held) = audit($redis, 'race-ok');
is $balance, 1, 'balance ends at 1';
is $charged, 36, 'ledger charged 36';
is $held, 0, 'no hold left';
my @l = @{ ledger($redis, 'race-ok') };
is scalar(grep { $_->{outcome} eq 'commit' } @l), 18, '18 commits';
is scalar(@l), 18, 'no other ledger entry';

$count = race('race-mixed', 1);
($balance, $charged, $held) = audit($redis, 'race-mixed');
@l = @{ ledger($redis, 'race-mixed') };
my $commits = grep { $_->{outcome} eq 'commit' } @l;
my $releases = grep { $_->{outcome} eq 'release' } @l;
is $held, 0, 'mixed: no hold left';
is $balance + $charged, 37, 'mixed: balance + charged = 37';
is $charged, 2 * $commits, 'mixed: charged 2 per commit';
is $commits, $count->{200}, 'mixed: one commit per 200';
is $releases, $count->{500}, 'mixed: one release per 500';
is $count->{200} + $count->{500} + ($count->{402} // 0), 200,
    'mixed: every request answered 200, 500 or 402';
ok $balance >= 0, 'mixed: the balance never went below zero';
ok $commits >= 18, 'mixed: released holds went back to others';

unlike $ngx->error_log, qr/\[(alert|emerg|crit)\]|signal \d+|exited on/,
    'no worker crashed';

done_testing;
