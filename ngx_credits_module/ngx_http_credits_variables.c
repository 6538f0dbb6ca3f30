
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The $credits_* variables.  Reading one never changes what the request
 * will be charged: they show the state so far, and the outcome and the
 * charge only once the request is over (the log phase decides them,
 * before the access log is written).
 */


#include "ngx_http_credits_module.h"


static ngx_int_t ngx_http_credits_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);


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

    if (s.len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = s.len;
    v->data = s.data;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;

    return NGX_OK;
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
