
/*
 * Copyright (C) The ngx_http_credits_module authors
 */


#ifndef _NGX_HTTP_CREDITS_MODULE_H_INCLUDED_
#define _NGX_HTTP_CREDITS_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <hiredis/hiredis.h>


struct json_t;


#define NGX_HTTP_CREDITS_TOKEN_MAX       8192
#define NGX_HTTP_CREDITS_PROJECT_MAX     128
#define NGX_HTTP_CREDITS_DIGEST_LEN      32


typedef struct ngx_http_credits_jwt_cache_s  ngx_http_credits_jwt_cache_t;


/* what became of a metered request: $credits_outcome and the counters */
typedef enum {
    NGX_HTTP_CREDITS_NONE = 0,
    NGX_HTTP_CREDITS_COMMITTED,
    NGX_HTTP_CREDITS_RELEASED,
    NGX_HTTP_CREDITS_EXPIRED,
    NGX_HTTP_CREDITS_UNAUTHORIZED,
    NGX_HTTP_CREDITS_INSUFFICIENT,
    NGX_HTTP_CREDITS_REDIS_UNAVAILABLE,
    NGX_HTTP_CREDITS_FAIL_OPEN,
    NGX_HTTP_CREDITS_VISITOR_LIMITED,
    NGX_HTTP_CREDITS_BUDGET_EXHAUSTED,
    NGX_HTTP_CREDITS_FREE,
    NGX_HTTP_CREDITS_OUTCOMES
} ngx_http_credits_outcome_e;


typedef struct {
    ngx_str_t                   key;          /* HMAC secret or PEM bytes */
    ngx_uint_t                  key_type;     /* EVP_PKEY_* or 0 for HMAC */
    ngx_uint_t                  key_bits;
    ngx_uint_t                  algorithms;   /* bit per jwt_alg_t */
    ngx_str_t                   issuer;
    ngx_str_t                   audience;
    ngx_str_t                   project_claim;
    ngx_http_complex_value_t   *token;        /* NULL: Authorization */
    time_t                      leeway;
    ngx_uint_t                  cache_size;
    ngx_http_credits_jwt_cache_t  *cache;     /* per worker, on first use */
} ngx_http_credits_jwt_conf_t;


typedef struct {
    ngx_str_t                   host;         /* name, numeric, or unix path */
    in_port_t                   port;
    ngx_uint_t                  unix_socket;  /* unsigned:1 */
    ngx_str_t                   name;         /* as configured, for logs */
} ngx_http_credits_redis_addr_t;


/* credits_redis and credits_redis_ssl_* */
typedef struct {
    ngx_array_t                *addrs;        /* seeds, or the sentinels */
    ngx_str_t                   user;
    ngx_str_t                   password;
    ngx_int_t                   db;
    ngx_msec_t                  timeout;
    ngx_str_t                   sentinel;     /* the master's name */
    ngx_str_t                   sentinel_user;
    ngx_str_t                   sentinel_password;

    ngx_flag_t                  ssl_on;
    ngx_flag_t                  ssl_verify;
    ngx_uint_t                  ssl_verify_depth;
    ngx_str_t                   ssl_name;     /* null-terminated */
    ngx_uint_t                  ssl_sni;      /* ssl_name is a DNS name */
    ngx_str_t                   ssl_trusted_certificate;
    ngx_str_t                   ssl_certificate;
    ngx_str_t                   ssl_certificate_key;
#if (NGX_SSL)
    ngx_ssl_t                  *ssl;          /* NULL: plain TCP */
#endif

    ngx_resolver_t             *resolver;     /* NULL: resolved at start */
    ngx_msec_t                  resolver_timeout;
} ngx_http_credits_redis_conf_t;


typedef struct {
    ngx_http_credits_redis_conf_t   redis;
    ngx_str_t                       prefix;
    ngx_str_t                       prices_key;
    ngx_shm_zone_t                 *shm_zone;
    ngx_int_t                       request_id_index;
    ngx_uint_t                      enabled;   /* some location has credits on */
} ngx_http_credits_main_conf_t;


