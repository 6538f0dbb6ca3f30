
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Hold and settle: the calls of the Redis scripts and what their replies
 * mean.  The money logic itself is atomic inside the scripts (lua/).
 *
 * Holds and settles go to Redis in batches, one script call per project
 * and event loop iteration (ngx_http_credits_batch.c); each request's part
 * of the reply comes back to it here.
 *
 * A request waiting for its hold is parked in the access phase; the reply
 * (or the hold timeout) posts ctx->wait, whose handler runs the phases
 * again.  A request that is gone before the reply leaves a batch item
 * whose data is NULL: if that hold was placed after all, it is released at
 * once.  The settle is sent from the request pool's cleanup, exactly once;
 * the batch keeps copies of everything it needs.
 */


#include "ngx_http_credits_module.h"
#include "ngx_http_credits_lua.h"

#include <openssl/evp.h>
#include <openssl/rand.h>


#define NGX_HTTP_CREDITS_KEY_BALANCE  0
#define NGX_HTTP_CREDITS_KEY_HOLDS    1
#define NGX_HTTP_CREDITS_KEY_LEDGER   2

#define NGX_HTTP_CREDITS_RANDOM_POOL  4096


static ngx_int_t ngx_http_credits_hold_args(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx);
static ngx_http_variable_value_t *ngx_http_credits_request_id(
    ngx_http_request_t *r, ngx_int_t index);
static void ngx_http_credits_hold_handler(ngx_http_credits_batch_item_t *item,
    redisReply *reply);
static void ngx_http_credits_hold_failed(ngx_http_credits_ctx_t *ctx,
    ngx_log_t *log, const char *what, ngx_str_t *err);
static void ngx_http_credits_release_orphan(
    ngx_http_credits_batch_item_t *item);
static void ngx_http_credits_wait_handler(ngx_event_t *ev);
static ngx_int_t ngx_http_credits_send_settle(ngx_str_t *keys,
    ngx_str_t *member, ngx_int_t charged, ngx_uint_t status,
    const char *outcome);
static void ngx_http_credits_settle_handler(
    ngx_http_credits_batch_item_t *item, redisReply *reply);
static ngx_int_t ngx_http_credits_script_init(ngx_http_credits_script_t *s);


static ngx_http_credits_script_t  ngx_http_credits_hold_script = {
    ngx_string("hold"),
    { sizeof(ngx_http_credits_hold_lua) - 1,
      (u_char *) ngx_http_credits_hold_lua },
    2,
    ""
};

static ngx_http_credits_script_t  ngx_http_credits_settle_script = {
    ngx_string("settle"),
    { sizeof(ngx_http_credits_settle_lua) - 1,
      (u_char *) ngx_http_credits_settle_lua },
    1,
    ""
};

ngx_http_credits_script_t  *ngx_http_credits_scripts[] = {
    &ngx_http_credits_hold_script,
    &ngx_http_credits_settle_script,
    NULL
};


static ngx_str_t  ngx_http_credits_key_suffix[] = {
    ngx_string("}:balance"),
    ngx_string("}:holds"),
    ngx_string("}:ledger")
};


