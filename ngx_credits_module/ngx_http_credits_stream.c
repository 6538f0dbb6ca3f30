
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Streamed answers: the body filter of a text/event-stream response from
 * a location with credits_cost_event.  It takes the cost events out of
 * what the client gets (ngx_http_credits_sse.c parses them), keeps the
 * last reported cost for the settle, grows the hold when the cost passes
 * it (without pausing the stream), and ends the stream with a
 * credits_exhausted event when the balance cannot pay for more.
 *
 * The bytes given out are copied into buffers of the filter's own,
 * reused once the client has taken them (nginx's free and busy chains),
 * so a long stream does not grow the request's memory.
 */


#include "ngx_http_credits_module.h"


static ngx_int_t ngx_http_credits_stream_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static ngx_int_t ngx_http_credits_stream_parse(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_chain_t *in, ngx_chain_t **out);
static void ngx_http_credits_stream_grow(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx);
static void ngx_http_credits_grow(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_int_t amount);
static void ngx_http_credits_grow_handler(ngx_http_credits_batch_item_t *item,
    redisReply *reply);
static void ngx_http_credits_stream_stop(ngx_http_credits_ctx_t *ctx,
    ngx_int_t required);


static ngx_http_output_body_filter_pt  ngx_http_next_body_filter;


ngx_int_t
ngx_http_credits_stream_init(ngx_conf_t *cf)
{
    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_credits_stream_filter;

    return NGX_OK;
}


/*
 * Called by the header filter for the location in charge: a stream whose
 * cost events are read.  Not for a compressed stream, nor a body already
 * known to be of a length the events would change.
 */

ngx_int_t
ngx_http_credits_stream_start(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx)
{
    ngx_str_t  *type;

    type = &r->headers_out.content_type;

    if (type->len < sizeof("text/event-stream") - 1
        || ngx_strncasecmp(type->data, (u_char *) "text/event-stream",
                           sizeof("text/event-stream") - 1) != 0
        || r->headers_out.content_encoding
        || r->header_only)
    {
        return NGX_OK;
    }

    ctx->sse = ngx_palloc(r->pool, sizeof(ngx_http_credits_sse_t));
    if (ctx->sse == NULL) {
        return NGX_ERROR;
    }

    ngx_http_credits_sse_init(ctx->sse, &ctx->lcf->cost_event, r->pool);

    ngx_http_clear_content_length(r);
    ngx_http_clear_accept_ranges(r);

    return NGX_OK;
}


static ngx_int_t
ngx_http_credits_stream_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_int_t                rc;
    ngx_chain_t             *out;
    ngx_http_credits_ctx_t  *ctx;

    if (r != r->main) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_credits_get_ctx(r);

    if (ctx == NULL || ctx->sse == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    if (ctx->stream_done) {
        /* ended by the module: what the upstream still sends is not given */
        for ( /* void */ ; in; in = in->next) {
            in->buf->pos = in->buf->last;
            in->buf->file_pos = in->buf->file_last;
        }

        return NGX_OK;
    }

    out = NULL;

    if (in && ngx_http_credits_stream_parse(r, ctx, in, &out) != NGX_OK) {
        return NGX_ERROR;
    }

    rc = ngx_http_next_body_filter(r, out);

    ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &out,
                            (ngx_buf_tag_t) &ngx_http_credits_module);

    ngx_http_credits_stream_grow(r, ctx);

    return rc;
}


/* the bytes of "in" the client gets, in one buffer of ours in *out */

static ngx_int_t
ngx_http_credits_stream_parse(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_chain_t *in, ngx_chain_t **out)
{
    size_t        size;
    ngx_buf_t    *b, *buf;
    ngx_chain_t  *cl, *ln;

    size = ctx->sse->len;

    for (ln = in; ln; ln = ln->next) {
        if (!ngx_buf_in_memory(ln->buf) && ngx_buf_size(ln->buf)) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "credits: route \"%V\": the stream went to a "
                          "temporary file, its cost events cannot be read: "
                          "use \"proxy_buffering off\"", &ctx->route);
            return NGX_ERROR;
        }

        size += ngx_buf_size(ln->buf);
    }

    cl = ngx_chain_get_free_buf(r->pool, &ctx->free);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    b = cl->buf;

    if (b->start == NULL || (size_t) (b->end - b->start) < size) {
        b->start = ngx_palloc(r->pool, ngx_max(size, 4096));
        if (b->start == NULL) {
            return NGX_ERROR;
        }

        b->end = b->start + ngx_max(size, 4096);
    }

    b->pos = b->start;
    b->last = b->start;
    b->temporary = 1;
    b->flush = 0;
    b->sync = 0;
    b->last_buf = 0;
    b->last_in_chain = 0;
    b->tag = (ngx_buf_tag_t) &ngx_http_credits_module;

    for (ln = in; ln; ln = ln->next) {
        buf = ln->buf;

        b->last = ngx_http_credits_sse_parse(ctx->sse, buf->pos, buf->last,
                                             b->last, buf->last_buf);
        if (b->last == NULL) {
            return NGX_ERROR;
        }

        buf->pos = buf->last;

        b->flush |= buf->flush;
        b->sync |= buf->sync;
        b->last_buf |= buf->last_buf;
        b->last_in_chain |= buf->last_in_chain;
    }

    if (b->last_buf) {
        ctx->stream_done = 1;
    }

    if (b->pos == b->last) {

        if (!b->flush && !b->last_buf && !b->sync) {
            /* an event is still being read: nothing for the client yet */
            cl->next = ctx->free;
            ctx->free = cl;
            return NGX_OK;
        }

        /* flags only: a buffer with no memory, as nginx wants those */
        b->temporary = 0;
    }

    cl->next = NULL;
    *out = cl;

    return NGX_OK;
}