/* credits_visitor_limit, credits_budget: N per TIME [name=S] */
typedef struct {
    ngx_int_t                       limit;     /* NGX_CONF_UNSET: none */
    time_t                          period;    /* seconds */
    ngx_str_t                       name;      /* counters' name */
} ngx_http_credits_limit_t;


typedef struct {
    ngx_flag_t                      enable;
    ngx_http_complex_value_t       *price;
    ngx_str_t                       route;
    ngx_uint_t                      route_hash;
    ngx_uint_t                      route_default;  /* unsigned:1 */
    ngx_str_t                       cost_header;
    ngx_str_t                       cost_event;
    ngx_int_t                       hold_step;
    ngx_msec_t                      hold_ttl;
    ngx_uint_t                      fail;
    ngx_http_credits_jwt_conf_t     jwt;
    ngx_http_complex_value_t       *visitor;
    ngx_http_credits_limit_t        visitor_limit;
    ngx_http_credits_limit_t        budget;
    u_char                         *visitor_key;   /* hashes visitor ids */
} ngx_http_credits_loc_conf_t;


#define NGX_HTTP_CREDITS_PAYMENT_REQUIRED  402

/* a hold script's codes beyond placed (1) and too low (0) */
#define NGX_HTTP_CREDITS_OVER_VISITOR      2
#define NGX_HTTP_CREDITS_OVER_BUDGET       3

#define NGX_HTTP_CREDITS_ON_FAIL_CLOSE  1
#define NGX_HTTP_CREDITS_ON_FAIL_OPEN   2

/* the worker's connection to Redis */
#define NGX_HTTP_CREDITS_REDIS_DOWN        0
#define NGX_HTTP_CREDITS_REDIS_CONNECTING  1
#define NGX_HTTP_CREDITS_REDIS_UP          2

/* what a node is: a Redis, the master a sentinel named, a sentinel */
#define NGX_HTTP_CREDITS_NODE_REDIS        0
#define NGX_HTTP_CREDITS_NODE_MASTER       1
#define NGX_HTTP_CREDITS_NODE_SENTINEL     2


typedef struct ngx_http_credits_redis_cmd_s  ngx_http_credits_redis_cmd_t;
typedef struct ngx_http_credits_node_s       ngx_http_credits_node_t;

typedef void (*ngx_http_credits_node_reply_pt)(ngx_http_credits_node_t *node,
    redisReply *reply, void *data);

typedef void (*ngx_http_credits_redis_handler_pt)(
    ngx_http_credits_redis_cmd_t *cmd, redisReply *reply);


typedef struct {
    ngx_str_t                   name;
    ngx_str_t                   body;
    ngx_uint_t                  reply_width;  /* elements per batch item */
    u_char                      sha1[41];
} ngx_http_credits_script_t;


/*
 * One command in flight; the handler runs exactly once, with a NULL reply
 * when the command may not have run: the connection was lost (it may have
 * run), or Redis (a node, or the cluster) was unavailable within timeout=.
 */
struct ngx_http_credits_redis_cmd_s {
    ngx_http_credits_redis_handler_pt   handler;
    void                               *data;    /* NULL: caller is gone */
    ngx_http_credits_script_t          *script;
    ngx_msec_t                          start;
    ngx_int_t                           slot;    /* of its key, -1: none */
    ngx_uint_t                          hops;    /* redirections, loads */
    ngx_uint_t                          tries;   /* pauses */
    ngx_http_credits_node_t            *node;    /* ASK target, or NULL */
    ngx_event_t                         retry;
    unsigned                            asking:1;
    u_char                             *formatted;  /* the protocol bytes */
    size_t                              formatted_len;
};


typedef struct ngx_http_credits_batch_s       ngx_http_credits_batch_t;
typedef struct ngx_http_credits_batch_item_s  ngx_http_credits_batch_item_t;

