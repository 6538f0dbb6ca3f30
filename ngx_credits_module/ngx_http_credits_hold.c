
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Hold: the calls of the hold and move scripts and what their replies
 * mean.  The money logic itself is atomic inside the scripts (lua/).
 *
 * Holds go to Redis in batches, one script call per project and event
 * loop iteration (ngx_http_credits_batch.c); each request's part of the
 * reply comes back to it here.
 *
 * A request waiting for its hold is parked in the access phase; the reply
 * (or the hold timeout) posts ctx->wait, whose handler runs the phases
 * again.  A request that is gone before the reply leaves a batch item
 * whose data is NULL: if that hold was placed after all, it is released
 * at once.  A reply lost with the connection leaves the hold unknown: it
 * is released once Redis is back (ngx_http_credits_settle.c).
 *
 * A request handed on (internal redirect, error_page, named location) to
 * another metered location of the same project moves its hold there: the
 * member then names the new route and, when the new price is higher,
 * holds that much (the move script takes the difference from the
 * balance).  One hold per request, never two.  A stream grows its hold
 * with the same move script (ngx_http_credits_stream.c).
 */


#include "ngx_http_credits_module.h"
#include "ngx_http_credits_lua.h"

#include <openssl/evp.h>
#include <openssl/rand.h>


#define NGX_HTTP_CREDITS_RANDOM_POOL  4096


static ngx_int_t ngx_http_credits_hold_keys(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx);
static ngx_http_variable_value_t *ngx_http_credits_request_id(
    ngx_http_request_t *r, ngx_int_t index);
static ngx_int_t ngx_http_credits_hold_send(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_http_credits_script_t *script,
    ngx_str_t *args, ngx_uint_t nargs,
    ngx_http_credits_batch_handler_pt handler);
static void ngx_http_credits_hold_handler(ngx_http_credits_batch_item_t *item,
    redisReply *reply);
static void ngx_http_credits_move_handler(ngx_http_credits_batch_item_t *item,
    redisReply *reply);
static void ngx_http_credits_hold_answered(ngx_http_credits_ctx_t *ctx,
    ngx_http_credits_batch_item_t *item);
static void ngx_http_credits_hold_failed(ngx_http_credits_ctx_t *ctx,
    ngx_log_t *log, const char *what, ngx_str_t *err);
static void ngx_http_credits_hold_error(ngx_http_credits_ctx_t *ctx,
    const char *what, redisReply *reply);
static void ngx_http_credits_hold_orphan(ngx_http_credits_batch_item_t *item,
    redisReply *reply, ngx_str_t *member);
static void ngx_http_credits_wait_handler(ngx_event_t *ev);
static ngx_int_t ngx_http_credits_script_init(ngx_http_credits_script_t *s);


static ngx_http_credits_script_t  ngx_http_credits_hold_script = {
    ngx_string("hold"),
    { sizeof(ngx_http_credits_hold_lua) - 1,
      (u_char *) ngx_http_credits_hold_lua },
    2,
    ""
};

ngx_http_credits_script_t  ngx_http_credits_move_script = {
    ngx_string("move"),
    { sizeof(ngx_http_credits_move_lua) - 1,
      (u_char *) ngx_http_credits_move_lua },
    2,
    ""
};

