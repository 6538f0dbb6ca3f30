/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * A project's books: the ledger, the open holds and the audit of both
 * against the balance.  The ledger is never trimmed by the gateway and
 * may hold millions of entries: it is read in pages, never by a script.
 */

#include <math.h>
#include <string.h>
#include <sys/time.h>
#include "creditsctl.h"


typedef struct {
    const char  *id;
    size_t       id_len;
    long long    held;
    const char  *route;
    size_t       route_len;
} hold_t;


/*
 * Balance, open holds, the newest ledger id and the archive's checkpoint
 * at one instant: its time grows with the open holds only.  Every entry
 * up to that id is final, so the ledger is then summed outside the
 * script, from the checkpoint's last id on; entries appended after the
 * snapshot (whose holds or balance it does not show) are not.
 */
static const char  audit_snapshot_lua[] =
    "local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)\n"
    "return {redis.call('GET', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1),"
    " last[1] and last[1][1] or false,"
    " redis.call('HMGET', KEYS[4], " CHECKPOINT_FIELDS ")}\n";


static const char  *ledger_fields[] = {
    "outcome", "route", "held", "charged", "status", "amount", "request_id",
    "ts", NULL
};


static const char *
text_field(redisReply *e, const char *name)
{
    redisReply  *v;

    v = ledger_field(e, name);

    return v ? v->str : "";
}


static void
print_entry(options_t *o, redisReply *e, void *data)
{
    int          i;
    long long   *printed = data;
    redisReply  *v;

    if (o->json) {
        fputs((*printed)++ ? ",{\"id\":" : "{\"id\":", stdout);
        json_string(stdout, e->element[0]->str, e->element[0]->len);

        for (i = 0; ledger_fields[i]; i++) {
            v = ledger_field(e, ledger_fields[i]);

            if (v && v->len) {
                printf(",\"%s\":", ledger_fields[i]);
                json_string(stdout, v->str, v->len);
            }
        }

        putchar('}');
        return;
    }

    printf("%-16s %-8s %-20s %6s %8s %6s %8s %-32s %s\n",
           e->element[0]->str, text_field(e, "outcome"),
           text_field(e, "route"), text_field(e, "held"),
           text_field(e, "charged"), text_field(e, "status"),
           text_field(e, "amount"), text_field(e, "request_id"),
           text_field(e, "ts"));
}


int
cmd_ledger(options_t *o, int argc, char **argv)
{
    int          found;
    char         from[LEDGER_ID_MAX], to[LEDGER_ID_MAX];
    long long    last, printed;
    const char  *ledger;

    if (argc != 1 && !(argc == 3 && strcmp(argv[1], "--last") == 0)) {
        die(EXIT_USAGE, "usage: creditsctl ledger P [--last N]");
    }

    ledger = key(o, check_project(argv[0]), "ledger");
    last = (argc == 3) ? parse_number(argv[2], 1, "count") : 0;

    /* entries appended while the listing runs are not part of it */
    found = ledger_last_id(o, ledger, to);

    if (o->json) {
        printf("[");

    } else {
        printf("%-16s %-8s %-20s %6s %8s %6s %8s %-32s %s\n", "ID", "OUTCOME",
               "ROUTE", "HELD", "CHARGED", "STATUS", "AMOUNT", "REQUEST_ID",
               "TS");
    }

    if (found) {
        strcpy(from, "-");

        if (last) {
            ledger_from_last(o, ledger, to, last, from);
        }

        printed = 0;
        ledger_read(o, ledger, from, to, print_entry, &printed);
    }

    if (o->json) {
        printf("]\n");
    }

    return 0;
}


/*
 * A hold is the member "<id>:<held>:<route>" scored by its expiry in ms;
 * read as the gateway's scripts read it.  The id part may go on with the
 * hold's window counters, ";<counter>..." (credits_visitor_limit,
 * credits_budget): the id is what comes before them, as in the ledger.
 */

static int
parse_hold(redisReply *m, hold_t *h)
{
    const char  *p, *end, *c;

    p = m->str;
    end = p + m->len;

    c = memchr(p, ':', end - p);
    if (c == NULL || c == p) {
        return -1;
    }

    h->id = p;
    h->id_len = c - p;

    if (memchr(p, ';', c - p)) {
        h->id_len = (const char *) memchr(p, ';', c - p) - p;
    }

    p = c + 1;
    c = memchr(p, ':', end - p);

    if (c == NULL || c == p || *p == '-' || whole_number(p, c - p, &h->held)) {
        return -1;
    }

    h->route = c + 1;
    h->route_len = end - h->route;

    return 0;
}


