/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * creditsctl: the operator's tool for the credits kept in Redis.
 *
 *   creditsctl [options] balance P
 *   creditsctl [options] topup P N
 *   creditsctl [options] price ROUTE [N | --unset]
 *   creditsctl [options] prices
 *   creditsctl [options] ledger P [--last N]
 *   creditsctl [options] holds P
 *   creditsctl [options] audit P [--start N]
 *
 * A command-line tool may block: it uses hiredis's synchronous API.
 */

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <hiredis/hiredis.h>

#define EXIT_USAGE     2
#define EXIT_REDIS     3
#define EXIT_MISMATCH  1

#define PROJECT_MAX    128


typedef struct {
    const char   *redis;
    const char   *password;
    long          db;
    const char   *prefix;
    int           json;
    redisContext *ctx;
} options_t;


typedef struct {
    const char  *name;
    const char  *args;
    int        (*run)(options_t *o, int argc, char **argv);
    const char  *help;
} command_t;


static int cmd_balance(options_t *o, int argc, char **argv);
static int cmd_topup(options_t *o, int argc, char **argv);
static int cmd_price(options_t *o, int argc, char **argv);
static int cmd_prices(options_t *o, int argc, char **argv);
static int cmd_ledger(options_t *o, int argc, char **argv);
static int cmd_holds(options_t *o, int argc, char **argv);
static int cmd_audit(options_t *o, int argc, char **argv);


static const command_t  commands[] = {
    { "balance", "P", cmd_balance,
      "print the project's balance (a missing key is 0)" },
    { "topup", "P N", cmd_topup,
      "add N credits and write a 'topup' ledger entry, atomically" },
    { "price", "ROUTE [N | --unset]", cmd_price,
      "show, set or remove the runtime price of a route" },
    { "prices", "", cmd_prices,
      "list the runtime price overrides" },
    { "ledger", "P [--last N]", cmd_ledger,
      "list the project's ledger entries, oldest first" },
    { "holds", "P", cmd_holds,
      "list the project's open holds" },
    { "audit", "P [--start N]", cmd_audit,
      "check start + top-ups = balance + charged + open holds" },
    { NULL, NULL, NULL, NULL }
};


/* one topup: the balance and its ledger entry change together or not at all */
static const char  topup_lua[] =
    "local t = redis.call('TIME')\n"
    "local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
    "local b = redis.call('INCRBY', KEYS[1], ARGV[1])\n"
    "redis.call('XADD', KEYS[2], '*', 'outcome', 'topup',"
    " 'amount', ARGV[1], 'ts', now)\n"
    "return b\n";

/*
 * The audit sums balance, ledger and holds in one atomic snapshot, inside
 * Redis: a ledger of millions of entries is read in pages there instead of
 * being sent over the wire.  Returns balance, charged, top-ups, held.
 */
static const char  audit_lua[] =
    "local balance = tonumber(redis.call('GET', KEYS[1]) or '0')\n"
    "local charged, topups, held = 0, 0, 0\n"
    "local from = '-'\n"
    "while true do\n"
    "  local page = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', 10000)\n"
    "  if #page == 0 then break end\n"
    "  for _, e in ipairs(page) do\n"
    "    local f, outcome, amount, ch = e[2], nil, 0, 0\n"
    "    for i = 1, #f, 2 do\n"
    "      if f[i] == 'outcome' then outcome = f[i + 1]\n"
    "      elseif f[i] == 'amount' then amount = tonumber(f[i + 1]) or 0\n"
    "      elseif f[i] == 'charged' then ch = tonumber(f[i + 1]) or 0 end\n"
    "    end\n"
    "    if outcome == 'topup' then topups = topups + amount\n"
    "    else charged = charged + ch end\n"
    "  end\n"
    "  from = '(' .. page[#page][1]\n"
    "end\n"
    "for _, m in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do\n"
    "  held = held + (tonumber(string.match(m, '^[^:]+:(%d+):')) or 0)\n"
    "end\n"
    "return {balance, charged, topups, held}\n";