ngx_http_credits_script_t  *ngx_http_credits_scripts[] = {
    &ngx_http_credits_hold_script,
    &ngx_http_credits_settle_script,
    &ngx_http_credits_move_script,
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
    u_char     ttl[NGX_INT_T_LEN], price[NGX_INT_T_LEN];
    ngx_int_t  n;
    ngx_str_t  args[4 + 4 * 2], base;

    static u_char  counted[] = "012";

    if (ngx_http_credits_hold_keys(r, ctx) != NGX_OK
        || ngx_http_credits_member(r, ctx, ctx->price, &ctx->member) != NGX_OK)
    {
        ctx->rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
        return NGX_OK;
    }

    /* "credits:{P}:", where the project's counters are */

    base.data = ctx->keys[0].data;
    base.len = ctx->keys[0].len - (sizeof("balance") - 1);

    n = ngx_http_credits_counter_args(r, ctx, lcf, &base, &args[4]);
    if (n == NGX_ERROR) {
        ctx->rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
        return NGX_OK;
    }

    /* member, price, ttl, N, and N counters (lua/hold.lua) */

    args[0] = ctx->member;
    args[1].data = price;
    args[1].len = ngx_http_credits_write_int(price, ctx->price) - price;
    args[2].data = ttl;
    args[2].len = ngx_http_credits_write_int(ttl, (ngx_int_t) lcf->hold_ttl)
                  - ttl;
    args[3].data = &counted[n];
    args[3].len = 1;

    ctx->amount = ctx->price;

    return ngx_http_credits_hold_send(r, ctx, &ngx_http_credits_hold_script,
                                      args, 4 + 4 * n,
                                      ngx_http_credits_hold_handler);
}


/*
 * The request is in another metered location of the held project: the
 * hold takes that location's route, and grows to its price when that is
 * higher.  NGX_DECLINED: nothing to change.
 */

ngx_int_t
ngx_http_credits_move(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx,
    ngx_http_credits_loc_conf_t *lcf)
{
    u_char     ttl[NGX_INT_T_LEN];
    ngx_int_t  amount;
    ngx_str_t  args[4];

    amount = ngx_max(ctx->amount, ctx->price);

    if (ngx_http_credits_member(r, ctx, amount, &ctx->moved) != NGX_OK) {
        ctx->rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
        return NGX_OK;
    }

    if (ctx->moved.len == ctx->member.len
        && ngx_memcmp(ctx->moved.data, ctx->member.data, ctx->member.len) == 0)
    {
        return NGX_DECLINED;
    }

    /* old member, new member, ttl, limits of the new member's counters */

    args[0] = ctx->member;
    args[1] = ctx->moved;
    args[2].data = ttl;
    args[2].len = ngx_http_credits_write_int(ttl, (ngx_int_t) lcf->hold_ttl)
                  - ttl;
    if (ngx_http_credits_counter_limits(r, lcf, &args[3]) != NGX_OK) {
        ctx->rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
        return NGX_OK;
    }

    return ngx_http_credits_hold_send(r, ctx, &ngx_http_credits_move_script,
                                      args, 4, ngx_http_credits_move_handler);
}


