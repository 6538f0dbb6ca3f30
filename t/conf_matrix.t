# Every directive set at every level it is allowed (http, server, location,
# nested location) and read where it is used, beneath that level: in the
# location, in an `if` block and a `limit_except` block of it, and in a
# nested location and its blocks.  The configurations and the checks are
# generated from the table below.  Then every JWT key family with its key
# file at every level, and `nginx -t` refusing a directive at a level it is
# not allowed at.
use strict;
use warnings;
use Test::More;
use lib 't/lib';
use CreditsTest;
use POSIX ();

my $dir = test_dir();
my $redis = CreditsTest::Redis->start;
my $up = CreditsTest::Upstream->start;

my @LEVELS = qw(http server location nested);
my %ORDER = (http => 0, server => 1, location => 2, nested => 3);

# the price set at a level: a different one at each
sub price_at { 3 + $ORDER{ $_[0] } }

# where a setting is read: method, path, query, and whose location it is
my %READ = (
    'location'                  => ['GET',  '/r',   'if=',  '/r'],
    'location if'               => ['GET',  '/r',   'if=1', '/r'],
    'location limit_except'     => ['POST', '/r',   'if=',  '/r'],
    'nested location'           => ['GET',  '/r/n', 'if=',  '/r/n'],
    'nested location if'        => ['GET',  '/r/n', 'if=1', '/r/n'],
    'nested location limit_except' => ['POST', '/r/n', 'if=', '/r/n'],
);

# the places beneath a level
sub reads {
    my ($level) = @_;
    my @places = grep { $level ne 'nested' || /^nested/ } keys %READ;
    return sort @places;
}

my $now = time;
my $PREFIX = 'mx:';

# ---- the table --------------------------------------------------------
#
# name, the levels it may be set at (http_only: set at http in every
# configuration), its value at a level, and its checks: run at every place
# beneath the level with the value in force there (undef: not set), in the
# phase named (main; prices: runtime price overrides; budgets: runtime
# budgets; down: Redis stopped).  A row may rely on another set at the same
# level (every row is set at every level it allows): credits_hold_step on
# credits_cost_event, credits_visitor and credits_visitor_limit on each
# other.