static void
print_hold(options_t *o, redisReply *m, double expires, int first)
{
    int     ok;
    hold_t  h;

    ok = (parse_hold(m, &h) == 0);

    if (!o->json) {
        if (ok) {
            printf("%-32.*s %6lld %-20.*s %.1fs\n", (int) h.id_len, h.id,
                   h.held, (int) h.route_len, h.route, expires);
        } else {
            printf("%-32.*s %6s %-20s %.1fs\n", (int) m->len, m->str, "?",
                   "(not <id>:<held>:<route>)", expires);
        }

        return;
    }

    fputs(first ? "{" : ",{", stdout);

    if (ok) {
        fputs("\"hold_id\":", stdout);
        json_string(stdout, h.id, h.id_len);
        printf(",\"held\":%lld,\"route\":", h.held);
        json_string(stdout, h.route, h.route_len);

    } else {
        /* reported, not skipped: the operator should see it */
        fputs("\"invalid\":", stdout);
        json_string(stdout, m->str, m->len);
    }

    if (isfinite(expires)) {
        printf(",\"expires_in\":%.3f}", expires);
    } else {
        printf(",\"expires_in\":null}");
    }
}


int
cmd_holds(options_t *o, int argc, char **argv)
{
    size_t          i;
    double          now;
    redisReply     *r;
    struct timeval  tv;

    no_more_args(argc, 1, "holds P");

    r = run(o, "ZRANGE %s 0 -1 WITHSCORES", key(o, check_project(argv[0]),
                                                "holds"));
    check_strings(r, "ZRANGE");

    gettimeofday(&tv, NULL);
    now = tv.tv_sec + tv.tv_usec / 1e6;

    printf(o->json ? "[" : "%-32s %6s %-20s %s\n", "HOLD_ID", "HELD", "ROUTE",
           "EXPIRES_IN");

    for (i = 0; i + 1 < r->elements; i += 2) {
        print_hold(o, r->element[i],
                   strtod(r->element[i + 1]->str, NULL) / 1000 - now, i == 0);
    }

    if (o->json) {
        printf("]\n");
    }

    freeReplyObject(r);
    return 0;
}


void
sum_add(long long *sum, long long n)
{
    if (__builtin_add_overflow(*sum, n, sum)) {
        die(EXIT_REDIS, "the books' sums overflow");
    }
}


/*
 * A missing field counts 0, as in every audit so far; a present one that
 * is not a whole number leaves the books unreadable.
 */

static long long
entry_number(redisReply *e, const char *name)
{
    long long    n;
    redisReply  *v;

    v = ledger_field(e, name);

    if (v == NULL) {
        return 0;
    }

    if (whole_number(v->str, v->len, &n)) {
        die(EXIT_REDIS, "ledger entry %s: %s is not a whole number",
            e->element[0]->str, name);
    }

    return n;
}


/* an entry's part of the books: a top-up's amount, or what was charged */

void
ledger_sum_entry(options_t *o, redisReply *e, void *data)
{
    redisReply    *outcome;
    ledger_sums_t  *s = data;

    (void) o;
    outcome = ledger_field(e, "outcome");

    if (outcome && strcmp(outcome->str, "topup") == 0 && outcome->len == 5) {
        sum_add(&s->topups, entry_number(e, "amount"));

    } else {
        sum_add(&s->charged, entry_number(e, "charged"));
    }
}


/* the open holds' sum; a member the scripts cannot read holds nothing */

static long long
held_sum(redisReply *holds)
{
    size_t     i;
    hold_t     h;
    long long  held;

    held = 0;

    for (i = 0; i < holds->elements; i++) {
        if (parse_hold(holds->element[i], &h) == 0) {
            sum_add(&held, h.held);
            continue;
        }

        fputs("creditsctl: open hold ", stderr);
        json_string(stderr, holds->element[i]->str, holds->element[i]->len);
        fputs(" is not <id>:<held>:<route>: counted as 0\n", stderr);
    }

    return held;
}


