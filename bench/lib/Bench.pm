package Bench;

# What make bench, make profile and bench/guard share: the variants that
# differ only by the tokens they send (their keys, tokens, funded projects
# and wrk scripts), the variants counted by callgrind and one gateway
# under it.

use strict;
use warnings;
use CreditsTest;
use Time::HiRes qw(sleep);

our $SECRET = 'bench-secret-0123456789abcdef';
our $PROJECTS = 10_000;

# name => { conf => the location's directives, tokens => [...] }.  Plain
# proxy too is sent (and forwards) the HS256 token, so that only what
# nginx does with it differs.  "projects10k": 10 000 projects, a token
# each, share the traffic (batches shrink to one project's requests).
sub token_variants {
    my ($dir) = @_;
    my ($rsa, $rsa_pub) = gen_rsa_key($dir);
    my ($ec, $ec_pub) = gen_ec_key($dir, 'prime256v1');
    write_file('hs.key', $SECRET);

    my $exp = time + 86400;
    my $hs = jwt_hs('HS256', $SECRET, { sub => 'bench', exp => $exp });

    return {
        proxy       => { conf => '', tokens => [$hs] },
        HS256       => { conf => 'credits on;', tokens => [$hs] },
        RS256       => { conf => "credits on; credits_jwt_key_file $rsa_pub; "
                                 . 'credits_jwt_algorithms RS256;',
                         tokens => [jwt_pem('RS256', $rsa, { sub => 'bench', exp => $exp })] },
        ES256       => { conf => "credits on; credits_jwt_key_file $ec_pub; "
                                 . 'credits_jwt_algorithms ES256;',
                         tokens => [jwt_pem('ES256', $ec, { sub => 'bench', exp => $exp })] },
        HS256x1000  => { conf => 'credits on;',
                         tokens => [map { jwt_hs('HS256', $SECRET, { sub => 'bench',
                                                 exp => $exp, jti => "t$_" }) } 1 .. 1000] },
        projects10k => { conf => 'credits on;',
                         tokens => [map { jwt_hs('HS256', $SECRET, { sub => "p$_",
                                                 exp => $exp }) } 1 .. $PROJECTS] },
    };
}

# The stand-in upstream's location of a streamed answer: 50 message
# events and a cost event after every tenth (costs 10 .. 50), sent
# chunked, with no length, as an AI service streams (SSI on, finding
# nothing to include, is what drops the length): a length sent up front
# would spare plain proxy the stream's last chunk, which no stream has.
sub sse_location {
    my $body = sse_body();
    return "location /ai/sse { default_type text/event-stream; ssi on; "
         . "ssi_types text/event-stream; return 200 '$body'; }";
}

# the streamed answer, as a "return 200 '...'" of nginx
sub sse_body {
    return join '', map { "event: message\\ndata: {\\\"token\\\":$_}\\n\\n"
                          . ($_ % 10 ? '' : "event: credits\\ndata: $_\\n\\n") } 1 .. 50;
}

# every project the variants charge, funded for any run
sub fund {
    my ($redis) = @_;
    my $plenty = '1000000000000';
    $redis->cmd('MSET', 'credits:{bench}:balance', $plenty,
                map { ("credits:{p$_}:balance", $plenty) } 1 .. $PROJECTS);
}

