
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The answers the module writes itself once the gate has decided: 401,
 * 402, 429 and 503, each a JSON body (and its headers), unless the
 * operator configured an error_page for the status.
 */


#include "ngx_http_credits_module.h"


static ngx_int_t ngx_http_credits_too_many(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx);
static ngx_buf_t *ngx_http_credits_json(ngx_http_request_t *r,
    const char *error, const char *name1, ngx_int_t n1, const char *name2,
    ngx_int_t n2);
static ngx_int_t ngx_http_credits_answer(ngx_http_request_t *r,
    ngx_uint_t status, ngx_buf_t *b);
static ngx_uint_t ngx_http_credits_error_page(ngx_http_request_t *r,
    ngx_uint_t status);


static ngx_str_t  ngx_http_credits_invalid_token =
    ngx_string("{\"error\":\"invalid_token\"}\n");
static ngx_str_t  ngx_http_credits_unavailable =
    ngx_string("{\"error\":\"credits_unavailable\"}\n");
static ngx_str_t  ngx_http_credits_bearer =
    ngx_string("Bearer error=\"invalid_token\"");
static ngx_str_t  ngx_http_credits_retry_after = ngx_string("1");


/* what the gate decided, once the hold's answer (or its absence) is known */

ngx_int_t
ngx_http_credits_verdict(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx)
{
    ngx_buf_t  *b;

    if (ctx->answered) {
        return ctx->rc;
    }

    ctx->answered = 1;

    switch (ctx->rc) {

    case NGX_HTTP_UNAUTHORIZED:

        r->headers_out.www_authenticate = ngx_http_credits_add_header(r,
                                "WWW-Authenticate", &ngx_http_credits_bearer);
        if (r->headers_out.www_authenticate == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        b = ngx_calloc_buf(r->pool);
        if (b == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        b->pos = ngx_http_credits_invalid_token.data;
        b->last = b->pos + ngx_http_credits_invalid_token.len;
        b->memory = 1;

        return ngx_http_credits_answer(r, NGX_HTTP_UNAUTHORIZED, b);

    case NGX_HTTP_SERVICE_UNAVAILABLE:

        if (ngx_http_credits_add_header(r, "Retry-After",
                                        &ngx_http_credits_retry_after)
            == NULL)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        b = ngx_calloc_buf(r->pool);
        if (b == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        b->pos = ngx_http_credits_unavailable.data;
        b->last = b->pos + ngx_http_credits_unavailable.len;
        b->memory = 1;

        return ngx_http_credits_answer(r, NGX_HTTP_SERVICE_UNAVAILABLE, b);

    case NGX_HTTP_CREDITS_PAYMENT_REQUIRED:

        b = ngx_http_credits_json(r, "insufficient_credits", "required",
                                  ctx->price, "balance", ctx->balance);
        if (b == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return ngx_http_credits_answer(r, NGX_HTTP_CREDITS_PAYMENT_REQUIRED, b);

    case NGX_HTTP_TOO_MANY_REQUESTS:
        return ngx_http_credits_too_many(r, ctx);

    default:
        return ctx->rc;
    }
}


/* a visitor's limit or the budget reached: 429 until the window's end */

static ngx_int_t
ngx_http_credits_too_many(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx)
{
    u_char     *p;
    time_t      retry;
    ngx_buf_t  *b;
    ngx_str_t   value;

    retry = ngx_http_credits_window_left(ctx);

    p = ngx_pnalloc(r->pool, NGX_TIME_T_LEN);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    value.data = p;
    value.len = ngx_http_credits_write_int(p, (ngx_int_t) retry) - p;

    if (ngx_http_credits_add_header(r, "Retry-After", &value) == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b = ctx->over_visitor
        ? ngx_http_credits_json(r, "visitor_limit_reached", "limit",
                                ctx->limit, "retry_after", retry)
        : ngx_http_credits_json(r, "budget_exhausted", "budget",
                                ctx->limit, "retry_after", retry);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_credits_answer(r, NGX_HTTP_TOO_MANY_REQUESTS, b);
}


/* {"error":"<error>","<name1>":n1,"<name2>":n2} and a newline */

static ngx_buf_t *
ngx_http_credits_json(ngx_http_request_t *r, const char *error,
    const char *name1, ngx_int_t n1, const char *name2, ngx_int_t n2)
{
    u_char     *p;
    ngx_buf_t  *b;

    b = ngx_create_temp_buf(r->pool,
                            sizeof("{\"error\":\"\",\"\":,\"\":}\n") - 1
                            + ngx_strlen(error) + ngx_strlen(name1)
                            + ngx_strlen(name2) + 2 * NGX_INT_T_LEN);
    if (b == NULL) {
        return NULL;
    }

    p = ngx_sprintf(b->last, "{\"error\":\"%s\",\"%s\":", error, name1);
    p = ngx_http_credits_write_int(p, n1);
    p = ngx_sprintf(p, ",\"%s\":", name2);
    p = ngx_http_credits_write_int(p, n2);
    b->last = ngx_cpymem(p, "}\n", 2);

    return b;
}


/*
 * The module's own answer, a JSON body, unless the operator configured an
 * error_page for the status: then nginx's error_page machinery answers.
 */

static ngx_int_t
ngx_http_credits_answer(ngx_http_request_t *r, ngx_uint_t status,
    ngx_buf_t *b)
{
    ngx_int_t    rc;
    ngx_chain_t  out;

    if (ngx_http_credits_error_page(r, status)) {
        return status;
    }

    b->last_buf = 1;
    b->last_in_chain = 1;

    r->headers_out.status = status;
    r->headers_out.content_length_n = b->last - b->pos;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }

    rc = ngx_http_send_header(r);

    if (rc != NGX_ERROR && rc <= NGX_OK && !r->header_only) {
        out.buf = b;
        out.next = NULL;
        rc = ngx_http_output_filter(r, &out);
    }

    /* the response is complete: finalize it here and stop the phases */
    ngx_http_finalize_request(r, rc);

    return NGX_DONE;
}


/* as ngx_http_special_response_handler() would find it */

static ngx_uint_t
ngx_http_credits_error_page(ngx_http_request_t *r, ngx_uint_t status)
{
    ngx_uint_t                 i;
    ngx_http_err_page_t       *err_page;
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (r->error_page || clcf->error_pages == NULL || r->uri_changes == 0) {
        return 0;
    }

    err_page = clcf->error_pages->elts;

    for (i = 0; i < clcf->error_pages->nelts; i++) {
        if (err_page[i].status == (ngx_int_t) status) {
            return 1;
        }
    }

    return 0;
}
