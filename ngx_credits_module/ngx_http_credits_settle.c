
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Settle: commit or release a request's hold, exactly once.
 *
 * The settle is sent from the request pool's cleanup; the batch keeps
 * copies of everything it needs.  A settle that cannot be sent, or whose
 * reply is lost with the connection, is kept and sent again once Redis is
 * back: the script is idempotent per hold (a hold settled already answers
 * 0 and changes nothing), so a resend never charges twice, and a commit is
 * not turned into an expiry refund by a dropped connection.  The same
 * queue releases holds whose placing reply was lost (ngx_http_credits_
 * release()): Redis may have placed them.
 *
 * A worker that is shutting down waits for the queue, at most the Redis
 * "timeout" once the connection is gone: the resend timer is not
 * cancelable while it has work, so nginx keeps the worker until then.
 */


#include "ngx_http_credits_module.h"
#include "ngx_http_credits_lua.h"


#define NGX_HTTP_CREDITS_RESEND_MAX       65536
#define NGX_HTTP_CREDITS_RESEND_INTERVAL  100


/* member, charged, status, outcome, and the member's id, held, route */
#define NGX_HTTP_CREDITS_SETTLE_ARGS      7


typedef struct {
    ngx_queue_t                 queue;
    ngx_str_t                   keys[3];
    ngx_str_t                   args[NGX_HTTP_CREDITS_SETTLE_ARGS];
} ngx_http_credits_unsent_t;


typedef struct {
    ngx_queue_t                 unsent;
    ngx_uint_t                  count;
    ngx_event_t                 timer;
    ngx_msec_t                  timeout;
    ngx_msec_t                  exiting_since;
} ngx_http_credits_resend_t;


static void ngx_http_credits_send_settle(ngx_str_t *keys, ngx_str_t *member,
    ngx_int_t charged, ngx_uint_t status, const char *outcome, void *data);
static ngx_int_t ngx_http_credits_member_parts(ngx_str_t *member,
    ngx_str_t *parts);
static ngx_int_t ngx_http_credits_settle_add(ngx_str_t *keys, ngx_str_t *args,
    void *data);
static void ngx_http_credits_settle_handler(
    ngx_http_credits_batch_item_t *item, redisReply *reply);
static void ngx_http_credits_settle_count(ngx_http_credits_batch_item_t *item);
static void ngx_http_credits_keep(ngx_str_t *keys, ngx_str_t *args);
static void ngx_http_credits_resend_handler(ngx_event_t *ev);
static void ngx_http_credits_resend_arm(void);


ngx_http_credits_script_t  ngx_http_credits_settle_script = {
    ngx_string("settle"),
    { sizeof(ngx_http_credits_settle_lua) - 1,
      (u_char *) ngx_http_credits_settle_lua },
    1,
    ""
};


static ngx_http_credits_resend_t  ngx_http_credits_resend;

/*
 * item->data of a settle sent again, or of the release of a hold that may
 * never have been placed: its "gone" answer is no expiry
 */
static u_char  ngx_http_credits_unsure;


ngx_int_t
ngx_http_credits_settle_init(ngx_cycle_t *cycle, ngx_msec_t timeout)
{
    ngx_http_credits_resend_t  *rs = &ngx_http_credits_resend;

    ngx_memzero(rs, sizeof(ngx_http_credits_resend_t));
    ngx_queue_init(&rs->unsent);

    rs->timeout = timeout;
    rs->timer.handler = ngx_http_credits_resend_handler;
    rs->timer.log = cycle->log;
    rs->timer.data = rs;

    return NGX_OK;
}


/*
 * Commit when the location in charge answered with a status below 400;
 * release on 400 and above, on upstream errors (nginx answers 502/504),
 * when another location stood in (error_page, a redirect to a page that
 * is not metered) and when no response header was sent (the client went
 * away first).  Called once the request is over: the log phase and the
 * settle, never by a variable (a variable read early would freeze an
 * outcome that the response has not decided yet).
 */

