/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Budgets and visitors of embedded features:
 *
 *   creditsctl budget P [NAME [N | --unset]]
 *   creditsctl visitors P NAME [--top N]
 *
 * A project's own budgets are the hash credits:{P}:budgets (name -> N, 0
 * turns the feature off); the gateway's window counters are the keys
 * credits:{P}:b:NAME:PERIOD:START (a budget) and
 * credits:{P}:v:NAME:PERIOD:START:VISITOR (a visitor, hashed), which this
 * file reads in the window that is current now.
 */

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "creditsctl.h"


#define NAME_MAX_LEN  128
#define TOP_DEFAULT   20


typedef struct {
    char        *key;        /* the counter's key, as stored */
    char        *fields;     /* a copy, cut into the fields below */
    const char  *name;
    size_t       name_len;
    long long    period;
    long long    start;
    const char  *visitor;    /* a visitor's hash, or NULL */
    long long    spent;
    int          printed;
} counter_t;


static const char *check_name(const char *name);
static char *glob_escape(const char *s);
static size_t counters_now(options_t *o, const char *p, const char *kind,
    const char *name, counter_t **out);
static int parse_counter(char *key, size_t base, int visitor, counter_t *c);
static void print_budget(options_t *o, const char *name, size_t len,
    redisReply *own, counter_t *c, int first);
static int by_spent(const void *a, const void *b);
static void counter_free(counter_t *c);


/* as the gateway checks "name=" (ngx_http_credits_visitors.c) */

static const char *
check_name(const char *name)
{
    size_t  i, len;

    len = strlen(name);

    for (i = 0; i < len; i++) {
        if (!((name[i] >= 'a' && name[i] <= 'z')
              || (name[i] >= 'A' && name[i] <= 'Z')
              || (name[i] >= '0' && name[i] <= '9')
              || strchr("._/@~-", name[i]) != NULL))
        {
            break;
        }
    }

    if (len == 0 || len > NAME_MAX_LEN || i < len) {
        die(EXIT_USAGE, "invalid name \"%s\": 1 to %d letters, digits and "
            "\"._/@~-\"", name, NAME_MAX_LEN);
    }

    return name;
}


/* a SCAN pattern that matches s as it is */

static char *
glob_escape(const char *s)
{
    char  *out, *d;

    out = malloc(2 * strlen(s) + 1);
    if (out == NULL) {
        die(EXIT_REDIS, "out of memory");
    }

    for (d = out; *s; s++) {
        if (strchr("*?[]\\", *s)) {
            *d++ = '\\';
        }

        *d++ = *s;
    }

    *d = '\0';

    return out;
}


/*
 * The counters of one kind ("b" or "v") of the project, of one name or
 * all (NULL), whose window contains now; their values read with GET (a
 * counter gone between SCAN and GET counts 0).
 */