static ngx_int_t
ngx_http_credits_hold_send(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx,
    ngx_http_credits_script_t *script, ngx_str_t *args, ngx_uint_t nargs,
    ngx_http_credits_batch_handler_pt handler)
{
    ngx_http_credits_main_conf_t  *cmcf;

    ctx->item = ngx_http_credits_batch_add(script, ctx->keys, args, nargs,
                                           handler, ctx);

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


/* keys "credits:{P}:balance", "credits:{P}:holds", "credits:{P}:ledger" */

static ngx_int_t
ngx_http_credits_hold_keys(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx)
{
    u_char                        *p;
    size_t                         len;
    ngx_uint_t                     i;
    ngx_http_credits_main_conf_t  *cmcf;

    cmcf = ngx_http_get_module_main_conf(r, ngx_http_credits_module);

    len = 0;

    for (i = 0; i < 3; i++) {
        len += cmcf->prefix.len + 1 + ctx->project.len
               + ngx_http_credits_key_suffix[i].len;
    }

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

    return NGX_OK;
}


/*
 * The member "<hold id><refs>:<amount>:<route>"; the hold id is
 * $request_id, the refs name the hold's window counters, if any
 * (ngx_http_credits_visitors.c).
 */

ngx_int_t
ngx_http_credits_member(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx,
    ngx_int_t amount, ngx_str_t *member)
{
    u_char                        *p;
    ngx_http_variable_value_t     *id;
    ngx_http_credits_main_conf_t  *cmcf;

    if (ctx->hold_id.len == 0) {
        cmcf = ngx_http_get_module_main_conf(r, ngx_http_credits_module);

        id = ngx_http_credits_request_id(r, cmcf->request_id_index);
        if (id == NULL || id->not_found || id->len == 0) {
            return NGX_ERROR;
        }

        ctx->hold_id.data = id->data;
        ctx->hold_id.len = id->len;
    }

    p = ngx_pnalloc(r->pool, ctx->hold_id.len + ctx->refs.len + 1
                             + NGX_INT_T_LEN + 1 + ctx->route.len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    member->data = p;
    p = ngx_cpymem(p, ctx->hold_id.data, ctx->hold_id.len);

    if (ctx->refs.len) {
        /* the window counters the hold is in, when it is in any */
        p = ngx_cpymem(p, ctx->refs.data, ctx->refs.len);
    }

    *p++ = ':';
    p = ngx_http_credits_write_int(p, amount);
    *p++ = ':';
    p = ngx_cpymem(p, ctx->route.data, ctx->route.len);
    member->len = p - member->data;

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
 * A hold's (or a move's) part of the batch's reply, seen as an array:
 * {1, balance}: placed; {0, balance}: too low (a balance may be negative:
 * a chargeback or correction); {2 or 3, limit}: a visitor's limit or the
 * budget reached (NGX_HTTP_CREDITS_OVER_*, returned as they are);
 * anything else, such as {-1, balance} (a hold with that id exists, or
 * the hold to move is gone), is an error
 */

ngx_int_t
ngx_http_credits_hold_reply(redisReply *reply, ngx_int_t *balance)
{
    if (reply == NULL
        || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != 2
        || reply->element[0]->type != REDIS_REPLY_INTEGER
        || reply->element[1]->type != REDIS_REPLY_INTEGER
        || reply->element[0]->integer < 0
        || reply->element[0]->integer > NGX_HTTP_CREDITS_OVER_BUDGET)
    {
        return NGX_ERROR;
    }

    *balance = (ngx_int_t) reply->element[1]->integer;

    switch (reply->element[0]->integer) {
    case 0:
        return NGX_DECLINED;
    case 1:
        return NGX_OK;
    default:
        return (ngx_int_t) reply->element[0]->integer;
    }
}


static void
ngx_http_credits_hold_handler(ngx_http_credits_batch_item_t *item,
    redisReply *reply)
{
    ngx_int_t                rc, balance;
    ngx_http_credits_ctx_t  *ctx = item->data;

    if (ctx == NULL) {
        ngx_http_credits_hold_orphan(item, reply, &item->args[0]);
        return;
    }

    ngx_http_credits_hold_answered(ctx, item);

    rc = ngx_http_credits_hold_reply(reply, &balance);

    switch (rc) {

    case NGX_OK:
        ctx->held = 1;
        ctx->balance = balance;
        ctx->rc = NGX_DECLINED;
        ngx_http_credits_count_credits(ctx->amount, 0, 0);
        break;

    case NGX_DECLINED:
        ctx->balance = balance;
        ctx->outcome = NGX_HTTP_CREDITS_INSUFFICIENT;
        ctx->rc = NGX_HTTP_CREDITS_PAYMENT_REQUIRED;
        ngx_http_credits_count_outcome(ctx->outcome);
        break;

    case NGX_HTTP_CREDITS_OVER_VISITOR:
    case NGX_HTTP_CREDITS_OVER_BUDGET:
        ngx_http_credits_limited(ctx, rc, balance);
        break;

    default:
        if (reply == NULL) {
            /* the hold may have been placed before the connection went */
            ngx_http_credits_release(ctx->keys, &ctx->member, 0);
        }

        ngx_http_credits_hold_error(ctx, "hold failed", reply);
    }
}


static void
ngx_http_credits_move_handler(ngx_http_credits_batch_item_t *item,
    redisReply *reply)
{
    ngx_int_t                rc, balance, grown;
    ngx_http_credits_ctx_t  *ctx = item->data;

    if (ctx == NULL) {
        ngx_http_credits_hold_orphan(item, reply, &item->args[1]);
        return;
    }

    ngx_http_credits_hold_answered(ctx, item);

    rc = ngx_http_credits_hold_reply(reply, &balance);

    switch (rc) {

    case NGX_OK:
        grown = ngx_max(ctx->amount, ctx->price) - ctx->amount;
        ctx->member = ctx->moved;
        ctx->amount += grown;
        ctx->balance = balance;
        ctx->rc = NGX_DECLINED;
        ngx_http_credits_count_credits(grown, 0, 0);
        break;

    case NGX_DECLINED:
        /* the hold stays as it was; the 402 releases it */
        ctx->balance = balance;
        ctx->rc = NGX_HTTP_CREDITS_PAYMENT_REQUIRED;
        ngx_http_credits_count_outcome(NGX_HTTP_CREDITS_INSUFFICIENT);
        break;

    case NGX_HTTP_CREDITS_OVER_VISITOR:
    case NGX_HTTP_CREDITS_OVER_BUDGET:
        /* as for a 402: the hold stays as it was, the 429 releases it */
        ngx_http_credits_limited(ctx, rc, balance);
        break;

    default:
        /* the old hold is released, and the new one in case it was made */
        if (reply == NULL) {
            ngx_http_credits_release(ctx->keys, &ctx->moved, 0);
        }

        ngx_http_credits_drop(ctx, NGX_HTTP_SERVICE_UNAVAILABLE);

        ngx_http_credits_hold_error(ctx, "moving the hold failed", reply);
    }
}


static void
ngx_http_credits_hold_answered(ngx_http_credits_ctx_t *ctx,
    ngx_http_credits_batch_item_t *item)
{
    ctx->item = NULL;
    ctx->waiting = 0;

    ngx_http_credits_count_latency(ngx_current_msec - item->start);

    if (ctx->wait.timer_set) {
        ngx_del_timer(&ctx->wait);
    }

    ngx_post_event(&ctx->wait, &ngx_posted_events);
}


static void
ngx_http_credits_hold_error(ngx_http_credits_ctx_t *ctx, const char *what,
    redisReply *reply)
{
    ngx_str_t  err;

    ngx_http_credits_reply_error(reply, &err);
    ngx_http_credits_hold_failed(ctx, ctx->wait.log, what, &err);
}


static void
ngx_http_credits_hold_failed(ngx_http_credits_ctx_t *ctx, ngx_log_t *log,
    const char *what, ngx_str_t *err)
{
    ngx_uint_t  open;
    ngx_str_t   none = ngx_null_string;

    open = (ctx->lcf->fail == NGX_HTTP_CREDITS_ON_FAIL_OPEN);

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


/*
 * The request timed out or is gone: a hold its script made (placed, or
 * moved to "member") is released at once; when the reply was lost with
 * the connection, once Redis is back.
 */

static void
ngx_http_credits_hold_orphan(ngx_http_credits_batch_item_t *item,
    redisReply *reply, ngx_str_t *member)
{
    ngx_int_t  balance;

    if (reply == NULL
        || ngx_http_credits_hold_reply(reply, &balance) == NGX_OK)
    {
        ngx_http_credits_release(ngx_http_credits_batch_keys(item), member, 0);
    }
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

        if (ctx->held) {
            /* a move timed out: the hold it started from goes */
            ngx_http_credits_drop(ctx, NGX_HTTP_SERVICE_UNAVAILABLE);
        }

        ngx_http_credits_hold_failed(ctx, c->log, "hold timed out", NULL);
    }

    ngx_http_set_log_request(c->log, r);

    r->write_event_handler(r);

    ngx_http_run_posted_requests(c);
}