static void
die(int code, const char *fmt, ...)
{
    va_list  ap;

    fputs("creditsctl: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);

    exit(code);
}


static void
usage(FILE *out)
{
    const command_t  *c;

    fprintf(out,
        "usage: creditsctl [--redis ADDR] [--password S] [--db N] "
        "[--prefix S] [--json] COMMAND ARGS\n\n"
        "  --redis ADDR   host:port or unix:/path (default 127.0.0.1:6379)\n"
        "  --prefix S     key prefix (default credits:)\n"
        "  --json         one JSON document on stdout\n\ncommands:\n");

    for (c = commands; c->name; c++) {
        fprintf(out, "  %-8s %-20s %s\n", c->name, c->args, c->help);
    }
}


static long long
parse_number(const char *s, long long min, const char *what)
{
    char       *end;
    long long   n;

    errno = 0;
    n = strtoll(s, &end, 10);

    if (*s == '\0' || *end != '\0' || errno != 0 || n < min
        || s[0] == '+' || s[0] == ' ')
    {
        die(EXIT_USAGE, "invalid %s \"%s\"", what, s);
    }

    return n;
}


static const char *
check_project(const char *p)
{
    size_t  i, len;

    len = strlen(p);

    if (len == 0 || len > PROJECT_MAX) {
        die(EXIT_USAGE, "invalid project id \"%s\": 1 to 128 characters", p);
    }

    for (i = 0; i < len; i++) {
        if (!(p[i] >= 'a' && p[i] <= 'z') && !(p[i] >= 'A' && p[i] <= 'Z')
            && !(p[i] >= '0' && p[i] <= '9') && p[i] != '.' && p[i] != '_'
            && p[i] != '-')
        {
            die(EXIT_USAGE, "invalid project id \"%s\": only [A-Za-z0-9._-]",
                p);
        }
    }

    return p;
}


static char *
key(options_t *o, const char *project, const char *suffix)
{
    static char  buf[4][512];
    static int   n;
    char        *k;

    k = buf[n++ % 4];

    if (project) {
        snprintf(k, sizeof(buf[0]), "%s{%s}:%s", o->prefix, project, suffix);
    } else {
        snprintf(k, sizeof(buf[0]), "%s%s", o->prefix, suffix);
    }

    return k;
}


static void
connect_redis(options_t *o)
{
    char            host[256];
    const char     *colon;
    struct timeval  tv = { 2, 0 };
    redisReply     *r;

    if (strncmp(o->redis, "unix:", 5) == 0) {
        o->ctx = redisConnectUnixWithTimeout(o->redis + 5, tv);

    } else {
        colon = strrchr(o->redis, ':');
        if (colon == NULL || colon == o->redis
            || (size_t) (colon - o->redis) >= sizeof(host))
        {
            die(EXIT_USAGE, "invalid --redis \"%s\": host:port or unix:/path",
                o->redis);
        }

        memcpy(host, o->redis, colon - o->redis);
        host[colon - o->redis] = '\0';

        o->ctx = redisConnectWithTimeout(host,
                     (int) parse_number(colon + 1, 1, "port"), tv);
    }

    if (o->ctx == NULL || o->ctx->err) {
        die(EXIT_REDIS, "cannot connect to redis %s: %s", o->redis,
            o->ctx ? o->ctx->errstr : "out of memory");
    }

    redisSetTimeout(o->ctx, tv);

    if (o->password) {
        r = redisCommand(o->ctx, "AUTH %s", o->password);
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            die(EXIT_REDIS, "AUTH failed: %s", r ? r->str : o->ctx->errstr);
        }
        freeReplyObject(r);
    }

    if (o->db) {
        r = redisCommand(o->ctx, "SELECT %ld", o->db);
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            die(EXIT_REDIS, "SELECT failed: %s", r ? r->str : o->ctx->errstr);
        }
        freeReplyObject(r);
    }
}


/* every command's reply goes through here: errors end the program */

static redisReply *
run(options_t *o, const char *fmt, ...)
{
    va_list      ap;
    redisReply  *r;

    if (o->ctx == NULL) {
        connect_redis(o);
    }

    va_start(ap, fmt);
    r = redisvCommand(o->ctx, fmt, ap);
    va_end(ap);

    if (r == NULL) {
        die(EXIT_REDIS, "redis %s: %s", o->redis, o->ctx->errstr);
    }

    if (r->type == REDIS_REPLY_ERROR) {
        die(EXIT_REDIS, "redis %s: %s", o->redis, r->str);
    }

    return r;
}