static size_t
counters_now(options_t *o, const char *p, const char *kind, const char *name,
    counter_t **out)
{
    char        *base, *pattern, cursor[32];
    size_t       i, n, size, base_len;
    time_t       now;
    counter_t   *c, one;
    redisReply  *r, *v;

    base = glob_escape(key(o, p, ""));
    base_len = strlen(key(o, p, ""));
    size = strlen(base) + NAME_MAX_LEN + 8;

    pattern = malloc(size);
    if (pattern == NULL) {
        die(EXIT_REDIS, "out of memory");
    }

    snprintf(pattern, size, "%s%s:%s%s", base, kind, name ? name : "*",
             name ? ":*" : "");

    now = time(NULL);
    c = NULL;
    n = 0;
    strcpy(cursor, "0");

    do {
        r = run(o, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);

        if (r->type != REDIS_REPLY_ARRAY || r->elements != 2
            || r->element[0]->type != REDIS_REPLY_STRING
            || r->element[0]->len >= sizeof(cursor))
        {
            die(EXIT_REDIS, "unexpected reply to SCAN");
        }

        memcpy(cursor, r->element[0]->str, r->element[0]->len + 1);
        check_strings(r->element[1], "SCAN");

        for (i = 0; i < r->element[1]->elements; i++) {
            one.key = strdup(r->element[1]->element[i]->str);
            one.fields = strdup(one.key ? one.key : "");
            one.printed = 0;

            if (one.key == NULL || one.fields == NULL) {
                die(EXIT_REDIS, "out of memory");
            }

            if (parse_counter(one.fields, base_len, kind[0] == 'v', &one)
                != 0
                || one.start > now || now >= one.start + one.period)
            {
                counter_free(&one);
                continue;
            }

            c = realloc(c, (n + 1) * sizeof(counter_t));
            if (c == NULL) {
                die(EXIT_REDIS, "out of memory");
            }

            c[n++] = one;
        }

        freeReplyObject(r);

    } while (strcmp(cursor, "0") != 0);

    for (i = 0; i < n; i++) {
        v = run(o, "GET %s", c[i].key);
        c[i].spent = stored_number(v, c[i].key);
        freeReplyObject(v);
    }

    free(pattern);
    free(base);

    *out = c;
    return n;
}


static void
counter_free(counter_t *c)
{
    free(c->key);
    free(c->fields);
}


/* "<base><kind>:NAME:PERIOD:START[:VISITOR]": 0, else -1 */

static int
parse_counter(char *key, size_t base, int visitor, counter_t *c)
{
    char  *p, *f[4];
    int    i, nf;

    p = key + base + 2;
    nf = visitor ? 4 : 3;

    for (i = 0; i < nf; i++) {
        f[i] = p;
        p = strchr(p, ':');

        if ((p == NULL) != (i == nf - 1)) {
            return -1;
        }

        if (p) {
            *p++ = '\0';
        }
    }

    c->name = f[0];
    c->name_len = strlen(f[0]);
    c->visitor = visitor ? f[3] : NULL;

    if (whole_number(f[1], strlen(f[1]), &c->period) || c->period <= 0
        || whole_number(f[2], strlen(f[2]), &c->start))
    {
        return -1;
    }

    return 0;
}


int
cmd_budget(options_t *o, int argc, char **argv)
{
    size_t        i, j, k, n;
    counter_t    *c, *found;
    const char   *p, *name, *budgets;
    redisReply   *r;

    if (argc < 1 || argc > 3) {
        die(EXIT_USAGE, "usage: creditsctl budget P [NAME [N | --unset]]");
    }

    p = check_project(argv[0]);
    name = (argc > 1) ? check_name(argv[1]) : NULL;
    budgets = key(o, p, "budgets");

    if (argc == 3 && strcmp(argv[2], "--unset") == 0) {
        freeReplyObject(run(o, "HDEL %s %s", budgets, name));

    } else if (argc == 3) {
        if (price_value(argv[2], strlen(argv[2])) < 0) {
            die(EXIT_USAGE, "invalid budget \"%s\": 1 to 15 decimal digits "
                "(0 turns the feature off)", argv[2]);
        }

        freeReplyObject(run(o, "HSET %s %s %lld", budgets, name,
                            price_value(argv[2], strlen(argv[2]))));
    }

    r = run(o, "HGETALL %s", key(o, p, "budgets"));
    check_strings(r, "HGETALL");

    n = counters_now(o, p, "b", name, &c);

    if (o->json) {
        printf("{\"project\":");
        json_cstring(stdout, p);
        printf(",\"budgets\":[");

    } else {
        printf("%-24s %12s %12s %8s\n", "NAME", "OWN BUDGET", "SPENT",
               "WINDOW");
    }

    j = 0;

    /* the project's own budgets, with their counters when they have one */

    for (i = 0; i + 1 < r->elements; i += 2) {
        if (name && strcmp(name, r->element[i]->str) != 0) {
            continue;
        }

        found = NULL;

        for (k = 0; k < n; k++) {
            if (c[k].name_len == r->element[i]->len
                && memcmp(c[k].name, r->element[i]->str, c[k].name_len) == 0)
            {
                found = &c[k];
                c[k].printed = 1;
                break;
            }
        }

        print_budget(o, r->element[i]->str, r->element[i]->len,
                     r->element[i + 1], found, j++ == 0);
    }

    /* counters of budgets the project did not set itself */

    for (i = 0; i < n; i++) {
        if (!c[i].printed) {
            print_budget(o, c[i].name, c[i].name_len, NULL, &c[i], j++ == 0);
        }

        counter_free(&c[i]);
    }

    if (name && j == 0) {
        print_budget(o, name, strlen(name), NULL, NULL, 1);
    }

    if (o->json) {
        printf("]}\n");
    }

    free(c);
    freeReplyObject(r);

    return 0;
}