ngx_int_t
ngx_http_credits_hold_init(ngx_cycle_t *cycle)
{
    ngx_http_credits_script_t  **s;

    for (s = ngx_http_credits_scripts; *s; s++) {
        if (ngx_http_credits_script_init(*s) != NGX_OK) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                          "credits: cannot hash the %V script", &(*s)->name);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* EVALSHA needs the script's SHA1, known without asking Redis */

static ngx_int_t
ngx_http_credits_script_init(ngx_http_credits_script_t *s)
{
    u_char        md[EVP_MAX_MD_SIZE];
    unsigned int  n;

    if (EVP_Digest(s->body.data, s->body.len, md, &n, EVP_sha1(), NULL) != 1) {
        return NGX_ERROR;
    }

    ngx_hex_dump(s->sha1, md, n);
    s->sha1[40] = '\0';

    return NGX_OK;
}


ngx_int_t
ngx_http_credits_hold(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx,
    ngx_http_credits_loc_conf_t *lcf)
{
    u_char                        ttl[NGX_INT_T_LEN], price[NGX_INT_T_LEN];
    ngx_str_t                     args[3];
    ngx_http_credits_main_conf_t *cmcf;

    if (ngx_http_credits_hold_args(r, ctx) != NGX_OK) {
        ctx->rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
        return NGX_OK;
    }

    /* member, price, ttl */

    args[0] = ctx->member;
    args[1].data = price;
    args[1].len = ngx_http_credits_write_int(price, ctx->price) - price;
    args[2].data = ttl;
    args[2].len = ngx_http_credits_write_int(ttl, (ngx_int_t) lcf->hold_ttl)
                  - ttl;

    ctx->item = ngx_http_credits_batch_add(&ngx_http_credits_hold_script,
                                           ctx->keys, args, 3,
                                           ngx_http_credits_hold_handler, ctx);

    if (ctx->item == NULL) {
        ngx_http_credits_hold_failed(ctx, r->connection->log,
                                     "redis not connected", NULL);
        return NGX_OK;
    }

    cmcf = ngx_http_get_module_main_conf(r, ngx_http_credits_module);

    ctx->waiting = 1;
    ctx->wait.handler = ngx_http_credits_wait_handler;
    ctx->wait.data = ctx;
    ctx->wait.log = r->connection->log;

    ngx_add_timer(&ctx->wait, cmcf->redis.timeout);

    return NGX_AGAIN;
}


/* keys "credits:{P}:balance" etc., and the member "<id>:<price>:<route>" */

static ngx_int_t
ngx_http_credits_hold_args(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx)
{
    u_char                        *p;
    size_t                         len;
    ngx_uint_t                     i;
    ngx_http_variable_value_t     *id;
    ngx_http_credits_main_conf_t  *cmcf;

    cmcf = ngx_http_get_module_main_conf(r, ngx_http_credits_module);

    id = ngx_http_credits_request_id(r, cmcf->request_id_index);
    if (id == NULL || id->not_found || id->len == 0) {
        return NGX_ERROR;
    }

    ctx->hold_id.data = id->data;
    ctx->hold_id.len = id->len;

    len = 0;

    for (i = 0; i < 3; i++) {
        len += cmcf->prefix.len + 1 + ctx->project.len
               + ngx_http_credits_key_suffix[i].len;
    }

    len += id->len + 1 + NGX_INT_T_LEN + 1 + ctx->route.len;

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < 3; i++) {
        ctx->keys[i].data = p;
        p = ngx_cpymem(p, cmcf->prefix.data, cmcf->prefix.len);
        *p++ = '{';
        p = ngx_cpymem(p, ctx->project.data, ctx->project.len);
        p = ngx_cpymem(p, ngx_http_credits_key_suffix[i].data,
                       ngx_http_credits_key_suffix[i].len);
        ctx->keys[i].len = p - ctx->keys[i].data;
    }

    ctx->member.data = p;
    /* "hold_id:price:route" */
    p = ngx_cpymem(p, ctx->hold_id.data, ctx->hold_id.len);
    *p++ = ':';
    p = ngx_http_credits_write_int(p, ctx->price);
    *p++ = ':';
    p = ngx_cpymem(p, ctx->route.data, ctx->route.len);
    ctx->member.len = p - ctx->member.data;

    return NGX_OK;
}


/*
 * The hold id is the request's $request_id.  nginx draws that with one
 * RAND_bytes() call per request, which costs OpenSSL 3 more than the rest
 * of the hold (a lock, a fork check, parameter lookups).  The same 16
 * random bytes from the same generator are drawn here from a per-worker
 * buffer refilled 4 KB at a time, and become the request's $request_id, so
 * the access log and the ledger agree.  A value already evaluated (by
 * "set" in the rewrite phase, say) is kept.
 */

static ngx_http_variable_value_t *
ngx_http_credits_request_id(ngx_http_request_t *r, ngx_int_t index)
{
    u_char                     *id;
    ngx_http_variable_value_t  *v;

    static u_char     random[NGX_HTTP_CREDITS_RANDOM_POOL];
    static size_t     left;
    static ngx_pid_t  owner;

    v = &r->variables[index];

    if (v->valid || v->not_found) {
        return ngx_http_get_indexed_variable(r, index);
    }

    /* a buffer filled before a fork must not serve two processes */
    if (left < 16 || owner != ngx_pid) {
        if (RAND_bytes(random, sizeof(random)) != 1) {
            left = 0;
            return ngx_http_get_indexed_variable(r, index);
        }

        left = sizeof(random);
        owner = ngx_pid;
    }

    id = ngx_pnalloc(r->pool, 32);
    if (id == NULL) {
        return NULL;
    }

    left -= 16;
    ngx_hex_dump(id, random + left, 16);

    /* used bytes do not stay in memory */
    ngx_memzero(random + left, 16);

    v->len = 32;
    v->data = id;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return v;
}


/*
 * A hold's part of the batch's reply, seen as an array:
 * {1, balance}: placed; {0, balance}: too low; anything else, such as
 * {-1, balance} (a hold with that id exists), is an error
 */