/*
 * The books at one snapshot: the checkpoint's totals plus the entries
 * after its last id, up to the snapshot's.  0 when an archive moved the
 * checkpoint meanwhile: the entries it removed may have been missed.
 */

static int
audit_read(options_t *o, const char *p, long long *balance, long long *held,
    ledger_sums_t *sums, checkpoint_t *cp)
{
    int           moved;
    char          last[LEDGER_ID_MAX], from[LEDGER_ID_MAX], ledger[512];
    redisReply   *r;
    checkpoint_t  now;

    /* key() keeps only its last four answers */
    snprintf(ledger, sizeof(ledger), "%s", key(o, p, "ledger"));

    r = run(o, "EVAL %s 4 %s %s %s %s", audit_snapshot_lua,
            key(o, p, "balance"), key(o, p, "holds"), ledger,
            key(o, p, "checkpoint"));

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 4
        || (r->element[2]->type != REDIS_REPLY_NIL
            && (r->element[2]->type != REDIS_REPLY_STRING
                || r->element[2]->len >= LEDGER_ID_MAX - 1)))
    {
        die(EXIT_REDIS, "unexpected reply to the audit's snapshot");
    }

    *balance = stored_number(r->element[0], key(o, p, "balance"));
    check_strings(r->element[1], "the audit's snapshot");
    *held = held_sum(r->element[1]);
    checkpoint_parse(o, r->element[3], p, cp);

    sums->charged = cp->charged;
    sums->topups = cp->topups;

    if (r->element[2]->type == REDIS_REPLY_STRING) {
        memcpy(last, r->element[2]->str, r->element[2]->len + 1);

        /* what the checkpoint counts is never counted again */
        checkpoint_after(cp, from);
        ledger_read(o, ledger, from, last, ledger_sum_entry, sums);
    }

    freeReplyObject(r);

    checkpoint_read(o, p, &now);
    moved = strcmp(now.last, cp->last) != 0;

    return !moved;
}


int
cmd_audit(options_t *o, int argc, char **argv)
{
    int            tries;
    long long      start, balance, held, in, out, diff;
    const char    *p;
    ledger_sums_t   sums;
    checkpoint_t   cp;

    if (argc != 1 && !(argc == 3 && strcmp(argv[1], "--start") == 0)) {
        die(EXIT_USAGE, "usage: creditsctl audit P [--start N]");
    }

    p = check_project(argv[0]);
    start = (argc == 3) ? parse_number(argv[2], 0, "start") : 0;

    for (tries = 0; !audit_read(o, p, &balance, &held, &sums, &cp); tries++) {
        if (tries == 4) {
            die(EXIT_REDIS, "the ledger of %s was archived during each of 5 "
                "audits: run the audit after the archive", p);
        }
    }

    in = start;
    sum_add(&in, sums.topups);
    out = balance;
    sum_add(&out, sums.charged);
    sum_add(&out, held);

    if (__builtin_sub_overflow(in, out, &diff)) {
        die(EXIT_REDIS, "the audit's difference overflows");
    }

    if (o->json) {
        printf("{\"project\":");
        json_cstring(stdout, p);
        printf(",\"start\":%lld,\"topups\":%lld,\"balance\":%lld,"
               "\"charged\":%lld,\"held\":%lld,\"archived\":%lld,"
               "\"checkpoint\":", start, sums.topups, balance, sums.charged,
               held, cp.entries);

        if (cp.last[0]) {
            json_cstring(stdout, cp.last);
        } else {
            fputs("null", stdout);
        }

        printf(",\"difference\":%lld,\"ok\":%s}\n", diff,
               diff ? "false" : "true");

    } else {
        printf("%-10s %12lld\n%-10s %12lld\n%-10s %12lld\n%-10s %12lld\n"
               "%-10s %12lld\n%-10s %12lld\n",
               "start", start, "topups", sums.topups, "balance", balance,
               "charged", sums.charged, "held", held, "difference", diff);

        if (cp.last[0]) {
            printf("%-10s %12lld entries up to %s\n", "archived", cp.entries,
                   cp.last);
        }

        printf("%s\n", diff ? "MISMATCH: start + topups != balance + charged"
                              " + held"
                            : "ok");
    }

    return diff ? EXIT_MISMATCH : 0;
}