my @TABLE = (
    { name => 'credits', at => [@LEVELS], value => sub { 'on' },
      main => sub {
          my ($i, $rp) = @_;
          is send_req($i, $rp, token => '')->{status}, 401,
              where($i, $rp, 'credits on: no token is 401');
      } },

    { name => 'credits_price', at => [@LEVELS], value => \&price_at,
      main => sub {
          my ($i, $rp, $v) = @_;
          my ($r, $e) = charge($i, $rp);
          is $r->{headers}{'x-credits-held'}, $v,
              where($i, $rp, "credits_price $v: X-Credits-Held");
          is $e->{held}, $v, where($i, $rp, "credits_price $v: ledger held");
      } },

    { name => 'credits_route', at => [qw(location nested)],
      value => sub { "rt-$_[0]" },
      main => sub {
          my ($i, $rp, $v) = @_;
          my ($r, $e) = charge($i, $rp);
          is $e->{route}, route($rp, $v),
              where($i, $rp, 'credits_route: ledger route');
      },
      prices => sub {
          my ($i, $rp, $v) = @_;
          my $want = override(route($rp, $v));
          ok wait_for(sub {
                  (send_req($i, $rp)->{headers}{'x-credits-held'} // '')
                  eq $want }, 5),
              where($i, $rp, 'credits_route: the runtime price of route "'
                             . route($rp, $v) . "\" ($want) applies");
      } },

    { name => 'credits_cost_header', at => [@LEVELS],
      value => sub { 'X-Cost' },
      main => sub {
          my ($i, $rp, $v) = @_;
          my ($r, $e) = charge($i, $rp, query => 'cost=2');
          is $r->{headers}{'x-credits-charged'}, 2,
              where($i, $rp, 'credits_cost_header: X-Credits-Charged');
          is $e->{charged}, 2,
              where($i, $rp, 'credits_cost_header: ledger charged');
          ok !exists $r->{headers}{'x-cost'},
              where($i, $rp, 'credits_cost_header: header removed');
      } },

    # costs below every level's price: charged the last cost, not the price
    { name => 'credits_cost_event', at => [@LEVELS],
      value => sub { 'credits' },
      main => sub {
          my ($i, $rp) = @_;
          my ($r, $e) = charge($i, $rp, query => 'sse=4&costs=1,2');
          is messages($r->{body}), 4,
              where($i, $rp, 'credits_cost_event: every message event');
          unlike $r->{body}, qr/^event: credits/m,
              where($i, $rp, 'credits_cost_event: cost events taken out');
          is $e->{charged}, 2,
              where($i, $rp, 'credits_cost_event: ledger charged the last '
                             . 'cost');
      } },

    # a last cost just above the price: the hold grows by the step, not
    # by the cost, and the charge is the cost, not the grown hold
    { name => 'credits_hold_step', at => [@LEVELS], value => sub { 5 },
      main => sub {
          my ($i, $rp, $v) = @_;
          my $price = $i->{v}{credits_price};
          my ($r, $e) = charge($i, $rp,
                               query => 'sse=4&costs=1,' . ($price + 1));
          is $e->{held}, $price + $v,
              where($i, $rp, "credits_hold_step $v: the hold grew from "
                             . "$price by $v");
          is $e->{charged}, $price + 1,
              where($i, $rp, "credits_hold_step $v: charged the last cost");
      } },

    { name => 'credits_hold_ttl', at => [@LEVELS],
      value => sub { (61 + $ORDER{$_[0]}) . 'm' },
      main => sub {
          my ($i, $rp, $v) = @_;
          my $ttl = ($v =~ /^(\d+)m$/)[0] * 60000;
          my $left = hold_ttl_left($i, $rp);
          ok defined $left && abs($left - $ttl) < 3000,
              where($i, $rp, "credits_hold_ttl $v: the hold expires in "
                             . "$ttl ms (" . ($left // 'no hold') . ')');
      } },

    { name => 'credits_fail', at => [@LEVELS], value => sub { 'open' },
      down => sub {
          my ($i, $rp) = @_;
          my $calls = $up->requests;
          is send_req($i, $rp)->{status}, 200,
              where($i, $rp, 'credits_fail open: Redis down, forwarded');
          is $up->requests, $calls + 1,
              where($i, $rp, 'credits_fail open: upstream called');
      } },

    { name => 'credits_jwt_key_file', at => [@LEVELS],
      value => sub { write_file("key-$_[0]", "secret-of-$_[0]-0123456789") },
      main => sub {
          my ($i, $rp) = @_;
          rejected($i, $rp, 'credits_jwt_key_file: another secret',
                   'bad signature', secret => 'another-secret');
      } },

    { name => 'credits_jwt_algorithms', at => [@LEVELS],
      value => sub { 'HS384 HS512' },
      main => sub {
          my ($i, $rp) = @_;
          is send_req($i, $rp, token => token($i, alg => 'HS384'))->{status},
              200, where($i, $rp, 'credits_jwt_algorithms: HS384 accepted');
          rejected($i, $rp, 'credits_jwt_algorithms: HS256',
                   'alg not accepted', alg => 'HS256');
      } },

    { name => 'credits_jwt_issuer', at => [@LEVELS],
      value => sub { "iss-$_[0]" },
      main => sub {
          my ($i, $rp) = @_;
          rejected($i, $rp, 'credits_jwt_issuer: another iss', 'wrong issuer',
                   claims => { iss => 'iss-other' });
      } },

    { name => 'credits_jwt_audience', at => [@LEVELS],
      value => sub { "aud-$_[0]" },
      main => sub {
          my ($i, $rp) = @_;
          rejected($i, $rp, 'credits_jwt_audience: another aud',
                   'wrong audience', claims => { aud => 'aud-other' });
      } },

    { name => 'credits_jwt_project_claim', at => [@LEVELS],
      value => sub { "pc_$_[0]" },
      main => sub {
          my ($i, $rp, $v) = @_;
          my ($r, $e) = charge($i, $rp);
          ok $e, where($i, $rp, "credits_jwt_project_claim: \"$v\" charged, "
                                . 'not "sub"');
      } },

    { name => 'credits_jwt_token', at => [@LEVELS],
      value => sub { '$http_x_tok' },
      main => sub {
          my ($i, $rp) = @_;
          is send_req($i, $rp, header => 'Authorization',
                      token => 'Bearer ' . token($i))->{status}, 401,
              where($i, $rp, 'credits_jwt_token: Authorization is not read');
          is send_req($i, $rp)->{status}, 200,
              where($i, $rp, 'credits_jwt_token: X-Tok is read');
      } },

    { name => 'credits_jwt_leeway', at => [@LEVELS], value => sub { '2m' },
      main => sub {
          my ($i, $rp) = @_;
          is send_req($i, $rp, token => token($i, claims =>
                                              { exp => time - 60 }))->{status},
              200, where($i, $rp, 'credits_jwt_leeway: expired 60 s ago, '
                                  . 'within 2m');
      } },

    { name => 'credits_jwt_cache_size', at => [@LEVELS], value => sub { 1 },
      main => sub {
          my ($i, $rp) = @_;
          my $jti = "$i->{level} $rp";
          my ($a, $b) = map { token($i, claims => { jti => "$jti $_" }) } 1, 2;
          is cache_hits($i, $rp, $a, $a), 1,
              where($i, $rp, 'credits_jwt_cache_size 1: a token seen again '
                             . 'is a hit');
          is cache_hits($i, $rp, $b, $a), 0,
              where($i, $rp, 'credits_jwt_cache_size 1: another token '
                             . 'evicted it');
      } },

    # the visitor is ?vid=, or the request itself (the map in conf_text)
    { name => 'credits_visitor', at => [@LEVELS], value => sub { '$vis' },
      main => sub {
          my ($i, $rp) = @_;
          my $vid = vid($i, $rp, 'visitor');
          my ($n, $r) = spend($i, $rp, $vid);
          is $r->{status}, 429,
              where($i, $rp, "credits_visitor: $vid limited after $n");
          is send_req($i, $rp, query => "vid=$vid-2")->{status}, 200,
              where($i, $rp, 'credits_visitor: another visitor passes');
          is_deeply [ grep { /\Q$vid\E/ }
                      @{ $redis->cmd('KEYS', key($i, '*')) } ], [],
              where($i, $rp, 'credits_visitor: the value is in no key');
      } },

    # above every runtime price override (20 to 23), so that the other
    # rows' requests pass in the prices phase: 8 requests at the price
    { name => 'credits_visitor_limit', at => [@LEVELS],
      value => sub { 8 * price_at($_[0]) . ' per 1h' },
      main => sub {
          my ($i, $rp, $v) = @_;
          my ($limit) = $v =~ /^(\d+)/;
          my ($n, $r) = spend($i, $rp, vid($i, $rp, 'limit'));
          is $n, $limit / $i->{v}{credits_price},
              where($i, $rp, "credits_visitor_limit $v: passes");
          is $r->{status}, 429,
              where($i, $rp, "credits_visitor_limit $v: then 429");
          like $r->{body}, qr/^\{"error":"visitor_limit_reached",
                              "limit":$limit,"retry_after":\d+\}$/x,
              where($i, $rp, "credits_visitor_limit $v: the answer");
          like $r->{headers}{'retry-after'} // '', qr/^\d+$/,
              where($i, $rp, "credits_visitor_limit $v: Retry-After");
      } },

    # too big to be reached: the project's own budget of 0, in the budgets
    # hash under the counters' name, is what refuses
    { name => 'credits_budget', at => [@LEVELS],
      value => sub { '1000000 per 1h' },
      budgets => sub {
          my ($i, $rp, $v) = @_;
          my $name = route($rp, $i->{v}{credits_route});
          my $r;
          $redis->cmd('HSET', key($i, 'budgets'), $name, 0);
          ok wait_for(sub { ($r = send_req($i, $rp))->{status} == 429 }, 3),
              where($i, $rp, "credits_budget: budgets $name = 0 is 429");
          like $r->{body}, qr/^\{"error":"budget_exhausted","budget":0,
                              "retry_after":\d+\}$/x,
              where($i, $rp, 'credits_budget: the answer');
          like $r->{headers}{'retry-after'} // '', qr/^\d+$/,
              where($i, $rp, 'credits_budget: Retry-After');
          $redis->cmd('HDEL', key($i, 'budgets'), $name);
          ok wait_for(sub { send_req($i, $rp)->{status} == 200 }, 3),
              where($i, $rp, "credits_budget: $name deleted, passes");
      } },

    { name => 'credits_redis', http_only => 1, value => sub { $redis->addr },
      main => sub {
          my ($i, $rp) = @_;
          my $before = $redis->cmd('GET', key($i, 'balance'));
          my ($r, $e) = charge($i, $rp);
          ok $e && $redis->cmd('GET', key($i, 'balance'))
                   == $before - $e->{charged},
              where($i, $rp, 'credits_redis: charged in this Redis');
      } },

    { name => 'credits_key_prefix', http_only => 1, value => sub { $PREFIX },
      main => sub {
          my ($i, $rp) = @_;
          my ($r, $e) = charge($i, $rp);
          ok $e, where($i, $rp, "credits_key_prefix: ledger under "
                                . "\"$PREFIX\"");
          is $redis->cmd('EXISTS', "credits:{$i->{project}}:ledger"), 0,
              where($i, $rp, 'credits_key_prefix: nothing under "credits:"');
      } },
);

# ---- configurations -----------------------------------------------------

# directives by level: the table's values for one level, or given lines
sub conf_text {
    my (%at) = @_;
    my $d = sub {
        my ($level, $indent) = @_;
        return join '', map { (' ' x $indent) . "$_;\n" }
                            @{ $at{$level} || [] };
    };
    # who the visitor is: ?vid=, or else each request its own
    return $d->('http', 4) . <<"END";
    map \$arg_vid \$vis { "" \$request_id; default \$arg_vid; }

    server {
        listen 127.0.0.1:%%PORT%%;
        add_header X-Id \$request_id always;
@{[ $d->('server', 8) ]}
        location /r {
@{[ $d->('location', 12) ]}
            proxy_pass http://%%UPSTREAM%%;
            if (\$arg_if) { }
            limit_except GET { allow all; }

            location /r/n {
@{[ $d->('nested', 16) ]}
                proxy_pass http://%%UPSTREAM%%;
                if (\$arg_if) { }
                limit_except GET { allow all; }
            }
        }
    }
END
}

# the table's directives set at $level; each row's value in force
sub level_conf {
    my ($level) = @_;
    my (%at, %v);
    for my $row (@TABLE) {
        my $where = $row->{http_only} ? 'http'
                  : (grep { $_ eq $level } @{ $row->{at} }) ? $level : next;
        $v{ $row->{name} } = $row->{value}->($level);
        push @{ $at{$where} }, "$row->{name} $v{ $row->{name} }";
    }
    return (\%at, \%v);
}

# ---- requests -------------------------------------------------------------

sub where {
    my ($i, $rp, $what) = @_;
    return "set at $i->{level}, read in $rp: $what";
}

sub key { my ($i, $name) = @_; "$PREFIX\{$i->{project}}:$name" }

# the route a place is charged to: the one set above it, or its location's
sub route { my ($rp, $v) = @_; $v // $READ{$rp}[3] }

my %OVERRIDE;
sub override { $OVERRIDE{ $_[0] } //= 20 + keys %OVERRIDE }

sub token {
    my ($i, %o) = @_;
    my %c = (%{ $i->{claims} }, %{ $o{claims} || {} });
    return jwt_hs($o{alg} || 'HS512', $o{secret} || $i->{secret}, \%c);
}

sub send_req {
    my ($i, $rp, %o) = @_;
    my ($method, $path, $query) = @{ $READ{$rp} };
    $query .= "&$o{query}" if $o{query};
    my $token = $o{token} // token($i);
    return $i->{ngx}->request($method, "$path?$query", headers =>
        { length $token ? (($o{header} || 'X-Tok') => $token) : () });
}

# a request that is charged: its response and its ledger entry
sub charge {
    my ($i, $rp, %o) = @_;
    my $r = send_req($i, $rp, %o);
    my $id = $r->{headers}{'x-id'} // '';
    my $entry = wait_for(sub {
        my $l = $redis->cmd('XREVRANGE', key($i, 'ledger'), '+', '-',
                            'COUNT', 10);
        for (@$l) {
            my %e = @{ $_->[1] };
            return \%e if $e{request_id} eq $id;
        }
        return undef;
    }, $r->{status} == 200 ? 5 : 0);
    diag where($i, $rp, "no ledger entry, status $r->{status}")
        unless $entry;
    return ($r, $entry);
}

sub messages { scalar(() = $_[0] =~ /^event: message$/mg) }

# a visitor's name, its own at each level and place
sub vid {
    my ($i, $rp, $what) = @_;
    (my $vid = "$i->{level}-$rp-$what") =~ tr/ /_/;
    return $vid;
}

# requests of one visitor until one is refused: how many passed, and it
sub spend {
    my ($i, $rp, $vid) = @_;
    my ($n, $r) = (0);
    $n++ while ($r = send_req($i, $rp, query => "vid=$vid"))->{status} == 200
               && $n < 100;
    return ($n, $r);
}

sub rejected {
    my ($i, $rp, $what, $reason, %o) = @_;
    my $log = length $i->{ngx}->error_log;
    is send_req($i, $rp, token => token($i, %o))->{status}, 401,
        where($i, $rp, "$what: 401");
    like substr($i->{ngx}->error_log, $log),
        qr/credits: invalid token: \Q$reason\E/,
        where($i, $rp, "$what: $reason");
}

# the ms left to a hold placed here, read while its request is upstream
sub hold_ttl_left {
    my ($i, $rp) = @_;
    my $holds = key($i, 'holds');
    wait_for(sub { $redis->cmd('ZCARD', $holds) == 0 }, 5);
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        send_req($i, $rp, query => 'sleep=0.3');
        POSIX::_exit(0);
    }
    my $held = wait_for(sub {
        my $z = $redis->cmd('ZRANGE', $holds, 0, -1, 'WITHSCORES');
        @$z ? $z : undef;
    }, 5);
    my ($s, $us) = @{ $redis->cmd('TIME') };
    waitpid $pid, 0;
    return $held ? $held->[1] - ($s * 1000 + int($us / 1000)) : undef;
}

# the token cache hits that these requests logged
sub cache_hits {
    my ($i, $rp, @tokens) = @_;
    my $log = length $i->{ngx}->error_log;
    send_req($i, $rp, token => $_) for @tokens;
    my @hits = substr($i->{ngx}->error_log, $log) =~ /token cache hit/g;
    return scalar @hits;
}

# ---- the table, level by level ------------------------------------------

my @INST;

for my $level (@LEVELS) {
    my ($at, $v) = level_conf($level);
    my $i = { level => $level, project => "p-$level", v => $v,
              secret => CreditsTest::slurp($v->{credits_jwt_key_file}) };
    $i->{claims} = { $v->{credits_jwt_project_claim} => $i->{project},
                     sub => 'nobody', iss => $v->{credits_jwt_issuer},
                     aud => $v->{credits_jwt_audience}, exp => $now + 600 };
    $i->{ngx} = CreditsTest::Nginx->new(upstream => $up, log_level => 'debug',
                                        http => conf_text(%$at));
    $redis->cmd('SET', key($i, 'balance'), 1000000);
    ok eval { $i->{ngx}->start }, "set at $level: nginx starts" or diag $@;
    push @INST, $i;
}

sub phase {
    my ($phase) = @_;
    for my $i (@INST) {
        for my $rp (reads($i->{level})) {
            for my $row (grep { $_->{$phase} } @TABLE) {
                $row->{$phase}->($i, $rp, $i->{v}{ $row->{name} });
            }
        }
    }
}

phase('main');

for my $i (@INST) {
    $redis->cmd('HSET', "${PREFIX}prices", $_, override($_))
        for map { route($_, $i->{v}{credits_route}) } reads($i->{level});
}
phase('prices');
$redis->cmd('DEL', "${PREFIX}prices");
phase('budgets');

# ---- every key family with its key file at every level ------------------

my %FAMILY = (
    hs   => { key => write_file('hs.key', 'family-secret-0123456789'),
              algs => [qw(HS256 HS384 HS512)] },
    rsa  => { pem => [gen_rsa_key($dir)], algs => [qw(RS256 RS384 RS512)] },
    p256 => { pem => [gen_ec_key($dir, 'prime256v1')], algs => ['ES256'] },
    p384 => { pem => [gen_ec_key($dir, 'secp384r1')], algs => ['ES384'] },
    p521 => { pem => [gen_ec_key($dir, 'secp521r1')], algs => ['ES512'] },
);

my %claims = (sub => 'family', exp => $now + 600);
my @FAMILY_NGX;

for my $f (values %FAMILY) {
    my $signer = $f->{pem} ? $f->{pem}[0] : CreditsTest::slurp($f->{key});
    $f->{key} //= $f->{pem}[1];
    $f->{tokens} = { map { $_ => ($f->{pem} ? jwt_pem($_, $signer, \%claims)
                                            : jwt_hs($_, $signer, \%claims)) }
                     @{ $f->{algs} } };
}

for my $level (@LEVELS) {
    for my $name (sort keys %FAMILY) {
        my $f = $FAMILY{$name};
        my %at = (http => ['credits_price 0',
                           'credits_redis ' . $redis->addr]);
        push @{ $at{$level} }, 'credits on', "credits_jwt_key_file $f->{key}",
                               "credits_jwt_algorithms @{ $f->{algs} }";
        my $ngx = CreditsTest::Nginx->new(upstream => $up,
                                          http => conf_text(%at));
        my $what = "$name key set at $level";
        my ($rc, $out) = $ngx->test;
        is $rc, 0, "$what: nginx -t" or diag $out;
        next if $rc || !eval { $ngx->start };
        push @FAMILY_NGX, $ngx;

        # a token of every algorithm of the family passes; another's fails
        my $other = $name eq 'hs' ? $FAMILY{p256}{tokens}{ES256}
                                  : $FAMILY{hs}{tokens}{HS256};
        for my $rp (reads($level)) {
            my ($method, $path, $query) = @{ $READ{$rp} };
            for my $alg (@{ $f->{algs} }, 'other') {
                my $t = $f->{tokens}{$alg} // $other;
                my $r = $ngx->request($method, "$path?$query", headers =>
                                      { Authorization => "Bearer $t" });
                is $r->{status}, $alg eq 'other' ? 401 : 200,
                    "$what, read in $rp: $alg token";
            }
        }
    }
}

# ---- Redis down: credits_fail --------------------------------------------

$redis->stop;
phase('down');

# a graceful stop takes a while: all at once
kill 'QUIT', $_->pid for @FAMILY_NGX, map { $_->{ngx} } @INST;
$_->stop for @FAMILY_NGX, map { $_->{ngx} } @INST;

# ---- directives refused where they are not allowed ----------------------

my %PLACES = (http => 'http', server => 'server', location => 'location',
              'if' => 'location if', limit_except => 'location limit_except');

my $t = CreditsTest::Nginx->new(upstream => $up, http => conf_text());
my ($rc, $out) = $t->test;
is $rc, 0, 'nginx -t: the skeleton passes' or diag $out;

for my $row (@TABLE) {
    my @allowed = $row->{http_only} ? ('http') : @{ $row->{at} };
    for my $place (sort keys %PLACES) {
        next if grep { $_ eq $place } @allowed;
        my $line = "$row->{name} " . $row->{value}->('location');
        my $text = conf_text(($place eq 'http' || $place eq 'server'
                              || $place eq 'location') ? ($place => [$line])
                                                       : ());
        $text =~ s/(if \(\$arg_if\) \{)( \})/$1 $line;$2/
            if $place eq 'if';
        $text =~ s/(limit_except GET \{ allow all;)/$1 $line;/
            if $place eq 'limit_except';
        $t->{http} = $text;
        $t->write_conf;
        ($rc, $out) = $t->test;
        isnt $rc, 0, "nginx -t: $row->{name} in $place refused";
        like $out,
            qr/\[emerg\] "\Q$row->{name}\E" directive is not allowed here/,
            "nginx -t: $row->{name} in $place: not allowed here";
    }
}

done_testing;