/* the cost passed what is held: grow by at least credits_hold_step */

static void
ngx_http_credits_stream_grow(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx)
{
    ngx_int_t  step;

    step = ctx->lcf->hold_step;

    /*
     * after the stream's end too: its last cost is settled next, and the
     * settle leaves after the growth (batches go in the order opened)
     */
    if (step <= 0 || ctx->growing || !ctx->held
        || ctx->sse->cost <= ctx->amount)
    {
        return;
    }

    ngx_http_credits_grow(r, ctx,
                          ctx->amount + ngx_max(step,
                                                ctx->sse->cost - ctx->amount));
}


/*
 * A stream reported more than is held: the hold grows to "amount" while
 * the stream goes on.  Until the answer, the hold is either member: a
 * settle meanwhile settles both (only one of them exists).
 */

static void
ngx_http_credits_grow(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx,
    ngx_int_t amount)
{
    u_char     ttl[NGX_INT_T_LEN];
    ngx_str_t  args[4];

    if (ngx_http_credits_member(r, ctx, amount, &ctx->moved) != NGX_OK) {
        return;
    }

    args[0] = ctx->member;
    args[1] = ctx->moved;
    args[2].data = ttl;
    args[2].len = ngx_http_credits_write_int(ttl,
                                             (ngx_int_t) ctx->lcf->hold_ttl)
                  - ttl;

    if (ngx_http_credits_counter_limits(r, ctx->lcf, &args[3]) != NGX_OK) {
        return;
    }

    ctx->grow_item = ngx_http_credits_batch_add(&ngx_http_credits_move_script,
                                                ctx->keys, args, 4,
                                                ngx_http_credits_grow_handler,
                                                ctx);
    if (ctx->grow_item == NULL) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "credits: project \"%V\" route \"%V\": cannot grow "
                      "the hold (redis not connected): charging at most %i",
                      &ctx->project, &ctx->route, ctx->amount);
        return;
    }

    ctx->growing = 1;
    ctx->grow_to = amount;
}


static void
ngx_http_credits_grow_handler(ngx_http_credits_batch_item_t *item,
    redisReply *reply)
{
    ngx_int_t                rc, balance;
    ngx_str_t                err;
    ngx_http_credits_ctx_t  *ctx = item->data;

    if (ctx == NULL) {
        /* the request is over: its settle went to both members */
        return;
    }

    ctx->grow_item = NULL;

    rc = ngx_http_credits_hold_reply(reply, &balance);

    switch (rc) {

    case NGX_OK:
        ngx_http_credits_count_credits(ctx->grow_to - ctx->amount, 0, 0);
        ctx->member = ctx->moved;
        ctx->amount = ctx->grow_to;
        ctx->balance = balance;
        ctx->growing = 0;
        ngx_http_credits_stream_grow(ctx->request, ctx);
        return;

    case NGX_DECLINED:
        ctx->balance = balance;
        ctx->growing = 0;
        ngx_http_credits_stream_stop(ctx, ctx->grow_to - ctx->amount);
        return;

    case NGX_HTTP_CREDITS_OVER_VISITOR:
    case NGX_HTTP_CREDITS_OVER_BUDGET:
        /* a visitor's limit or the budget cannot take more: ends as well */
        ctx->growing = 0;
        ngx_http_credits_stream_stop(ctx, ctx->grow_to - ctx->amount);
        return;

    default:
        /* not known which member is the hold: "growing" stays */
        ngx_http_credits_reply_error(reply, &err);
        ngx_log_error(NGX_LOG_ERR, ctx->wait.log, 0,
                      "credits: project \"%V\" route \"%V\": growing the "
                      "hold failed: %V: charging at most %i",
                      &ctx->project, &ctx->route, &err, ctx->amount);
    }
}


/*
 * The balance cannot pay for the cost reported: the client gets a last
 * event saying so and the end of the stream, the upstream is closed, and
 * what is held is committed.
 */

static void
ngx_http_credits_stream_stop(ngx_http_credits_ctx_t *ctx, ngx_int_t required)
{
    u_char              *p;
    ngx_buf_t           *b;
    ngx_chain_t          out;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    if (ctx->stream_done) {
        return;
    }

    r = ctx->request;
    c = r->connection;

    ngx_log_error(NGX_LOG_WARN, c->log, 0,
                  "credits: project \"%V\" route \"%V\": the stream cost %i, "
                  "the balance of %i cannot hold %i more: ending it",
                  &ctx->project, &ctx->route, ctx->sse->cost, ctx->balance,
                  required);

    ctx->stream_done = 1;

    b = ngx_create_temp_buf(r->pool,
                            sizeof("event: credits_exhausted\ndata: "
                                   "{\"required\":,\"balance\":}\n\n") - 1
                            + 2 * NGX_INT_T_LEN);
    if (b == NULL) {
        goto close;
    }

    p = ngx_cpymem(b->last, "event: credits_exhausted\ndata: {\"required\":",
                   sizeof("event: credits_exhausted\ndata: {\"required\":")
                   - 1);
    p = ngx_http_credits_write_int(p, required);
    p = ngx_cpymem(p, ",\"balance\":", sizeof(",\"balance\":") - 1);
    p = ngx_http_credits_write_int(p, ctx->balance);
    b->last = ngx_cpymem(p, "}\n\n", 3);
    b->last_buf = 1;
    b->flush = 1;

    out.buf = b;
    out.next = NULL;

    (void) ngx_http_next_body_filter(r, &out);

close:

    /* the upstream goes with the request; the settle commits the hold */
    ngx_http_finalize_request(r, NGX_ERROR);
    ngx_http_run_posted_requests(c);
}