void
ngx_http_credits_decide(ngx_http_credits_ctx_t *ctx)
{
    ngx_int_t  held;

    if (!ctx->held || ctx->decided) {
        return;
    }

    ctx->decided = 1;

    if (ctx->header_seen && ctx->status < 400 && !ctx->stand_in) {
        ctx->outcome = NGX_HTTP_CREDITS_COMMITTED;

        if (ctx->sse && ctx->sse->cost >= 0) {
            /*
             * a stream: the last cost it reported, at most what is held;
             * while a growth is unanswered the settle goes to both
             * members, and the script cuts this to the one it finds
             */
            held = ctx->growing ? ctx->grow_to : ctx->amount;
            ctx->charged = ngx_min(ctx->sse->cost, held);

        } else if (!ctx->cost_read) {
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
    ngx_uint_t   status;
    const char  *outcome;

    ngx_http_credits_decide(ctx);

    ctx->settled = 1;

    status = ctx->header_seen ? ctx->status : 499;
    outcome = (ctx->outcome == NGX_HTTP_CREDITS_COMMITTED) ? "commit"
                                                           : "release";

    ngx_http_credits_send_settle(ctx->keys, &ctx->member, ctx->charged,
                                 status, outcome,
                                 ctx->growing ? &ngx_http_credits_unsure
                                              : NULL);

    if (ctx->growing) {
        /* a stream's growth was not answered: the hold is one of the two */
        ngx_http_credits_send_settle(ctx->keys, &ctx->moved, ctx->charged,
                                     status, outcome,
                                     &ngx_http_credits_unsure);
    }
}


/*
 * The request lets go of its hold before its response: it was handed to a
 * location that charges another project or nothing, or moving the hold
 * failed.  Released now, with "status" in the ledger; the request may
 * place a new hold later.
 */

void
ngx_http_credits_drop(ngx_http_credits_ctx_t *ctx, ngx_uint_t status)
{
    if (!ctx->held) {
        return;
    }

    ctx->header_seen = 1;
    ctx->status = status;
    ctx->stand_in = 1;

    ngx_http_credits_settle(ctx);

    ctx->held = 0;
    ctx->header_seen = 0;
    ctx->stand_in = 0;
    ctx->decided = 0;
    ctx->settled = 0;
    ctx->cost_read = 0;
    ctx->charged = 0;
    ctx->outcome = NGX_HTTP_CREDITS_NONE;
}


/* a hold that Redis may have placed, and nobody will settle */

void
ngx_http_credits_release(ngx_str_t *keys, ngx_str_t *member,
    ngx_uint_t status)
{
    ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                  "credits: hold \"%V\" was placed, or may have been, "
                  "without a request waiting for it: releasing it", member);

    ngx_http_credits_send_settle(keys, member, 0, status, "release",
                                 &ngx_http_credits_unsure);
}


static void
ngx_http_credits_send_settle(ngx_str_t *keys, ngx_str_t *member,
    ngx_int_t charged, ngx_uint_t status, const char *outcome, void *data)
{
    u_char     ch[NGX_INT_T_LEN], st[NGX_INT_T_LEN];
    ngx_str_t  args[NGX_HTTP_CREDITS_SETTLE_ARGS];

    if (ngx_http_credits_member_parts(member, &args[4]) != NGX_OK) {
        ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0,
                      "credits: hold \"%V\" is not <id>:<held>:<route>: "
                      "it will expire and be refunded", member);
        return;
    }

    args[0] = *member;
    args[1].data = ch;
    args[1].len = ngx_http_credits_write_int(ch, charged) - ch;
    args[2].data = st;
    args[2].len = ngx_http_credits_write_int(st, (ngx_int_t) status) - st;
    args[3].data = (u_char *) outcome;
    args[3].len = ngx_strlen(outcome);

    if (ngx_http_credits_settle_add(keys, args, data) != NGX_OK) {
        ngx_http_credits_keep(keys, args);
    }
}


/*
 * The id, held amount and route of a member "<id><refs>:<held>:<route>"
 * (ngx_http_credits_member()), as the settle script takes them: split
 * here, where the member was written, they cost Redis nothing to parse.
 * The refs (";ref;ref") keep no ':'.
 */

static ngx_int_t
ngx_http_credits_member_parts(ngx_str_t *member, ngx_str_t *parts)
{
    u_char  *p, *colon, *last;

    last = member->data + member->len;

    colon = ngx_strlchr(member->data, last, ':');
    if (colon == NULL) {
        return NGX_ERROR;
    }

    p = ngx_strlchr(member->data, colon, ';');

    parts[0].data = member->data;
    parts[0].len = (p ? p : colon) - member->data;

    parts[1].data = colon + 1;

    p = ngx_strlchr(colon + 1, last, ':');
    if (p == NULL) {
        return NGX_ERROR;
    }

    parts[1].len = p - parts[1].data;

    parts[2].data = p + 1;
    parts[2].len = last - parts[2].data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_credits_settle_add(ngx_str_t *keys, ngx_str_t *args, void *data)
{
    if (ngx_http_credits_batch_add(&ngx_http_credits_settle_script, keys,
                                   args, NGX_HTTP_CREDITS_SETTLE_ARGS,
                                   ngx_http_credits_settle_handler, data)
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
    ngx_str_t   err, *member, *outcome;
    ngx_int_t   rc;
    ngx_uint_t  level;

    member = &item->args[0];
    outcome = &item->args[3];

    if (reply == NULL) {
        /* lost with the connection: sent again once Redis is back */
        ngx_http_credits_keep(ngx_http_credits_batch_keys(item), item->args);
        return;
    }

    rc = ngx_http_credits_settle_reply(reply);

    if (rc == NGX_ERROR) {
        ngx_http_credits_reply_error(reply, &err);
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "credits: %V of hold \"%V\" failed: %V: it will "
                      "expire and be refunded", outcome, member, &err);
        return;
    }

    if (rc == NGX_OK) {
        ngx_http_credits_settle_count(item);
        return;
    }

    if (item->data == &ngx_http_credits_unsure) {
        ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                      "credits: hold \"%V\" was already settled or never "
                      "placed", member);
        return;
    }

    level = (outcome->data[0] == 'c') ? NGX_LOG_WARN : NGX_LOG_INFO;

    ngx_log_error(level, ngx_cycle->log, 0,
                  "credits: hold \"%V\" had expired before its %V: "
                  "nothing charged", member, outcome);

    ngx_http_credits_count_outcome(NGX_HTTP_CREDITS_EXPIRED);
}