static long long
reply_number(redisReply *r)
{
    if (r->type == REDIS_REPLY_INTEGER) {
        return r->integer;
    }

    if (r->type == REDIS_REPLY_STRING) {
        return parse_number(r->str, -9223372036854775807LL, "number in redis");
    }

    return 0;
}


static void
json_string(const char *s)
{
    putchar('"');

    for ( /* void */ ; *s; s++) {
        if (*s == '"' || *s == '\\') {
            printf("\\%c", *s);

        } else if ((unsigned char) *s < 0x20) {
            printf("\\u%04x", (unsigned char) *s);

        } else {
            putchar(*s);
        }
    }

    putchar('"');
}


static int
no_more_args(int argc, int want, const char *usage_line)
{
    if (argc != want) {
        die(EXIT_USAGE, "usage: creditsctl %s", usage_line);
    }

    return 0;
}


static int
cmd_balance(options_t *o, int argc, char **argv)
{
    const char  *p;
    redisReply  *r;

    no_more_args(argc, 1, "balance P");
    p = check_project(argv[0]);

    r = run(o, "GET %s", key(o, p, "balance"));

    if (o->json) {
        printf("{\"project\":");
        json_string(p);
        printf(",\"balance\":%lld}\n", reply_number(r));

    } else {
        printf("%lld\n", reply_number(r));
    }

    freeReplyObject(r);
    return 0;
}


static int
cmd_topup(options_t *o, int argc, char **argv)
{
    long long    n;
    const char  *p;
    redisReply  *r;

    no_more_args(argc, 2, "topup P N");
    p = check_project(argv[0]);
    n = parse_number(argv[1], 1, "amount");

    r = run(o, "EVAL %s 2 %s %s %lld", topup_lua, key(o, p, "balance"),
            key(o, p, "ledger"), n);

    if (o->json) {
        printf("{\"project\":");
        json_string(p);
        printf(",\"topup\":%lld,\"balance\":%lld}\n", n, r->integer);

    } else {
        printf("%lld\n", r->integer);
    }

    freeReplyObject(r);
    return 0;
}


static int
cmd_price(options_t *o, int argc, char **argv)
{
    long long    n;
    redisReply  *r;

    if (argc < 1 || argc > 2 || argv[0][0] == '\0') {
        die(EXIT_USAGE, "usage: creditsctl price ROUTE [N | --unset]");
    }

    if (argc == 2 && strcmp(argv[1], "--unset") == 0) {
        r = run(o, "HDEL %s %s", key(o, NULL, "prices"), argv[0]);
        freeReplyObject(r);

    } else if (argc == 2) {
        n = parse_number(argv[1], 0, "price");
        r = run(o, "HSET %s %s %lld", key(o, NULL, "prices"), argv[0], n);
        freeReplyObject(r);
    }

    r = run(o, "HGET %s %s", key(o, NULL, "prices"), argv[0]);

    if (o->json) {
        printf("{\"route\":");
        json_string(argv[0]);
        printf(",\"price\":%s}\n",
               r->type == REDIS_REPLY_STRING ? r->str : "null");

    } else {
        printf("%s\n", r->type == REDIS_REPLY_STRING ? r->str
                                                     : "(configured price)");
    }

    freeReplyObject(r);
    return 0;
}


static int
cmd_prices(options_t *o, int argc, char **argv)
{
    size_t       i;
    redisReply  *r;

    (void) argv;
    no_more_args(argc, 0, "prices");

    r = run(o, "HGETALL %s", key(o, NULL, "prices"));

    if (o->json) {
        printf("{");
        for (i = 0; i + 1 < r->elements; i += 2) {
            printf(i ? "," : "");
            json_string(r->element[i]->str);
            printf(":%s", r->element[i + 1]->str);
        }
        printf("}\n");

    } else {
        printf("%-32s %10s\n", "ROUTE", "PRICE");
        for (i = 0; i + 1 < r->elements; i += 2) {
            printf("%-32s %10s\n", r->element[i]->str, r->element[i + 1]->str);
        }
    }

    freeReplyObject(r);
    return 0;
}


