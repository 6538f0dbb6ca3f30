
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The access phase: the gate every metered location a request enters
 * (token, price, hold) and the request's context; the answers the gate
 * decides are written in ngx_http_credits_answers.c.
 *
 * The charge follows the metered location in charge: the last one whose
 * gate the request passed.  A request handed on (internal redirect,
 * error_page, try_files, a named location, X-Accel-Redirect) to another
 * metered location passes that location's gate too, with its own token
 * rules and price, keeping its one hold (moved, and grown to a higher
 * price).  A response made by a location that did not gate it stood in
 * for the metered upstream, and releases the hold (the header filter sees
 * it); the exception is an X-Accel-Redirect from the metered upstream
 * itself, which is that upstream's answer.
 *
 * Subrequests (mirror, SSI, auth_request, slice) skip nginx's access
 * phase: one into a metered location is refused with 403 in the preaccess
 * phase, so that it never reaches the AI upstream unmetered.
 */


#include "ngx_http_credits_module.h"


static ngx_int_t ngx_http_credits_access_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_credits_subrequest_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_credits_log_handler(ngx_http_request_t *r);
static void ngx_http_credits_leave(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx);
static ngx_int_t ngx_http_credits_gate(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_http_credits_loc_conf_t *lcf);
static ngx_int_t ngx_http_credits_token(ngx_http_request_t *r,
    ngx_http_credits_jwt_conf_t *jcf, ngx_str_t *token);
static ngx_int_t ngx_http_credits_price(ngx_http_request_t *r,
    ngx_http_credits_loc_conf_t *lcf);
static ngx_http_credits_ctx_t *ngx_http_credits_create_ctx(
    ngx_http_request_t *r);
static void ngx_http_credits_cleanup(void *data);