typedef void (*ngx_http_credits_batch_handler_pt)(
    ngx_http_credits_batch_item_t *item, redisReply *reply);


/* one hold or settle in a batch; the handler runs exactly once, with the
 * item's element of the reply (NULL when the connection was lost) */
struct ngx_http_credits_batch_item_s {
    ngx_http_credits_batch_item_t      *next;
    ngx_http_credits_batch_t           *batch;
    ngx_http_credits_batch_handler_pt   handler;
    void                               *data;    /* NULL: caller is gone */
    ngx_msec_t                          start;
    ngx_uint_t                          nargs;
    ngx_str_t                          *args;    /* copies, after the item */
};


#define NGX_HTTP_CREDITS_SSE_KEPT     1
#define NGX_HTTP_CREDITS_SSE_DROPPED  2

/* the cost events of a text/event-stream response (ngx_http_credits_sse.c) */
typedef struct {
    ngx_str_t                   name;         /* credits_cost_event */
    ngx_pool_t                 *pool;
    u_char                     *event;        /* the event being read */
    size_t                      len;
    size_t                      line;         /* where its last line starts */
    size_t                      data;         /* its data, in event */
    size_t                      data_len;
    ngx_uint_t                  data_lines;
    ngx_int_t                   cost;         /* the last cost reported */
    ngx_uint_t                  costs;        /* cost events read */
    ngx_uint_t                  bad;          /* ... without a usable cost */
    unsigned                    ended:2;      /* a CR ended an event: kept? */
    unsigned                    cr:1;
    unsigned                    empty:1;      /* at the start of a line */
    unsigned                    is_cost:1;
    unsigned                    passing:1;    /* too long to be a cost event */
} ngx_http_credits_sse_t;


/*
 * One per metered main request, kept in a pool cleanup so that it survives
 * internal redirects (which zero r->ctx).  The charge follows the metered
 * location in charge (lcf): the last one whose gate the request passed.
 * A response made anywhere else stood in for it and releases the hold.
 */
typedef struct {
    ngx_http_request_t             *request;
    ngx_http_credits_loc_conf_t    *lcf;          /* location in charge */
    ngx_http_upstream_t            *upstream;     /* r->upstream at its gate */
    ngx_http_credits_batch_item_t  *item;         /* hold or move in flight */
    ngx_http_credits_batch_item_t  *grow_item;    /* a stream's growth */
    ngx_http_credits_sse_t         *sse;          /* a stream's cost events */
    ngx_chain_t                    *free;         /* the stream's buffers */
    ngx_chain_t                    *busy;
    ngx_event_t                     wait;         /* hold timeout and resume */

    ngx_str_t                       project;
    ngx_str_t                       route;
    ngx_str_t                       hold_id;
    ngx_str_t                       member;       /* holds zset member */
    ngx_str_t                       moved;        /* member a move makes */
    ngx_str_t                       keys[3];      /* balance, holds, ledger */
    ngx_str_t                       token;        /* verified */
    ngx_str_t                       refs;         /* window counters */
    time_t                          ends[2];      /* visitor, budget window */
    ngx_int_t                       limit;        /* what a 429 says */
    time_t                          retry_at;     /* ... and its window end */

    ngx_int_t                       price;        /* at most this is charged */
    ngx_int_t                       amount;       /* credits held */
    ngx_int_t                       grow_to;      /* amount a growth asks */
    ngx_int_t                       balance;
    ngx_int_t                       charged;
    ngx_uint_t                      status;
    ngx_http_credits_outcome_e      outcome;
    ngx_int_t                       rc;           /* to return on resume */

    unsigned                        waiting:1;
    unsigned                        answered:1;   /* verdict given once */
    unsigned                        held:1;
    unsigned                        header_seen:1;
    unsigned                        stand_in:1;   /* another location answered */
    unsigned                        left:1;       /* redirected out of lcf */
    unsigned                        accel:1;      /* ... by X-Accel-Redirect */
    unsigned                        cost_read:1;
    unsigned                        decided:1;
    unsigned                        settled:1;
    unsigned                        growing:1;    /* "moved" may be the hold */
    unsigned                        stream_done:1;
    unsigned                        over_visitor:1;  /* else the budget */
} ngx_http_credits_ctx_t;


