/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * creditsctl's Redis side: which node to talk to (the one given, the
 * master a sentinel names, the one a cluster redirects to), every
 * command's reply, and the ledger read in pages.  A command-line tool may
 * block (transport.c); Redis itself must not: no command here runs for a
 * time that grows with the ledger.
 */

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include "creditsctl.h"


char *
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


/* AUTH, with an ACL user when one is given; never a password in a message */

static void
authenticate(conn_t *c, const char *user, const char *password)
{
    if (password == NULL) {
        return;
    }

    if (user) {
        freeReplyObject(conn_command(c, "AUTH", "AUTH %s %s", user, password));

    } else {
        freeReplyObject(conn_command(c, "AUTH", "AUTH %s", password));
    }
}


/* "host:port" of the master the sentinel at --redis names */

static const char *
sentinel_master(options_t *o)
{
    static char   addr[300];
    conn_t       *c;
    redisReply   *r;

    c = conn_open(o, "sentinel", o->redis);
    authenticate(c, o->sentinel_user, o->sentinel_password);

    r = conn_command(c, "SENTINEL get-master-addr-by-name",
                     "SENTINEL get-master-addr-by-name %s", o->sentinel);

    if (r->type == REDIS_REPLY_NIL) {
        die(EXIT_REDIS, "sentinel %s: no master named \"%s\"", o->redis,
            o->sentinel);
    }

    check_strings(r, "SENTINEL get-master-addr-by-name");

    if (r->elements != 2) {
        die(EXIT_REDIS, "unexpected reply to SENTINEL get-master-addr-by-name");
    }

    snprintf(addr, sizeof(addr), "%s:%s", r->element[0]->str,
             r->element[1]->str);

    freeReplyObject(r);
    conn_close(c);

    return addr;
}


/* a sentinel's answer may be stale during a failover: ROLE tells */

static void
check_master(options_t *o)
{
    redisReply  *r;

    r = conn_command(o->conn, "ROLE", "ROLE");

    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0
        || r->element[0]->type != REDIS_REPLY_STRING)
    {
        die(EXIT_REDIS, "unexpected reply to ROLE");
    }

    if (strcmp(r->element[0]->str, "master") != 0) {
        die(EXIT_REDIS, "redis %s: not a master (ROLE: %s), though sentinel "
            "%s names it master of \"%s\" (a failover under way?)",
            o->node, r->element[0]->str, o->redis, o->sentinel);
    }

    freeReplyObject(r);
}


static void
connect_redis(options_t *o)
{
    if (o->node == NULL) {
        o->node = o->sentinel ? sentinel_master(o) : o->redis;
    }

    o->conn = conn_open(o, "redis", o->node);
    authenticate(o->conn, o->user, o->password);

    if (o->sentinel) {
        check_master(o);
    }

    if (o->db) {
        freeReplyObject(conn_command(o->conn, "SELECT", "SELECT %ld", o->db));
    }
}


/*
 * A cluster's node answers MOVED or ASK for a key it does not serve: the
 * command goes again, the same bytes, to the node named (after ASKING
 * for an ASK), which serves the next commands too.
 */

static int
redirected(options_t *o, redisReply *r, int *asking)
{
    static char  node[2][300];
    static int   n;
    const char  *p;

    if (strncmp(r->str, "MOVED ", 6) == 0) {
        *asking = 0;

    } else if (strncmp(r->str, "ASK ", 4) == 0) {
        *asking = 1;

    } else {
        return 0;
    }

    /* "MOVED 3999 127.0.0.1:6381": the address after the slot */
    p = strchr(r->str, ' ');
    p = p ? strchr(p + 1, ' ') : NULL;

    if (p == NULL || strlen(p + 1) >= sizeof(node[0])) {
        return 0;
    }

    /* the previous address may still be o->node: two buffers in turn */
    o->node = strcpy(node[n++ % 2], p + 1);

    conn_close(o->conn);
    o->conn = NULL;

    return 1;
}


/*
 * Every command's reply goes through here: errors end the program.  The
 * command is formatted once, so a redirected one goes out byte for byte.
 */

static redisReply *
run_formatted(options_t *o, char *cmd, int len)
{
    int          hops, asking;
    redisReply  *r;

    if (len < 0) {
        die(EXIT_REDIS, "out of memory");
    }

    asking = 0;

    for (hops = 0; /* void */; hops++) {

        if (o->conn == NULL) {
            connect_redis(o);
        }

        if (asking) {
            freeReplyObject(conn_command(o->conn, "ASKING", "ASKING"));
        }

        r = conn_request(o->conn, cmd, len);

        if (r->type != REDIS_REPLY_ERROR || hops == 5
            || !redirected(o, r, &asking))
        {
            break;
        }

        freeReplyObject(r);
    }

    free(cmd);

    if (r->type == REDIS_REPLY_ERROR) {
        die(EXIT_REDIS, "redis %s: %s", o->node, r->str);
    }

    return r;
}


redisReply *
run(options_t *o, const char *fmt, ...)
{
    int       len;
    char     *cmd;
    va_list   ap;

    va_start(ap, fmt);
    len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);

    return run_formatted(o, cmd, len);
}


/* a command of many arguments (an XDEL of a page's ids) */

redisReply *
run_argv(options_t *o, int argc, const char **argv, const size_t *lens)
{
    int    len;
    char  *cmd;

    len = redisFormatCommandArgv(&cmd, argc, argv, lens);

    return run_formatted(o, cmd, len);
}


/* a number Redis keeps as a string; a missing key is 0 */