ngx_int_t
ngx_http_credits_hold_reply(redisReply *reply, ngx_int_t *balance)
{
    if (reply == NULL
        || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != 2
        || reply->element[0]->type != REDIS_REPLY_INTEGER
        || reply->element[1]->type != REDIS_REPLY_INTEGER
        || reply->element[1]->integer < 0
        || (reply->element[0]->integer != 0
            && reply->element[0]->integer != 1))
    {
        return NGX_ERROR;
    }

    *balance = (ngx_int_t) reply->element[1]->integer;

    return reply->element[0]->integer ? NGX_OK : NGX_DECLINED;
}


static void
ngx_http_credits_hold_handler(ngx_http_credits_batch_item_t *item,
    redisReply *reply)
{
    ngx_int_t                rc, balance;
    ngx_str_t                err;
    ngx_http_credits_ctx_t  *ctx = item->data;

    rc = ngx_http_credits_hold_reply(reply, &balance);

    if (ctx == NULL) {
        /* the request timed out or is gone: undo a hold that was placed */
        if (rc == NGX_OK) {
            ngx_http_credits_release_orphan(item);
        }

        return;
    }

    ctx->item = NULL;
    ctx->waiting = 0;

    ngx_http_credits_count_latency(ngx_current_msec - item->start);

    switch (rc) {

    case NGX_OK:
        ctx->held = 1;
        ctx->balance = balance;
        ctx->rc = NGX_DECLINED;
        ngx_http_credits_count_credits(ctx->price, 0, 0);
        break;

    case NGX_DECLINED:
        ctx->balance = balance;
        ctx->outcome = NGX_HTTP_CREDITS_INSUFFICIENT;
        ctx->rc = NGX_HTTP_CREDITS_PAYMENT_REQUIRED;
        ngx_http_credits_count_outcome(ctx->outcome);
        break;

    default:
        ngx_http_credits_reply_error(reply, &err);
        ngx_http_credits_hold_failed(ctx, ctx->wait.log, "hold failed", &err);
    }

    if (ctx->wait.timer_set) {
        ngx_del_timer(&ctx->wait);
    }

    ngx_post_event(&ctx->wait, &ngx_posted_events);
}


static void
ngx_http_credits_hold_failed(ngx_http_credits_ctx_t *ctx, ngx_log_t *log,
    const char *what, ngx_str_t *err)
{
    ngx_uint_t                    open;
    ngx_str_t                     none = ngx_null_string;
    ngx_http_credits_loc_conf_t  *lcf;

    lcf = ngx_http_get_module_loc_conf(ctx->request, ngx_http_credits_module);
    open = (lcf->fail == NGX_HTTP_CREDITS_ON_FAIL_OPEN);

    ngx_log_error(NGX_LOG_ERR, log, 0,
                  "credits: project \"%V\" route \"%V\": %s%s%V, %s",
                  &ctx->project, &ctx->route, what, err ? ": " : "",
                  err ? err : &none,
                  open ? "forwarding uncharged (credits_fail open)"
                       : "answering 503");

    ctx->outcome = open ? NGX_HTTP_CREDITS_FAIL_OPEN
                        : NGX_HTTP_CREDITS_REDIS_UNAVAILABLE;
    ctx->rc = open ? NGX_DECLINED : NGX_HTTP_SERVICE_UNAVAILABLE;

    ngx_http_credits_count_outcome(ctx->outcome);
}


static void
ngx_http_credits_wait_handler(ngx_event_t *ev)
{
    ngx_connection_t        *c;
    ngx_http_request_t      *r;
    ngx_http_credits_ctx_t  *ctx = ev->data;

    r = ctx->request;
    c = r->connection;

    if (ctx->waiting) {
        /* no reply in time: the item's reply, if any, finds no one */
        ctx->item->data = NULL;
        ctx->item = NULL;
        ctx->waiting = 0;

        ngx_http_credits_hold_failed(ctx, c->log, "hold timed out", NULL);
    }

    ngx_http_set_log_request(c->log, r);

    r->write_event_handler(r);

    ngx_http_run_posted_requests(c);
}


/* the item still carries the hold's keys and member: release it */

static void
ngx_http_credits_release_orphan(ngx_http_credits_batch_item_t *item)
{
    ngx_str_t  *member = &item->args[0];

    ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                  "credits: hold \"%V\" was placed after its request gave up "
                  "waiting: releasing it", member);

    if (ngx_http_credits_send_settle(ngx_http_credits_batch_keys(item),
                                     member, 0, 0, "release")
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "credits: cannot release hold \"%V\": it will expire",
                      member);
    }
}


