
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The $credits_* variables.  Reading one never changes what the request
 * will be charged: they show the state so far, and the outcome and the
 * charge only once the request is over (the log phase decides them,
 * before the access log is written).  $credits_claim_NAME reads a claim
 * of the token the request's gate verified.
 */


#include "ngx_http_credits_module.h"

#include <jansson.h>


static ngx_int_t ngx_http_credits_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static void ngx_http_credits_value(ngx_http_variable_value_t *v,
    ngx_str_t *s);
static ngx_int_t ngx_http_credits_claim_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_credits_claim(ngx_http_request_t *r,
    ngx_str_t *token, const char *name, ngx_str_t *value);


enum {
    NGX_HTTP_CREDITS_VAR_PROJECT = 0,
    NGX_HTTP_CREDITS_VAR_ROUTE,
    NGX_HTTP_CREDITS_VAR_PRICE,
    NGX_HTTP_CREDITS_VAR_HELD,
    NGX_HTTP_CREDITS_VAR_CHARGED,
    NGX_HTTP_CREDITS_VAR_BALANCE,
    NGX_HTTP_CREDITS_VAR_OUTCOME,
    NGX_HTTP_CREDITS_VAR_HOLD_ID
};


static ngx_http_variable_t  ngx_http_credits_vars[] = {

    { ngx_string("credits_project"), NULL, ngx_http_credits_variable,
      NGX_HTTP_CREDITS_VAR_PROJECT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("credits_route"), NULL, ngx_http_credits_variable,
      NGX_HTTP_CREDITS_VAR_ROUTE, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("credits_price"), NULL, ngx_http_credits_variable,
      NGX_HTTP_CREDITS_VAR_PRICE, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("credits_held"), NULL, ngx_http_credits_variable,
      NGX_HTTP_CREDITS_VAR_HELD, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("credits_charged"), NULL, ngx_http_credits_variable,
      NGX_HTTP_CREDITS_VAR_CHARGED, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("credits_balance"), NULL, ngx_http_credits_variable,
      NGX_HTTP_CREDITS_VAR_BALANCE, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("credits_outcome"), NULL, ngx_http_credits_variable,
      NGX_HTTP_CREDITS_VAR_OUTCOME, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("credits_hold_id"), NULL, ngx_http_credits_variable,
      NGX_HTTP_CREDITS_VAR_HOLD_ID, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("credits_claim_"), NULL, ngx_http_credits_claim_variable,
      0, NGX_HTTP_VAR_NOCACHEABLE|NGX_HTTP_VAR_PREFIX, 0 },

      ngx_http_null_variable
};


static ngx_int_t
ngx_http_credits_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v,
    uintptr_t data)
{
    ngx_int_t                n;
    ngx_str_t                s;
    ngx_uint_t               number;
    ngx_http_credits_ctx_t  *ctx;

    ctx = ngx_http_credits_get_ctx(r->main);

    if (ctx == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    n = 0;
    number = 0;
    ngx_str_null(&s);

    switch (data) {

    case NGX_HTTP_CREDITS_VAR_PROJECT:
        s = ctx->project;
        break;

    case NGX_HTTP_CREDITS_VAR_ROUTE:
        s = ctx->route;
        break;

    case NGX_HTTP_CREDITS_VAR_PRICE:
        number = (ctx->project.len != 0);
        n = ctx->price;
        break;

    case NGX_HTTP_CREDITS_VAR_HELD:
        number = ctx->held;
        n = ctx->amount;
        break;

    case NGX_HTTP_CREDITS_VAR_CHARGED:
        number = ctx->decided;
        n = ctx->charged;
        break;

    case NGX_HTTP_CREDITS_VAR_BALANCE:
        /* after the hold, or what the 402 said (it may be negative) */
        number = (ctx->held || ctx->rc == NGX_HTTP_CREDITS_PAYMENT_REQUIRED);
        n = ctx->balance;
        break;

    case NGX_HTTP_CREDITS_VAR_OUTCOME:
        /* a hold's outcome is empty until the request is over */
        if (!ctx->held || ctx->decided) {
            s = ngx_http_credits_outcome_names[ctx->outcome];
        }

        break;

    default: /* NGX_HTTP_CREDITS_VAR_HOLD_ID */
        s = ctx->held ? ctx->hold_id : s;
        break;
    }

    if (number) {
        s.data = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
        if (s.data == NULL) {
            return NGX_ERROR;
        }

        s.len = ngx_http_credits_write_int(s.data, n) - s.data;
    }

    ngx_http_credits_value(v, &s);

    return NGX_OK;
}


/* the value, or not found when it is empty */

static void
ngx_http_credits_value(ngx_http_variable_value_t *v, ngx_str_t *s)
{
    if (s->len == 0) {
        v->not_found = 1;
        return;
    }

    v->len = s->len;
    v->data = s->data;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
}


/*
 * $credits_claim_NAME: a string claim as it is, an integer one in
 * decimal; empty for any other claim, a missing one, and before (or
 * without) a verified token.  The claims are read again from the token
 * the gate verified (or found in its cache of verified tokens): only the
 * bytes that were verified are ever read.
 */

static ngx_int_t
ngx_http_credits_claim_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t  *var = (ngx_str_t *) data;

    u_char                  *name;
    size_t                   len;
    ngx_str_t                value;
    ngx_http_credits_ctx_t  *ctx;

    v->not_found = 1;

    ctx = ngx_http_credits_get_ctx(r->main);

    if (ctx == NULL || ctx->token.len == 0) {
        return NGX_OK;
    }

    len = var->len - (sizeof("credits_claim_") - 1);

    name = ngx_pnalloc(r->pool, len + 1);
    if (name == NULL) {
        return NGX_ERROR;
    }

    ngx_cpystrn(name, var->data + sizeof("credits_claim_") - 1, len + 1);

    if (ngx_http_credits_claim(r, &ctx->token, (char *) name, &value)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_http_credits_value(v, &value);

    return NGX_OK;
}


static ngx_int_t
ngx_http_credits_claim(ngx_http_request_t *r, ngx_str_t *token,
    const char *name, ngx_str_t *value)
{
    u_char     *dot1, *dot2, *last;
    json_t     *claims, *claim;
    ngx_int_t   rc;
    ngx_str_t   segment;

    ngx_str_null(value);

    last = token->data + token->len;
    dot1 = ngx_strlchr(token->data, last, '.');
    dot2 = dot1 ? ngx_strlchr(dot1 + 1, last, '.') : NULL;

    if (dot2 == NULL) {
        return NGX_OK;
    }

    segment.data = dot1 + 1;
    segment.len = dot2 - segment.data;

    rc = ngx_http_credits_jwt_decode_json(&segment, r->pool, &claims);

    if (rc != NGX_OK) {
        return (rc == NGX_ERROR) ? NGX_ERROR : NGX_OK;
    }

    claim = json_object_get(claims, name);
    rc = NGX_OK;

    if (json_is_string(claim)) {
        value->len = json_string_length(claim);
        value->data = ngx_pnalloc(r->pool, value->len);

        if (value->data == NULL) {
            rc = NGX_ERROR;

        } else {
            ngx_memcpy(value->data, json_string_value(claim), value->len);
        }

    } else if (json_is_integer(claim)) {
        value->data = ngx_pnalloc(r->pool, NGX_INT64_LEN);

        if (value->data == NULL) {
            rc = NGX_ERROR;

        } else {
            value->len = ngx_sprintf(value->data, "%L",
                                     (int64_t) json_integer_value(claim))
                         - value->data;
        }
    }

    json_decref(claims);

    return rc;
}


ngx_int_t
ngx_http_credits_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_credits_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}