long long
stored_number(redisReply *r, const char *what)
{
    long long  n;

    if (r->type == REDIS_REPLY_INTEGER) {
        return r->integer;
    }

    if (r->type == REDIS_REPLY_NIL) {
        return 0;
    }

    if (r->type != REDIS_REPLY_STRING || whole_number(r->str, r->len, &n)) {
        die(EXIT_REDIS, "%s is not a whole number", what);
    }

    return n;
}


/* an array of strings (HGETALL, ZRANGE), or the program ends */

void
check_strings(redisReply *r, const char *what)
{
    size_t  i;

    if (r->type != REDIS_REPLY_ARRAY) {
        die(EXIT_REDIS, "unexpected reply to %s", what);
    }

    for (i = 0; i < r->elements; i++) {
        if (r->element[i]->type != REDIS_REPLY_STRING) {
            die(EXIT_REDIS, "unexpected reply to %s", what);
        }
    }
}


/* an entry is [id, [field, value, ...]], or the program ends */

static void
check_entry(redisReply *e)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2
        || e->element[0]->type != REDIS_REPLY_STRING
        || e->element[0]->len >= LEDGER_ID_MAX - 1
        || e->element[1]->type != REDIS_REPLY_ARRAY
        || e->element[1]->elements % 2)
    {
        die(EXIT_REDIS, "unexpected ledger entry in the reply");
    }

    check_strings(e->element[1], "XRANGE");
}


/* a page of at most count entries, newest first, from "to" downwards */

static redisReply *
ledger_page_back(options_t *o, const char *ledger, const char *to,
    long long count)
{
    size_t       i;
    redisReply  *r;

    r = run(o, "XREVRANGE %s %s - COUNT %lld", ledger, to, count);

    if (r->type != REDIS_REPLY_ARRAY) {
        die(EXIT_REDIS, "unexpected reply to XREVRANGE");
    }

    for (i = 0; i < r->elements; i++) {
        check_entry(r->element[i]);
    }

    return r;
}


/* the id of the newest entry into id (LEDGER_ID_MAX bytes); 0: none */

int
ledger_last_id(options_t *o, const char *ledger, char *id)
{
    int          found;
    redisReply  *r;

    r = ledger_page_back(o, ledger, "+", 1);

    found = (r->elements == 1);

    if (found) {
        memcpy(id, r->element[0]->element[0]->str,
               r->element[0]->element[0]->len + 1);
    }

    freeReplyObject(r);
    return found;
}


/*
 * The start of the last n entries up to "to": an id, or "-" when there
 * are no more than n.  Only ids are kept, page by page, so a large n
 * costs neither Redis nor us more than a page at a time.
 */

void
ledger_from_last(options_t *o, const char *ledger, const char *to,
    long long n, char *from)
{
    char         end[LEDGER_ID_MAX];
    long long    count;
    redisReply  *r, *last;

    snprintf(end, sizeof(end), "%s", to);
    strcpy(from, "-");

    while (n > 0) {
        count = n < LEDGER_PAGE ? n : LEDGER_PAGE;
        r = ledger_page_back(o, ledger, end, count);

        if ((long long) r->elements < count) {
            freeReplyObject(r);
            return;
        }

        n -= count;
        last = r->element[r->elements - 1]->element[0];

        if (n == 0) {
            memcpy(from, last->str, last->len + 1);
        }

        snprintf(end, sizeof(end), "(%s", last->str);
        freeReplyObject(r);
    }
}


/*
 * One page of at most LEDGER_PAGE entries from start to "to", oldest
 * first, each checked; start (LEDGER_ID_MAX bytes) then excludes them,
 * so the next call reads the next page.  A page shorter than LEDGER_PAGE
 * is the last one.  Each XRANGE reads one page, so Redis is never busy
 * with the ledger for more than a page's time.
 */

redisReply *
ledger_page(options_t *o, const char *ledger, char *start, const char *to)
{
    size_t       i;
    redisReply  *r;

    r = run(o, "XRANGE %s %s %s COUNT %d", ledger, start, to, LEDGER_PAGE);

    if (r->type != REDIS_REPLY_ARRAY) {
        die(EXIT_REDIS, "unexpected reply to XRANGE");
    }

    for (i = 0; i < r->elements; i++) {
        check_entry(r->element[i]);
    }

    if (r->elements) {
        snprintf(start, LEDGER_ID_MAX, "(%s",
                 r->element[r->elements - 1]->element[0]->str);
    }

    return r;
}


/*
 * Calls handler for each entry from "from" to "to" (ids, both included,
 * or "(id" for an excluded one; "-" and "+" for the ends), oldest first.
 */

void
ledger_read(options_t *o, const char *ledger, const char *from,
    const char *to, ledger_entry_pt handler, void *data)
{
    char         start[LEDGER_ID_MAX];
    size_t       i, n;
    redisReply  *r;

    snprintf(start, sizeof(start), "%s", from);

    do {
        r = ledger_page(o, ledger, start, to);

        for (i = 0; i < r->elements; i++) {
            handler(o, r->element[i], data);
        }

        n = r->elements;

        /* the last entry wanted: no need for an empty page after it */
        if (n && strcmp(start + 1, to) == 0) {
            n = 0;
        }

        freeReplyObject(r);

    } while (n == LEDGER_PAGE);
}


/* a field's value in an entry checked by check_entry(), NULL if absent */

redisReply *
ledger_field(redisReply *entry, const char *name)
{
    size_t       i, len;
    redisReply  *f;

    f = entry->element[1];
    len = strlen(name);

    for (i = 0; i + 1 < f->elements; i += 2) {
        if (f->element[i]->len == len
            && memcmp(f->element[i]->str, name, len) == 0)
        {
            return f->element[i + 1];
        }
    }

    return NULL;
}