/* the counters, from the item's held and charged */

static void
ngx_http_credits_settle_count(ngx_http_credits_batch_item_t *item)
{
    ngx_int_t  held, charged;

    held = ngx_atoi(item->args[5].data, item->args[5].len);
    charged = ngx_atoi(item->args[1].data, item->args[1].len);

    if (held < 0 || charged < 0 || charged > held) {
        return;
    }

    ngx_http_credits_count_outcome(item->args[3].data[0] == 'c'
                                   ? NGX_HTTP_CREDITS_COMMITTED
                                   : NGX_HTTP_CREDITS_RELEASED);
    ngx_http_credits_count_credits(0, charged, held - charged);
}


/* a copy of a settle to send again: one allocation, strings after it */

static void
ngx_http_credits_keep(ngx_str_t *keys, ngx_str_t *args)
{
    size_t                      size;
    u_char                     *p;
    ngx_uint_t                  i;
    ngx_http_credits_unsent_t  *u;
    ngx_http_credits_resend_t  *rs = &ngx_http_credits_resend;

    if (rs->count >= NGX_HTTP_CREDITS_RESEND_MAX) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "credits: %ui settles wait for redis already: hold "
                      "\"%V\" will expire and be refunded instead of its %V",
                      rs->count, &args[0], &args[3]);
        return;
    }

    size = sizeof(ngx_http_credits_unsent_t);

    for (i = 0; i < 3; i++) {
        size += keys[i].len;
    }

    for (i = 0; i < NGX_HTTP_CREDITS_SETTLE_ARGS; i++) {
        size += args[i].len;
    }

    u = ngx_alloc(size, ngx_cycle->log);
    if (u == NULL) {
        return;
    }

    p = (u_char *) (u + 1);

    for (i = 0; i < 3; i++) {
        u->keys[i].data = p;
        u->keys[i].len = keys[i].len;
        p = ngx_cpymem(p, keys[i].data, keys[i].len);
    }

    for (i = 0; i < NGX_HTTP_CREDITS_SETTLE_ARGS; i++) {
        u->args[i].data = p;
        u->args[i].len = args[i].len;
        p = ngx_cpymem(p, args[i].data, args[i].len);
    }

    ngx_queue_insert_tail(&rs->unsent, &u->queue);
    rs->count++;

    ngx_http_credits_resend_arm();
}


static void
ngx_http_credits_resend_arm(void)
{
    ngx_http_credits_resend_t  *rs = &ngx_http_credits_resend;

    if (!rs->timer.timer_set) {
        ngx_add_timer(&rs->timer, NGX_HTTP_CREDITS_RESEND_INTERVAL);
    }
}


static void
ngx_http_credits_resend_handler(ngx_event_t *ev)
{
    ngx_queue_t                *q;
    ngx_http_credits_unsent_t  *u;
    ngx_http_credits_resend_t  *rs = ev->data;

    /*
     * A worker shutting down gives up after "timeout" counted from its
     * first try, however often resent settles come back (a connection
     * that fails after its connect, a Sentinel that names no master).
     */
    if (ngx_exiting || ngx_quit || ngx_terminate) {

        if (rs->exiting_since == 0) {
            rs->exiting_since = ngx_current_msec;
            ngx_http_credits_redis_hurry();

        } else if (ngx_current_msec - rs->exiting_since >= rs->timeout) {
            ngx_log_error(NGX_LOG_ERR, ev->log, 0,
                          "credits: worker exiting with %ui settles redis "
                          "did not take: their holds will expire and be "
                          "refunded", rs->count);

            while (!ngx_queue_empty(&rs->unsent)) {
                q = ngx_queue_head(&rs->unsent);
                ngx_queue_remove(q);
                ngx_free(ngx_queue_data(q, ngx_http_credits_unsent_t, queue));
            }

            rs->count = 0;
            return;
        }

    } else {
        rs->exiting_since = 0;
    }

    while (!ngx_queue_empty(&rs->unsent)) {

        q = ngx_queue_head(&rs->unsent);
        u = ngx_queue_data(q, ngx_http_credits_unsent_t, queue);

        if (ngx_http_credits_settle_add(u->keys, u->args,
                                        &ngx_http_credits_unsure)
            != NGX_OK)
        {
            break;
        }

        ngx_queue_remove(q);
        rs->count--;
        ngx_free(u);
    }

    if (rs->count == 0) {
        return;
    }

    ngx_http_credits_resend_arm();
}
