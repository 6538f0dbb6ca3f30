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
 *   creditsctl [options] budget P [NAME [N | --unset]]
 *   creditsctl [options] visitors P NAME [--top N]
 *   creditsctl [options] archive P --before TIME --out FILE
 *
 * This file: the command line, balances, top-ups and prices.
 */

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include "creditsctl.h"


#define PROJECT_MAX    128

/* credits_price's limit: ngx_http_credits_parse_amount() */
#define PRICE_DIGITS   15


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
    { "budget", "P [NAME [N | --unset]]", cmd_budget,
      "show, set or remove the project's own budgets (0 = off)" },
    { "visitors", "P NAME [--top N]", cmd_visitors,
      "spend per hashed visitor in the current window" },
    { "archive", "P --before TIME --out FILE", cmd_archive,
      "move older ledger entries to FILE, their totals to a checkpoint" },
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


void
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
        "usage: creditsctl [OPTIONS] COMMAND ARGS\n\n"
        "  --redis ADDR      host:port or unix:/path (default 127.0.0.1:6379);\n"
        "                    with --sentinel, a sentinel's\n"
        "  --user NAME       ACL user (AUTH NAME S; needs --password)\n"
        "  --password S      AUTH with this password\n"
        "  --db N            SELECT this database\n"
        "  --prefix S        key prefix (default credits:)\n"
        "  --json            one JSON document on stdout\n"
        "  --tls             TLS to Redis (and to the sentinel)\n"
        "  --cacert FILE     verify the server's certificate against these CAs\n"
        "                    (without it: no verification)\n"
        "  --cert FILE       client certificate, with --key FILE\n"
        "  --key FILE        its private key\n"
        "  --sni NAME        name sent (SNI) and verified (default: the host)\n"
        "  --sentinel NAME   ask the sentinel at --redis for NAME's master\n"
        "  --sentinel-user NAME\n"
        "  --sentinel-password S\n"
        "                    AUTH to the sentinel\n\ncommands:\n");

    for (c = commands; c->name; c++) {
        fprintf(out, "  %-8s %-20s %s\n", c->name, c->args, c->help);
    }

    fprintf(out,
        "\nA price N is 1 to 15 decimal digits, as credits_price.\n"
        "A stored value the gateway ignores (a price that is not 1 to 15\n"
        "digits, a hold member that is not <id>:<held>:<route>) is listed as\n"
        "{\"invalid\":\"<stored bytes>\"} in --json, marked in text.\n"
        "\narchive: the entries Redis wrote before TIME (a ledger id, ms\n"
        "since the epoch, or a UTC date YYYY-MM-DD[THH:MM:SSZ]) are appended\n"
        "to FILE (JSON lines, fsync'd), then removed page by page while their\n"
        "totals go to credits:{P}:checkpoint, which audit counts.  Run it\n"
        "again with the same FILE after a failure.\n"
        "\nexit status:\n"
        "  0  ok\n"
        "  1  the audit found a difference\n"
        "  2  usage error\n"
        "  3  Redis unreachable or failed, data in it unusable, or FILE not\n"
        "     written\n");
}


/* "-?[0-9]+" in the range of a long long: 0, else -1 */

int
whole_number(const char *s, size_t len, long long *n)
{
    char  buf[24], *end;

    if (len == 0 || len >= sizeof(buf)
        || !((s[0] >= '0' && s[0] <= '9')
             || (s[0] == '-' && len > 1 && s[1] >= '0' && s[1] <= '9')))
    {
        return -1;
    }

    memcpy(buf, s, len);
    buf[len] = '\0';

    errno = 0;
    *n = strtoll(buf, &end, 10);

    return (errno != 0 || end != buf + len) ? -1 : 0;
}


long long
parse_number(const char *s, long long min, const char *what)
{
    long long  n;

    if (whole_number(s, strlen(s), &n) || n < min) {
        die(EXIT_USAGE, "invalid %s \"%s\"", what, s);
    }

    return n;
}


/* a price (or a budget) as the gateway takes it (1 to 15 digits), else -1 */

long long
price_value(const char *s, size_t len)
{
    size_t  i;

    if (len == 0 || len > PRICE_DIGITS) {
        return -1;
    }

    for (i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return -1;
        }
    }

    return strtoll(s, NULL, 10);
}


const char *
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


int
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
    long long    balance;
    const char  *p;
    redisReply  *r;

    no_more_args(argc, 1, "balance P");
    p = check_project(argv[0]);

    r = run(o, "GET %s", key(o, p, "balance"));
    balance = stored_number(r, key(o, p, "balance"));
    freeReplyObject(r);

    if (o->json) {
        printf("{\"project\":");
        json_cstring(stdout, p);
        printf(",\"balance\":%lld}\n", balance);

    } else {
        printf("%lld\n", balance);
    }

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

    if (r->type != REDIS_REPLY_INTEGER) {
        die(EXIT_REDIS, "unexpected reply to the topup script");
    }

    if (o->json) {
        printf("{\"project\":");
        json_cstring(stdout, p);
        printf(",\"topup\":%lld,\"balance\":%lld}\n", n, r->integer);

    } else {
        printf("%lld\n", r->integer);
    }

    freeReplyObject(r);
    return 0;
}


/*
 * A stored override: a number, or {"invalid":"..."} for one the gateway
 * ignores (it then charges the configured price); text marks it.
 */