extern ngx_module_t  ngx_http_credits_module;


/* configuration */
void *ngx_http_credits_create_main_conf(ngx_conf_t *cf);
char *ngx_http_credits_init_main_conf(ngx_conf_t *cf, void *conf);
void *ngx_http_credits_create_loc_conf(ngx_conf_t *cf);
char *ngx_http_credits_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
char *ngx_http_credits_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_http_credits_price_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_credits_step_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_credits_cost_event_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_credits_key_file(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_credits_algorithms(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

/* access phase: the gate, its answers, the request's context */
ngx_int_t ngx_http_credits_access_init(ngx_conf_t *cf);
ngx_http_credits_ctx_t *ngx_http_credits_get_ctx(ngx_http_request_t *r);

/* the module's own answers: 401, 402, 429, 503 */
ngx_int_t ngx_http_credits_verdict(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx);

/* variables */
ngx_int_t ngx_http_credits_add_variables(ngx_conf_t *cf);

/* visitors and budgets: window counters of a hold */
char *ngx_http_credits_limit_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_credits_merge_limits(ngx_conf_t *cf,
    ngx_http_credits_loc_conf_t *prev, ngx_http_credits_loc_conf_t *conf);
ngx_int_t ngx_http_credits_counters(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_http_credits_loc_conf_t *lcf);
ngx_int_t ngx_http_credits_counter_limits(ngx_http_request_t *r,
    ngx_http_credits_loc_conf_t *lcf, ngx_str_t *limits);
ngx_int_t ngx_http_credits_counter_args(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_http_credits_loc_conf_t *lcf,
    ngx_str_t *base, ngx_str_t *args);
void ngx_http_credits_limited(ngx_http_credits_ctx_t *ctx, ngx_int_t code,
    ngx_int_t limit);
time_t ngx_http_credits_window_left(ngx_http_credits_ctx_t *ctx);

/* numbers */
ngx_int_t ngx_http_credits_parse_amount(u_char *p, size_t len);
u_char *ngx_http_credits_write_int(u_char *p, ngx_int_t n);
uint32_t ngx_http_credits_hash(u_char *data, size_t len);

/* the visitors' keyed hash */
void ngx_http_credits_siphash(const u_char *key, ngx_str_t *parts,
    ngx_uint_t n, u_char *out);

/* jwt */
char *ngx_http_credits_jwt_load_key(ngx_conf_t *cf,
    ngx_http_credits_jwt_conf_t *jcf, ngx_str_t *file);
char *ngx_http_credits_jwt_parse_algorithms(ngx_conf_t *cf,
    ngx_http_credits_jwt_conf_t *jcf, ngx_str_t *names, ngx_uint_t n);
char *ngx_http_credits_jwt_check_conf(ngx_conf_t *cf,
    ngx_http_credits_jwt_conf_t *jcf);
ngx_int_t ngx_http_credits_jwt_check(ngx_http_credits_jwt_conf_t *jcf,
    ngx_str_t *token, time_t now, ngx_pool_t *pool, ngx_str_t *project,
    const char **reason);
ngx_int_t ngx_http_credits_jwt_verify(ngx_http_credits_jwt_conf_t *jcf,
    ngx_str_t *token, time_t now, ngx_pool_t *pool, ngx_str_t *project,
    double *exp, const char **reason);

ngx_int_t ngx_http_credits_jwt_decode_json(ngx_str_t *segment,
    ngx_pool_t *pool, struct json_t **json);

/* verified-token cache */
ngx_int_t ngx_http_credits_jwt_cache_get(ngx_http_credits_jwt_conf_t *jcf,
    ngx_str_t *token, time_t now, ngx_pool_t *pool, ngx_str_t *project);
void ngx_http_credits_jwt_cache_put(ngx_http_credits_jwt_conf_t *jcf,
    ngx_str_t *token, time_t now, double exp, ngx_str_t *project);

/* replies of a node's redisReader in a pool of its own */
redisReader *ngx_http_credits_reply_reader(ngx_log_t *log);
void ngx_http_credits_reply_reader_free(redisReader *reader);
void ngx_http_credits_reply_free(void *reply);

/* redis configuration: addresses, TLS, names */
char *ngx_http_credits_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
void ngx_http_credits_redis_create_conf(ngx_http_credits_redis_conf_t *rc);
char *ngx_http_credits_redis_init_conf(ngx_conf_t *cf,
    ngx_http_credits_redis_conf_t *rc);
ngx_int_t ngx_http_credits_redis_postconf(ngx_conf_t *cf,
    ngx_http_credits_redis_conf_t *rc);

/* redis router: the nodes, the cluster's slot map, redirections */
ngx_int_t ngx_http_credits_redis_init(ngx_cycle_t *cycle,
    ngx_http_credits_redis_conf_t *conf);
void ngx_http_credits_redis_exit(void);
ngx_int_t ngx_http_credits_redis_command(ngx_str_t *key,
    ngx_http_credits_script_t *script, int argc, const char **argv,
    const size_t *argvlen, ngx_http_credits_redis_handler_pt handler,
    void *data);
ngx_uint_t ngx_http_credits_redis_state(void);
void ngx_http_credits_redis_hurry(void);
ngx_uint_t ngx_http_credits_key_slot(u_char *key, size_t len);
void ngx_http_credits_router_reply(ngx_http_credits_node_t *node,
    ngx_http_credits_redis_cmd_t *cmd, redisReply *reply, ngx_uint_t sent);
void ngx_http_credits_router_probed(ngx_http_credits_node_t *node,
    redisReply *reply);
void ngx_http_credits_router_node_changed(ngx_http_credits_node_t *node);
void ngx_http_credits_router_node_lost(ngx_http_credits_node_t *node,
    ngx_uint_t was_up);

/* redis node connection */
ngx_http_credits_node_t *ngx_http_credits_node_create(
    ngx_http_credits_redis_addr_t *addr, ngx_http_credits_redis_conf_t *conf,
    ngx_log_t *log);
void ngx_http_credits_node_free(ngx_http_credits_node_t *node);
void ngx_http_credits_node_keep(ngx_http_credits_node_t *node, ngx_uint_t on,
    ngx_uint_t probe);
void ngx_http_credits_node_role(ngx_http_credits_node_t *node,
    ngx_uint_t role, ngx_http_credits_node_reply_pt push, void *data);
void ngx_http_credits_node_drop(ngx_http_credits_node_t *node,
    const char *why);
ngx_uint_t ngx_http_credits_node_connect(ngx_http_credits_node_t *node);
ngx_uint_t ngx_http_credits_node_state(ngx_http_credits_node_t *node);
ngx_uint_t ngx_http_credits_node_reconnects(ngx_http_credits_node_t *node);
ngx_http_credits_redis_addr_t *ngx_http_credits_node_addr(
    ngx_http_credits_node_t *node);
void ngx_http_credits_node_hurry(ngx_http_credits_node_t *node);
ngx_int_t ngx_http_credits_node_send(ngx_http_credits_node_t *node,
    ngx_http_credits_redis_cmd_t *cmd);
ngx_int_t ngx_http_credits_node_internal(ngx_http_credits_node_t *node,
    int argc, const char **argv, const size_t *argvlen,
    ngx_http_credits_node_reply_pt fn, void *privdata);
ngx_int_t ngx_http_credits_node_load(ngx_http_credits_node_t *node,
    ngx_http_credits_script_t *script);
const char *ngx_http_credits_reply_error(redisReply *reply, ngx_str_t *err);

/* batches of one project's holds or settles */
ngx_http_credits_batch_item_t *ngx_http_credits_batch_add(
    ngx_http_credits_script_t *script, ngx_str_t *keys, ngx_str_t *args,
    ngx_uint_t nargs, ngx_http_credits_batch_handler_pt handler, void *data);
void ngx_http_credits_batch_flush(void);
redisReply *ngx_http_credits_batch_element(redisReply *reply, ngx_uint_t n,
    ngx_uint_t i, ngx_uint_t width, redisReply *view);
ngx_str_t *ngx_http_credits_batch_keys(ngx_http_credits_batch_item_t *item);

/* hold: placing and moving */
extern ngx_http_credits_script_t  *ngx_http_credits_scripts[];
ngx_int_t ngx_http_credits_hold_init(ngx_cycle_t *cycle);
ngx_int_t ngx_http_credits_hold(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_http_credits_loc_conf_t *lcf);
ngx_int_t ngx_http_credits_move(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_http_credits_loc_conf_t *lcf);
extern ngx_http_credits_script_t   ngx_http_credits_move_script;
ngx_int_t ngx_http_credits_member(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_int_t amount, ngx_str_t *member);
ngx_int_t ngx_http_credits_hold_reply(redisReply *reply, ngx_int_t *balance);

/* settle */
extern ngx_http_credits_script_t   ngx_http_credits_settle_script;
ngx_int_t ngx_http_credits_settle_init(ngx_cycle_t *cycle, ngx_msec_t timeout);
void ngx_http_credits_decide(ngx_http_credits_ctx_t *ctx);
void ngx_http_credits_settle(ngx_http_credits_ctx_t *ctx);
void ngx_http_credits_drop(ngx_http_credits_ctx_t *ctx, ngx_uint_t status);
void ngx_http_credits_release(ngx_str_t *keys, ngx_str_t *member,
    ngx_uint_t status);
ngx_int_t ngx_http_credits_settle_reply(redisReply *reply);

/* runtime prices */
ngx_int_t ngx_http_credits_prices_init(ngx_cycle_t *cycle,
    ngx_http_credits_main_conf_t *cmcf);
ngx_int_t ngx_http_credits_price_override(ngx_str_t *route, ngx_uint_t hash);
ngx_array_t *ngx_http_credits_prices_parse(redisReply *reply,
    ngx_pool_t *pool);

/* cost events of a stream */
void ngx_http_credits_sse_init(ngx_http_credits_sse_t *sse, ngx_str_t *name,
    ngx_pool_t *pool);
u_char *ngx_http_credits_sse_parse(ngx_http_credits_sse_t *sse, u_char *p,
    u_char *last, u_char *out, ngx_uint_t last_buf);

/* streams */
ngx_int_t ngx_http_credits_stream_init(ngx_conf_t *cf);
ngx_int_t ngx_http_credits_stream_start(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx);

/* response filter */
ngx_int_t ngx_http_credits_filter_init(ngx_conf_t *cf);
ngx_table_elt_t *ngx_http_credits_add_header(ngx_http_request_t *r,
    char *name, ngx_str_t *value);

/* status */
ngx_int_t ngx_http_credits_status_init_zone(ngx_conf_t *cf,
    ngx_http_credits_main_conf_t *cmcf);
void ngx_http_credits_count_outcome(ngx_http_credits_outcome_e outcome);
void ngx_http_credits_count_credits(ngx_int_t held, ngx_int_t charged,
    ngx_int_t refunded);
void ngx_http_credits_count_latency(ngx_msec_t ms);
void ngx_http_credits_count_redis(ngx_uint_t up, ngx_uint_t reconnects);
char *ngx_http_credits_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
extern ngx_str_t  ngx_http_credits_outcome_names[];


#endif /* _NGX_HTTP_CREDITS_MODULE_H_INCLUDED_ */