# a wrk script sending the tokens in turn to $path (the variant's
# requests, all alike but for the token)
sub wrk_script {
    my ($dir, $name, $path, @tokens) = @_;
    my $file = "$dir/$name.lua";
    open my $l, '>', $file or die "$file: $!";
    print $l 'local tokens = {"' . join('","', @tokens) . "\"}\n" . <<"LUA";
local n = 0
request = function()
    n = n + 1
    return wrk.format("GET", "$path", {["Authorization"] = "Bearer " .. tokens[(n % #tokens) + 1]})
end
LUA
    close $l;
    return $file;
}

# The gateway of one variant as a single process (no master) under
# callgrind; wrk at 4 connections warms it up (every token verified once,
# the token cache warm), then the counters are zeroed and wrk sends the
# measured requests for $secs.  Returns the dump of just those, their
# number and the script calls they made.
sub callgrind_gateway {
    my (%o) = @_;
    my $gw = CreditsTest::Nginx->new(redis => $o{redis}, log_level => 'warn',
                                     vars => { UP => $o{upstream}->port },
                                     http => <<"END");
    access_log off;
    credits_redis %%REDIS%%;
    credits_jwt_key_file $o{dir}/hs.key;
    upstream ai { server 127.0.0.1:%%UP%%; keepalive 16; }
    server {
        listen 127.0.0.1:%%PORT%%;
        keepalive_requests 1000000;
        location /ai {
            $o{conf}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://ai;
        }
    }
END

    my $out = $gw->dir . '/callgrind.out';
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        exec 'valgrind', '--tool=callgrind', "--callgrind-out-file=$out",
             '--log-file=' . $gw->dir . '/valgrind.log',
             $ENV{NGINX_BIN} || '/usr/sbin/nginx', '-p', $gw->dir . '/',
             '-c', $gw->dir . '/nginx.conf', '-e', $gw->dir . '/error.log',
             '-g', 'daemon off; master_process off;';
        die "valgrind: $!";
    }
    wait_for(sub { CreditsTest::port_open($gw->port) }, 60)
        or die "callgrind: the gateway did not start:\n" . $gw->error_log;

    my $url = 'http://127.0.0.1:' . $gw->port . ($o{path} // '/ai');
    my $wrk = sub {
        my ($c, $secs) = @_;
        my $r = `wrk -t1 -c$c -d${secs}s -s $o{script} $url 2>&1`;
        my ($n) = $r =~ /(\d+) requests in/;
        die "callgrind: $o{name}: non-2xx answers\n$r" if $r =~ /Non-2xx/;
        return $n || 0;
    };

    # long enough for every token to come once more than once
    my $rate = $wrk->(4, 2) / 2 || 1;
    my $warm = int(1.3 * $o{tokens} / $rate) + 1;
    $wrk->(4, $warm) if $o{tokens} > 1;

    system("callgrind_control -z $pid >/dev/null 2>&1");
    my $calls = script_calls($o{redis});
    my $requests = $wrk->(4, $o{seconds});
    $calls = script_calls($o{redis}) - $calls;
    system("callgrind_control -d $pid >/dev/null 2>&1");
    sleep 1;
    kill 'QUIT', $pid;
    waitpid $pid, 0;

    my ($dump) = grep { -s } "$out.1";
    die "callgrind: $o{name}: no dump\n" unless $dump && $requests;
    return ($dump, $requests, $calls);
}

# The variants counted under callgrind (make profile, bench/guard): the
# token variants, a streamed answer of 50 events (5 of them cost events)
# through plain proxy and through the module's stream filter, and HS256
# with a visitor limit and a budget that never refuse (the visitor: the
# client's port).  "base": what a variant's added instructions are counted
# against (plain proxy when none).
sub callgrind_variants {
    my ($dir) = @_;
    my $v = token_variants($dir);
    my $hs = $v->{HS256}{tokens};
    $v->{'SSE-proxy'} = { conf => 'proxy_buffering off;', tokens => $hs,
                          path => '/ai/sse' };
    $v->{SSE} = { conf => 'proxy_buffering off; credits on; credits_price 50;
                           credits_cost_event credits;',
                  tokens => $hs, path => '/ai/sse', base => 'SSE-proxy' };
    $v->{limits} = { conf => 'credits on; credits_visitor $remote_port;
                              credits_visitor_limit 100000000000000 per 1d;
                              credits_budget 100000000000000 per 1d;',
                     tokens => $hs, base => 'HS256' };
    return $v;
}

# the stand-in upstream of the callgrind runs, started
sub callgrind_upstream {
    my $sse_location = sse_location();
    my $up = CreditsTest::Nginx->new(http => <<"END");
    access_log off;
    server {
        listen 127.0.0.1:%%PORT%%;
        keepalive_requests 1000000;
        location / { return 200 '{"ok":true}'; }
        $sse_location
    }
END
    $up->start;
    return $up;
}

# one variant of callgrind_variants() under callgrind: { dump, requests,
# calls (script calls), ir (instructions per request) }
sub callgrind_variant {
    my (%o) = @_;
    my $v = $o{variant};
    my ($dump, $requests, $calls) = callgrind_gateway(
        name => $o{name}, dir => $o{dir}, redis => $o{redis},
        upstream => $o{upstream}, conf => $v->{conf},
        tokens => scalar @{ $v->{tokens} },
        script => wrk_script($o{dir}, $o{name}, $v->{path} // '/ai',
                             @{ $v->{tokens} }),
        path => $v->{path}, seconds => $o{seconds});
    return { dump => $dump, requests => $requests, calls => $calls,
             ir => per_request($dump, $requests) };
}

# script calls Redis ran so far: how many requests share one (a batch)
# moves the instructions per request, and depends on timing
sub script_calls {
    my ($redis) = @_;
    my ($n) = $redis->cmd('INFO', 'commandstats') =~ /^cmdstat_evalsha:calls=(\d+)/m;
    return $n // 0;
}

# callgrind_annotate's function table, before the annotated source (whose
# "=> callee" lines would count callees twice): [instructions, where]
sub functions {
    my ($dump, $inclusive) = @_;
    my $ann = `callgrind_annotate --threshold=100 --inclusive=$inclusive $dump 2>/dev/null`;
    $ann =~ s/^-+\n-- Auto-annotated source.*//ms;
    my @f;
    for (split /\n/, $ann) {
        my ($ir, $where) = /^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)$/ or next;
        $ir =~ tr/,//d;
        push @f, [$ir, $where];
    }
    return @f;
}

# the dump's instructions per request: its "summary:" line, what
# callgrind_annotate calls the program's totals
sub per_request {
    my ($dump, $requests) = @_;
    my ($total) = CreditsTest::slurp($dump) =~ /^summary:\s*(\d+)/m
        or die "callgrind: no summary in $dump\n";
    return $total / $requests;
}

1;