ngx_int_t
ngx_http_credits_access_init(ngx_conf_t *cf)
{
    ngx_uint_t                  n;
    ngx_http_handler_pt        *h;
    ngx_http_phase_t           *log;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_credits_access_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PREACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_credits_subrequest_handler;

    /* first in the log phase: the access log sees the decided outcome */

    log = &cmcf->phases[NGX_HTTP_LOG_PHASE];

    h = ngx_array_push(&log->handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h = log->handlers.elts;
    n = log->handlers.nelts;

    ngx_memmove(&h[1], &h[0], (n - 1) * sizeof(ngx_http_handler_pt));
    h[0] = ngx_http_credits_log_handler;

    return NGX_OK;
}


static ngx_int_t
ngx_http_credits_access_handler(ngx_http_request_t *r)
{
    ngx_http_credits_ctx_t       *ctx;
    ngx_http_credits_loc_conf_t  *lcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_credits_module);
    ctx = ngx_http_credits_get_ctx(r);

    if (ctx && ctx->waiting) {
        return NGX_AGAIN;
    }

    if (ctx && ctx->lcf == lcf) {
        /* resumed after the hold, or back where the gate ran */
        return ngx_http_credits_verdict(r, ctx);
    }

    if (ctx && ctx->held) {
        ngx_http_credits_leave(r, ctx);
    }

    if (!lcf->enable) {
        return NGX_DECLINED;
    }

    if (ctx == NULL) {
        ctx = ngx_http_credits_create_ctx(r);
        if (ctx == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    return ngx_http_credits_gate(r, ctx, lcf);
}


/*
 * The request left the location in charge for this one.  When the
 * metered upstream sent it here itself (X-Accel-Redirect, with a status
 * below 400), what this location serves is the upstream's answer.
 */

static void
ngx_http_credits_leave(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx)
{
    ngx_http_upstream_t  *u;

    if (ctx->left) {
        return;
    }

    ctx->left = 1;

    u = r->upstream;

    ctx->accel = (u != NULL && u != ctx->upstream
                  && u->headers_in.x_accel_redirect != NULL
                  && u->headers_in.status_n < 400);
}


static ngx_int_t
ngx_http_credits_subrequest_handler(ngx_http_request_t *r)
{
    ngx_http_credits_loc_conf_t  *lcf;

    if (r == r->main) {
        return NGX_DECLINED;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_credits_module);

    if (!lcf->enable) {
        return NGX_DECLINED;
    }

    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "credits: subrequest \"%V\" to a metered location "
                  "refused: subrequests are never metered", &r->uri);

    return NGX_HTTP_FORBIDDEN;
}


static ngx_int_t
ngx_http_credits_log_handler(ngx_http_request_t *r)
{
    ngx_http_credits_ctx_t  *ctx;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_credits_get_ctx(r);

    if (ctx) {
        ngx_http_credits_decide(ctx);
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_credits_gate(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx,
    ngx_http_credits_loc_conf_t *lcf)
{
    ngx_int_t     rc, price;
    ngx_str_t     token, project;
    const char   *reason;

    ctx->lcf = lcf;
    ctx->upstream = r->upstream;
    ctx->left = 0;
    ctx->accel = 0;
    ctx->answered = 0;
    ctx->rc = NGX_DECLINED;
    ctx->route = lcf->route;
    ngx_str_null(&ctx->token);

    if (ngx_http_credits_token(r, &lcf->jwt, &token) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_credits_jwt_check(&lcf->jwt, &token, ngx_time(), r->pool,
                                    &project, &reason);

    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rc != NGX_OK) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "credits: invalid token: %s", reason);

        if (!ctx->held) {
            ctx->outcome = NGX_HTTP_CREDITS_UNAUTHORIZED;
            ngx_http_credits_count_outcome(ctx->outcome);
        }

        ctx->rc = NGX_HTTP_UNAUTHORIZED;
        return ngx_http_credits_verdict(r, ctx);
    }

    /* $credits_claim_NAME reads the claims of this token */
    ctx->token = token;

    price = ngx_http_credits_price(r, lcf);

    if (price == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* handed here from a location that charges another project */

    if (ctx->held
        && (project.len != ctx->project.len
            || ngx_strncmp(project.data, ctx->project.data, project.len) != 0
            || price == 0))
    {
        ngx_http_credits_drop(ctx, r->err_status ? r->err_status
                                                  : r->headers_out.status);
    }

    ctx->project = project;
    ctx->price = price;

    if (price == 0) {
        ctx->outcome = NGX_HTTP_CREDITS_FREE;
        return NGX_DECLINED;
    }

    if (ngx_http_credits_counters(r, ctx, lcf) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ctx->held ? ngx_http_credits_move(r, ctx, lcf)
                   : ngx_http_credits_hold(r, ctx, lcf);

    if (rc == NGX_AGAIN) {
        return NGX_AGAIN;
    }

    return ngx_http_credits_verdict(r, ctx);
}


static ngx_int_t
ngx_http_credits_token(ngx_http_request_t *r, ngx_http_credits_jwt_conf_t *jcf,
    ngx_str_t *token)
{
    u_char           *p, *last;
    ngx_table_elt_t  *h;

    if (jcf->token) {
        return ngx_http_complex_value(r, jcf->token, token);
    }

    ngx_str_null(token);

    h = r->headers_in.authorization;

    if (h == NULL || h->value.len < sizeof("Bearer ") - 1) {
        return NGX_OK;
    }

    /*
     * "Bearer " in any case: a letter's case is its 0x20 bit (cheaper
     * than ngx_strncasecmp(), which lowers every byte by a function)
     */

    p = h->value.data;

    if ((p[0] | 0x20) != 'b' || (p[1] | 0x20) != 'e' || (p[2] | 0x20) != 'a'
        || (p[3] | 0x20) != 'r' || (p[4] | 0x20) != 'e'
        || (p[5] | 0x20) != 'r' || p[6] != ' ')
    {
        return NGX_OK;
    }

    p += sizeof("Bearer ") - 1;
    last = h->value.data + h->value.len;

    while (p < last && *p == ' ') {
        p++;
    }

    while (last > p && last[-1] == ' ') {
        last--;
    }

    token->data = p;
    token->len = last - p;

    return NGX_OK;
}


static ngx_int_t
ngx_http_credits_price(ngx_http_request_t *r, ngx_http_credits_loc_conf_t *lcf)
{
    ngx_int_t  price;
    ngx_str_t  value;

    price = ngx_http_credits_price_override(&lcf->route, lcf->route_hash);

    if (price != NGX_DECLINED) {
        return price;
    }

    if (ngx_http_complex_value(r, lcf->price, &value) != NGX_OK) {
        return NGX_ERROR;
    }

    price = ngx_http_credits_parse_amount(value.data, value.len);

    if (price == NGX_ERROR) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "credits: route \"%V\": credits_price evaluated to "
                      "\"%V\", not a non-negative integer",
                      &lcf->route, &value);
    }

    return price;
}


static ngx_http_credits_ctx_t *
ngx_http_credits_create_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t      *cln;
    ngx_http_credits_ctx_t  *ctx;

    cln = ngx_pool_cleanup_add(r->pool, sizeof(ngx_http_credits_ctx_t));
    if (cln == NULL) {
        return NULL;
    }

    ctx = cln->data;
    ngx_memzero(ctx, sizeof(ngx_http_credits_ctx_t));

    ctx->request = r;
    ctx->rc = NGX_DECLINED;

    cln->handler = ngx_http_credits_cleanup;

    ngx_http_set_ctx(r, ctx, ngx_http_credits_module);

    return ctx;
}


/*
 * An internal redirect zeroes r->ctx, but a hold placed before it must
 * still be settled once, and must not be placed twice: the context lives
 * in the request pool's cleanup and is found there again.
 */

ngx_http_credits_ctx_t *
ngx_http_credits_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t      *cln;
    ngx_http_credits_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_credits_module);

    if (ctx != NULL || !r->internal) {
        return ctx;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_credits_cleanup) {
            ctx = cln->data;
            ngx_http_set_ctx(r, ctx, ngx_http_credits_module);
            return ctx;
        }
    }

    return NULL;
}


static void
ngx_http_credits_cleanup(void *data)
{
    ngx_http_credits_ctx_t  *ctx = data;

    if (ctx->wait.timer_set) {
        ngx_del_timer(&ctx->wait);
    }

    if (ctx->wait.posted) {
        ngx_delete_posted_event(&ctx->wait);
    }

    if (ctx->item) {
        /* the hold's reply will find nobody waiting and undo the hold */
        ctx->item->data = NULL;
        ctx->item = NULL;
    }

    if (ctx->grow_item) {
        /* the settle below goes to both members the growth may leave */
        ctx->grow_item->data = NULL;
        ctx->grow_item = NULL;
    }

    if (ctx->held && !ctx->settled) {
        ngx_http_credits_settle(ctx);
    }
}
