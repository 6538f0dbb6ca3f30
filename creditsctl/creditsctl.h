/*
 * Copyright (C) The ngx_http_credits_module authors
 */


#ifndef _CREDITSCTL_H_INCLUDED_
#define _CREDITSCTL_H_INCLUDED_


#include <stdio.h>
#include <hiredis/hiredis.h>


/* the exit status, as documented in --help and docs/redis.md */
#define EXIT_MISMATCH  1    /* the audit found a difference */
#define EXIT_USAGE     2    /* bad command line */
#define EXIT_REDIS     3    /* Redis failed, or what it holds is unusable */

/* the ledger is read in pages of this many entries, outside any script */
#define LEDGER_PAGE    1000

/* "(" + a stream id: two 20-digit numbers and a dash */
#define LEDGER_ID_MAX  48


typedef struct conn_s  conn_t;


typedef struct {
    const char    *redis;              /* --redis: a node or a sentinel */
    const char    *user;
    const char    *password;
    long           db;
    const char    *prefix;
    int            json;

    int            tls;
    const char    *cacert;
    const char    *cert;
    const char    *key;
    const char    *sni;

    const char    *sentinel;           /* the master's name */
    const char    *sentinel_user;
    const char    *sentinel_password;

    const char    *node;               /* the node connected to */
    conn_t        *conn;
} options_t;


/* what the audit adds up from the ledger */
typedef struct {
    long long      charged;
    long long      topups;
} ledger_sums_t;


/* credits:{P}:checkpoint: the totals of the entries archived so far */
typedef struct {
    long long      charged;
    long long      topups;
    long long      entries;
    char           last[LEDGER_ID_MAX];    /* "": nothing archived */
} checkpoint_t;

/* the checkpoint hash's fields, in the order HMGET asks for them */
#define CHECKPOINT_FIELDS  "'charged', 'topups', 'entries', 'last_id'"


typedef void (*ledger_entry_pt)(options_t *o, redisReply *entry, void *data);


void die(int code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));
int whole_number(const char *s, size_t len, long long *n);
long long parse_number(const char *s, long long min, const char *what);
const char *check_project(const char *p);
int no_more_args(int argc, int want, const char *usage_line);
long long price_value(const char *s, size_t len);

/* transport.c: one connection, plain or TLS */
conn_t *conn_open(options_t *o, const char *what, const char *addr);
void conn_close(conn_t *c);
redisReply *conn_request(conn_t *c, const char *cmd, size_t len);
redisReply *conn_command(conn_t *c, const char *what, const char *fmt, ...);

/* redis.c */
char *key(options_t *o, const char *project, const char *suffix);
redisReply *run(options_t *o, const char *fmt, ...);
redisReply *run_argv(options_t *o, int argc, const char **argv,
    const size_t *lens);
long long stored_number(redisReply *r, const char *what);
void check_strings(redisReply *r, const char *what);
int ledger_last_id(options_t *o, const char *ledger, char *id);
void ledger_from_last(options_t *o, const char *ledger, const char *to,
    long long n, char *from);
redisReply *ledger_page(options_t *o, const char *ledger, char *start,
    const char *to);
void ledger_read(options_t *o, const char *ledger, const char *from,
    const char *to, ledger_entry_pt handler, void *data);
redisReply *ledger_field(redisReply *entry, const char *name);

/* archive.c: older ledger entries to a file, their totals to a checkpoint */
int cmd_archive(options_t *o, int argc, char **argv);
void checkpoint_parse(options_t *o, redisReply *r, const char *project,
    checkpoint_t *cp);
void checkpoint_read(options_t *o, const char *project, checkpoint_t *cp);
void checkpoint_after(const checkpoint_t *cp, char *start);

/* json.c */
void json_string(FILE *f, const char *s, size_t len);
void json_cstring(FILE *f, const char *s);

/* books.c: what a project's money did and where it is */
int cmd_ledger(options_t *o, int argc, char **argv);
int cmd_holds(options_t *o, int argc, char **argv);
int cmd_audit(options_t *o, int argc, char **argv);
void sum_add(long long *sum, long long n);
void ledger_sum_entry(options_t *o, redisReply *e, void *data);

/* limits.c: budgets and visitors of embedded features */
int cmd_budget(options_t *o, int argc, char **argv);
int cmd_visitors(options_t *o, int argc, char **argv);


#endif /* _CREDITSCTL_H_INCLUDED_ */