/* one budget: its own N (or the configured one), what its window spent */

static void
print_budget(options_t *o, const char *name, size_t len, redisReply *own,
    counter_t *c, int first)
{
    long long  n, period;

    n = own ? price_value(own->str, own->len) : -1;
    period = c ? c->period : 0;

    if (o->json) {
        fputs(first ? "{\"name\":" : ",{\"name\":", stdout);
        json_string(stdout, name, len);
        fputs(",\"own\":", stdout);

        if (own == NULL) {
            fputs("null", stdout);

        } else if (n >= 0) {
            printf("%lld", n);

        } else {
            fputs("{\"invalid\":", stdout);
            json_string(stdout, own->str, own->len);
            putchar('}');
        }

        printf(",\"spent\":%lld,\"period\":%lld,\"window_start\":%lld}",
               c ? c->spent : 0, period, c ? c->start : 0);
        return;
    }

    printf("%-24.*s ", (int) len, name);

    if (own == NULL) {
        printf("%12s ", "(configured)");

    } else if (n >= 0) {
        printf("%12lld ", n);

    } else {
        printf("%12s ", "(invalid)");
    }

    if (c) {
        printf("%12lld %7llds\n", c->spent, period);

    } else {
        printf("%12d %8s\n", 0, "-");
    }
}


static int
by_spent(const void *a, const void *b)
{
    const counter_t  *x = a, *y = b;

    return (x->spent < y->spent) - (x->spent > y->spent);
}


int
cmd_visitors(options_t *o, int argc, char **argv)
{
    size_t       i, n;
    long long    top, total;
    counter_t   *c;
    const char  *p, *name;

    if (argc != 2 && !(argc == 4 && strcmp(argv[2], "--top") == 0)) {
        die(EXIT_USAGE, "usage: creditsctl visitors P NAME [--top N]");
    }

    p = check_project(argv[0]);
    name = check_name(argv[1]);
    top = (argc == 4) ? parse_number(argv[3], 1, "--top") : TOP_DEFAULT;

    n = counters_now(o, p, "v", name, &c);
    qsort(c, n, sizeof(counter_t), by_spent);

    total = 0;

    for (i = 0; i < n; i++) {
        total += c[i].spent;
    }

    if (o->json) {
        printf("{\"project\":");
        json_cstring(stdout, p);
        printf(",\"name\":");
        json_cstring(stdout, name);
        printf(",\"visitors\":%zu,\"spent\":%lld,\"top\":[", n, total);

    } else {
        printf("%zu visitors spent %lld in the current window\n%-32s %12s\n",
               n, total, "VISITOR", "SPENT");
    }

    for (i = 0; i < n; i++) {
        if ((long long) i < top) {
            if (o->json) {
                printf("%s{\"visitor\":", i ? "," : "");
                json_cstring(stdout, c[i].visitor);
                printf(",\"spent\":%lld}", c[i].spent);

            } else {
                printf("%-32s %12lld\n", c[i].visitor, c[i].spent);
            }
        }

        counter_free(&c[i]);
    }

    if (o->json) {
        printf("]}\n");
    }

    free(c);

    return 0;
}