static void
print_price(options_t *o, redisReply *v, int width)
{
    long long  n;

    n = price_value(v->str, v->len);

    if (o->json) {
        if (n >= 0) {
            printf("%lld", n);

        } else {
            fputs("{\"invalid\":", stdout);
            json_string(stdout, v->str, v->len);
            putchar('}');
        }

    } else if (n >= 0) {
        printf("%*lld", width, n);

    } else {
        printf("%*s  (invalid: the gateway charges the configured price)",
               width, v->str);
    }
}


static int
cmd_price(options_t *o, int argc, char **argv)
{
    redisReply  *r;
    const char  *prices;

    if (argc < 1 || argc > 2 || argv[0][0] == '\0') {
        die(EXIT_USAGE, "usage: creditsctl price ROUTE [N | --unset]");
    }

    prices = key(o, NULL, "prices");

    if (argc == 2 && strcmp(argv[1], "--unset") == 0) {
        freeReplyObject(run(o, "HDEL %s %s", prices, argv[0]));

    } else if (argc == 2) {
        /* what the gateway would ignore is refused */
        if (price_value(argv[1], strlen(argv[1])) < 0) {
            die(EXIT_USAGE, "invalid price \"%s\": 1 to %d decimal digits, as "
                "credits_price", argv[1], PRICE_DIGITS);
        }

        freeReplyObject(run(o, "HSET %s %s %lld", prices, argv[0],
                            price_value(argv[1], strlen(argv[1]))));
    }

    r = run(o, "HGET %s %s", prices, argv[0]);

    if (o->json) {
        printf("{\"route\":");
        json_cstring(stdout, argv[0]);
        printf(",\"price\":");

        if (r->type == REDIS_REPLY_STRING) {
            print_price(o, r, 0);
        } else {
            printf("null");
        }

        printf("}\n");

    } else if (r->type == REDIS_REPLY_STRING) {
        print_price(o, r, 0);
        putchar('\n');

    } else {
        printf("(configured price)\n");
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
    check_strings(r, "HGETALL");

    printf(o->json ? "{" : "%-32s %10s\n", "ROUTE", "PRICE");

    for (i = 0; i + 1 < r->elements; i += 2) {
        if (o->json) {
            fputs(i ? "," : "", stdout);
            json_string(stdout, r->element[i]->str, r->element[i]->len);
            putchar(':');

        } else {
            printf("%-32s ", r->element[i]->str);
        }

        print_price(o, r->element[i + 1], 10);
        fputs(o->json ? "" : "\n", stdout);
    }

    if (o->json) {
        printf("}\n");
    }

    freeReplyObject(r);
    return 0;
}


/* the options that take a value, and where it goes */

static const char **
option_value(options_t *o, const char *name)
{
    static const struct {
        const char  *name;
        size_t       offset;
    }  values[] = {
        { "--redis", offsetof(options_t, redis) },
        { "--user", offsetof(options_t, user) },
        { "--password", offsetof(options_t, password) },
        { "--prefix", offsetof(options_t, prefix) },
        { "--cacert", offsetof(options_t, cacert) },
        { "--cert", offsetof(options_t, cert) },
        { "--key", offsetof(options_t, key) },
        { "--sni", offsetof(options_t, sni) },
        { "--sentinel", offsetof(options_t, sentinel) },
        { "--sentinel-user", offsetof(options_t, sentinel_user) },
        { "--sentinel-password", offsetof(options_t, sentinel_password) },
        { NULL, 0 }
    };

    int  i;

    for (i = 0; values[i].name; i++) {
        if (strcmp(values[i].name, name) == 0) {
            return (const char **) ((char *) o + values[i].offset);
        }
    }

    return NULL;
}


/* an option that means nothing without another is a usage error */

static void
check_options(options_t *o)
{
    if (!o->tls && (o->cacert || o->cert || o->key || o->sni)) {
        die(EXIT_USAGE, "--cacert, --cert, --key and --sni need --tls");
    }

    if (o->tls && strncmp(o->redis, "unix:", 5) == 0) {
        die(EXIT_USAGE, "--tls needs a host:port address: Redis has no TLS "
            "on unix sockets");
    }

    if ((o->cert == NULL) != (o->key == NULL)) {
        die(EXIT_USAGE, "--cert and --key go together");
    }

    if (o->user && o->password == NULL) {
        die(EXIT_USAGE, "--user needs --password");
    }

    if (o->sentinel == NULL && (o->sentinel_user || o->sentinel_password)) {
        die(EXIT_USAGE, "--sentinel-user and --sentinel-password need "
            "--sentinel");
    }

    if (o->sentinel_user && o->sentinel_password == NULL) {
        die(EXIT_USAGE, "--sentinel-user needs --sentinel-password");
    }
}


/* the options before the command: the index of the command */

static int
parse_options(options_t *o, int argc, char **argv)
{
    int           i;
    const char  **v;

    for (i = 1; i < argc && argv[i][0] == '-'; i++) {

        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            exit(0);
        }

        if (strcmp(argv[i], "--json") == 0) {
            o->json = 1;
            continue;
        }

        if (strcmp(argv[i], "--tls") == 0) {
            o->tls = 1;
            continue;
        }

        if (i + 1 >= argc) {
            die(EXIT_USAGE, "option %s needs a value", argv[i]);
        }

        if (strcmp(argv[i], "--db") == 0) {
            o->db = (long) parse_number(argv[++i], 0, "db");
            continue;
        }

        v = option_value(o, argv[i]);
        if (v == NULL) {
            die(EXIT_USAGE, "unknown option %s (see --help)", argv[i]);
        }

        *v = argv[++i];
    }

    check_options(o);

    return i;
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

    i = parse_options(&o, argc, argv);

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