/*
 * Commit when the final status is below 400; release on 400 and above,
 * on upstream errors (nginx answers 502/504) and when no response header
 * was sent (the client went away first).  Idempotent: the variables call
 * it at log time, the cleanup before it settles.
 */

void
ngx_http_credits_decide(ngx_http_credits_ctx_t *ctx)
{
    if (!ctx->held || ctx->decided) {
        return;
    }

    ctx->decided = 1;

    if (ctx->header_seen && ctx->status < 400) {
        ctx->outcome = NGX_HTTP_CREDITS_COMMITTED;

        if (!ctx->cost_read) {
            ctx->charged = ctx->price;
        }

    } else {
        ctx->outcome = NGX_HTTP_CREDITS_RELEASED;
        ctx->charged = 0;
    }
}


void
ngx_http_credits_settle(ngx_http_credits_ctx_t *ctx)
{
    ngx_uint_t  status;
    const char *outcome;

    ngx_http_credits_decide(ctx);

    ctx->settled = 1;

    outcome = (ctx->outcome == NGX_HTTP_CREDITS_COMMITTED) ? "commit"
                                                           : "release";

    status = ctx->header_seen ? ctx->status : 499;

    if (ngx_http_credits_send_settle(ctx->keys, &ctx->member, ctx->charged,
                                     status, outcome)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "credits: project \"%V\" route \"%V\": cannot %s hold "
                      "\"%V\" (redis not connected): it will expire and be "
                      "refunded", &ctx->project, &ctx->route, outcome,
                      &ctx->hold_id);
    }
}


static ngx_int_t
ngx_http_credits_send_settle(ngx_str_t *keys, ngx_str_t *member,
    ngx_int_t charged, ngx_uint_t status, const char *outcome)
{
    u_char     ch[NGX_INT_T_LEN], st[NGX_INT_T_LEN];
    ngx_str_t  args[4];

    /* member, charged, status, outcome */

    args[0] = *member;
    args[1].data = ch;
    args[1].len = ngx_http_credits_write_int(ch, charged) - ch;
    args[2].data = st;
    args[2].len = ngx_http_credits_write_int(st, (ngx_int_t) status) - st;
    args[3].data = (u_char *) outcome;
    args[3].len = ngx_strlen(outcome);

    if (ngx_http_credits_batch_add(&ngx_http_credits_settle_script, keys,
                                   args, 4, ngx_http_credits_settle_handler,
                                   NULL)
        == NULL)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/* 1: settled; 0: the hold was gone (expired and refunded, or settled) */

ngx_int_t
ngx_http_credits_settle_reply(redisReply *reply)
{
    if (reply == NULL || reply->type != REDIS_REPLY_INTEGER) {
        return NGX_ERROR;
    }

    switch (reply->integer) {
    case 1:
        return NGX_OK;
    case 0:
        return NGX_DECLINED;
    default:
        return NGX_ERROR;
    }
}


static void
ngx_http_credits_settle_handler(ngx_http_credits_batch_item_t *item,
    redisReply *reply)
{
    ngx_str_t   member, err, *outcome;
    ngx_int_t   rc, held, charged, commit;
    ngx_uint_t  level;
    u_char     *p, *last;

    /* member, charged, status, outcome */
    member = item->args[0];
    outcome = &item->args[3];
    commit = (outcome->data[0] == 'c');

    rc = ngx_http_credits_settle_reply(reply);

    if (rc == NGX_ERROR) {
        ngx_http_credits_reply_error(reply, &err);
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "credits: settle of hold \"%V\" failed: %V: it will "
                      "expire and be refunded", &member, &err);
        return;
    }

    if (rc == NGX_DECLINED) {
        level = commit ? NGX_LOG_WARN : NGX_LOG_INFO;

        ngx_log_error(level, ngx_cycle->log, 0,
                      "credits: hold \"%V\" had expired before its %V: "
                      "nothing charged", &member, outcome);
        ngx_http_credits_count_outcome(NGX_HTTP_CREDITS_EXPIRED);
        return;
    }

    /* the member is "<id>:<held>:<route>" */
    last = member.data + member.len;
    p = ngx_strlchr(member.data, last, ':');
    held = 0;

    if (p) {
        last = ngx_strlchr(p + 1, last, ':');
        held = last ? ngx_atoi(p + 1, last - p - 1) : 0;
    }

    charged = ngx_atoi(item->args[1].data, item->args[1].len);

    if (held < 0 || charged < 0 || charged > held) {
        return;
    }

    ngx_http_credits_count_outcome(commit ? NGX_HTTP_CREDITS_COMMITTED
                                          : NGX_HTTP_CREDITS_RELEASED);
    ngx_http_credits_count_credits(0, charged, held - charged);
}