static const char *
field(redisReply *fields, const char *name)
{
    size_t  i;

    for (i = 0; i + 1 < fields->elements; i += 2) {
        if (strcmp(fields->element[i]->str, name) == 0) {
            return fields->element[i + 1]->str;
        }
    }

    return "";
}


static const char  *ledger_fields[] = {
    "outcome", "route", "held", "charged", "status", "amount", "request_id",
    "ts", NULL
};


static void
print_entry(options_t *o, redisReply *e, int first)
{
    int          i;
    redisReply  *f;

    f = e->element[1];

    if (o->json) {
        printf("%s{\"id\":", first ? "" : ",");
        json_string(e->element[0]->str);

        for (i = 0; ledger_fields[i]; i++) {
            if (*field(f, ledger_fields[i])) {
                printf(",\"%s\":", ledger_fields[i]);
                json_string(field(f, ledger_fields[i]));
            }
        }

        printf("}");
        return;
    }

    printf("%-16s %-8s %-20s %6s %8s %6s %8s %-32s %s\n",
           e->element[0]->str, field(f, "outcome"), field(f, "route"),
           field(f, "held"), field(f, "charged"), field(f, "status"),
           field(f, "amount"), field(f, "request_id"), field(f, "ts"));
}


static int
cmd_ledger(options_t *o, int argc, char **argv)
{
    size_t       i;
    long long    last;
    const char  *p;
    redisReply  *r;

    if (argc != 1 && !(argc == 3 && strcmp(argv[1], "--last") == 0)) {
        die(EXIT_USAGE, "usage: creditsctl ledger P [--last N]");
    }

    p = check_project(argv[0]);

    if (argc == 3) {
        last = parse_number(argv[2], 1, "count");
        r = run(o, "XREVRANGE %s + - COUNT %lld", key(o, p, "ledger"), last);

    } else {
        r = run(o, "XRANGE %s - +", key(o, p, "ledger"));
    }

    if (o->json) {
        printf("[");

    } else {
        printf("%-16s %-8s %-20s %6s %8s %6s %8s %-32s %s\n", "ID", "OUTCOME",
               "ROUTE", "HELD", "CHARGED", "STATUS", "AMOUNT", "REQUEST_ID",
               "TS");
    }

    for (i = 0; i < r->elements; i++) {
        /* XREVRANGE answers newest first: print oldest first either way */
        print_entry(o, r->element[argc == 3 ? r->elements - 1 - i : i],
                    i == 0);
    }

    if (o->json) {
        printf("]\n");
    }

    freeReplyObject(r);
    return 0;
}


/* a hold is the member "<id>:<held>:<route>" scored by its expiry in ms */

static int
parse_hold(const char *member, char *id, size_t idlen, long long *held,
    const char **route)
{
    const char  *c1, *c2;

    c1 = strchr(member, ':');
    c2 = c1 ? strchr(c1 + 1, ':') : NULL;

    if (c2 == NULL || (size_t) (c1 - member) >= idlen) {
        return -1;
    }

    memcpy(id, member, c1 - member);
    id[c1 - member] = '\0';
    *held = strtoll(c1 + 1, NULL, 10);
    *route = c2 + 1;

    return 0;
}


static int
cmd_holds(options_t *o, int argc, char **argv)
{
    char            id[64];
    size_t          i;
    long long       held;
    double          now, expires;
    const char     *p, *route;
    redisReply     *r;
    struct timeval  tv;

    no_more_args(argc, 1, "holds P");
    p = check_project(argv[0]);

    r = run(o, "ZRANGE %s 0 -1 WITHSCORES", key(o, p, "holds"));

    gettimeofday(&tv, NULL);
    now = tv.tv_sec + tv.tv_usec / 1e6;

    printf(o->json ? "[" : "%-32s %6s %-20s %s\n", "HOLD_ID", "HELD", "ROUTE",
           "EXPIRES_IN");

    for (i = 0; i + 1 < r->elements; i += 2) {
        if (parse_hold(r->element[i]->str, id, sizeof(id), &held, &route)) {
            continue;
        }

        expires = strtod(r->element[i + 1]->str, NULL) / 1000 - now;

        if (o->json) {
            printf("%s{\"hold_id\":", i ? "," : "");
            json_string(id);
            printf(",\"held\":%lld,\"route\":", held);
            json_string(route);
            printf(",\"expires_in\":%.3f}", expires);

        } else {
            printf("%-32s %6lld %-20s %.1fs\n", id, held, route, expires);
        }
    }

    if (o->json) {
        printf("]\n");
    }

    freeReplyObject(r);
    return 0;
}


static int
cmd_audit(options_t *o, int argc, char **argv)
{
    long long    start, balance, topups, charged, held, diff;
    const char  *p;
    redisReply  *r;

    if (argc != 1 && !(argc == 3 && strcmp(argv[1], "--start") == 0)) {
        die(EXIT_USAGE, "usage: creditsctl audit P [--start N]");
    }

    p = check_project(argv[0]);
    start = (argc == 3) ? parse_number(argv[2], 0, "start") : 0;

    /* a long ledger takes Redis a while to sum */
    if (o->ctx == NULL) {
        connect_redis(o);
    }

    redisSetTimeout(o->ctx, (struct timeval) { 600, 0 });

    r = run(o, "EVAL %s 3 %s %s %s", audit_lua, key(o, p, "balance"),
            key(o, p, "ledger"), key(o, p, "holds"));

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 4) {
        die(EXIT_REDIS, "unexpected reply to the audit script");
    }

    balance = r->element[0]->integer;
    charged = r->element[1]->integer;
    topups = r->element[2]->integer;
    held = r->element[3]->integer;

    freeReplyObject(r);

    diff = (start + topups) - (balance + charged + held);

    if (o->json) {
        printf("{\"project\":");
        json_string(p);
        printf(",\"start\":%lld,\"topups\":%lld,\"balance\":%lld,"
               "\"charged\":%lld,\"held\":%lld,\"difference\":%lld,"
               "\"ok\":%s}\n", start, topups, balance, charged, held, diff,
               diff ? "false" : "true");

    } else {
        printf("%-10s %12lld\n%-10s %12lld\n%-10s %12lld\n%-10s %12lld\n"
               "%-10s %12lld\n%-10s %12lld\n",
               "start", start, "topups", topups, "balance", balance,
               "charged", charged, "held", held, "difference", diff);
        printf("%s\n", diff ? "MISMATCH: start + topups != balance + charged"
                              " + held"
                            : "ok");
    }

    return diff ? EXIT_MISMATCH : 0;
}


int
main(int argc, char **argv)
{
    int               i;
    options_t         o;
    const command_t  *c;

    memset(&o, 0, sizeof(o));
    o.redis = "127.0.0.1:6379";
    o.prefix = "credits:";

    for (i = 1; i < argc && argv[i][0] == '-'; i++) {

        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }

        if (strcmp(argv[i], "--json") == 0) {
            o.json = 1;
            continue;
        }

        if (i + 1 >= argc) {
            die(EXIT_USAGE, "option %s needs a value", argv[i]);
        }

        if (strcmp(argv[i], "--redis") == 0) {
            o.redis = argv[++i];

        } else if (strcmp(argv[i], "--password") == 0) {
            o.password = argv[++i];

        } else if (strcmp(argv[i], "--db") == 0) {
            o.db = (long) parse_number(argv[++i], 0, "db");

        } else if (strcmp(argv[i], "--prefix") == 0) {
            o.prefix = argv[++i];

        } else {
            die(EXIT_USAGE, "unknown option %s (see --help)", argv[i]);
        }
    }

    if (i >= argc) {
        usage(stderr);
        return EXIT_USAGE;
    }

    for (c = commands; c->name; c++) {
        if (strcmp(c->name, argv[i]) != 0) {
            continue;
        }

        if (i + 1 < argc && strcmp(argv[i + 1], "--help") == 0) {
            printf("usage: creditsctl %s %s\n  %s\n", c->name, c->args,
                   c->help);
            return 0;
        }

        return c->run(&o, argc - i - 1, argv + i + 1);
    }

    die(EXIT_USAGE, "unknown command \"%s\" (see --help)", argv[i]);
    return EXIT_USAGE;
}
