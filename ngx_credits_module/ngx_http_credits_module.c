
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Directives, configuration, the access-phase gate and the variables.
 */


#include "ngx_http_credits_module.h"


static ngx_int_t ngx_http_credits_access_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_credits_gate(ngx_http_request_t *r,
    ngx_http_credits_loc_conf_t *lcf);
static ngx_int_t ngx_http_credits_token(ngx_http_request_t *r,
    ngx_http_credits_jwt_conf_t *jcf, ngx_str_t *token);
static ngx_int_t ngx_http_credits_price(ngx_http_request_t *r,
    ngx_http_credits_loc_conf_t *lcf);
static ngx_int_t ngx_http_credits_unauthorized(ngx_http_request_t *r,
    const char *reason);
static ngx_int_t ngx_http_credits_verdict(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx);
static ngx_int_t ngx_http_credits_insufficient(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx);
static ngx_http_credits_ctx_t *ngx_http_credits_create_ctx(
    ngx_http_request_t *r);
static void ngx_http_credits_cleanup(void *data);

static ngx_int_t ngx_http_credits_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_credits_add_variables(ngx_conf_t *cf);

static void *ngx_http_credits_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_credits_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_credits_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_credits_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_credits_redis(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_credits_price_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_credits_key_file(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_credits_algorithms(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_credits_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_credits_init_process(ngx_cycle_t *cycle);
static void ngx_http_credits_exit_process(ngx_cycle_t *cycle);


static ngx_conf_enum_t  ngx_http_credits_fail[] = {
    { ngx_string("closed"), NGX_HTTP_CREDITS_ON_FAIL_CLOSE },
    { ngx_string("open"), NGX_HTTP_CREDITS_ON_FAIL_OPEN },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_credits_commands[] = {

    { ngx_string("credits"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, enable),
      NULL },

    { ngx_string("credits_price"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_credits_price_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, price),
      NULL },

    { ngx_string("credits_route"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, route),
      NULL },

    { ngx_string("credits_cost_header"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, cost_header),
      NULL },

    { ngx_string("credits_hold_ttl"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, hold_ttl),
      NULL },

    { ngx_string("credits_fail"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, fail),
      &ngx_http_credits_fail },

    { ngx_string("credits_redis"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_credits_redis,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("credits_key_prefix"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_credits_main_conf_t, prefix),
      NULL },

    { ngx_string("credits_jwt_key_file"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_credits_key_file,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("credits_jwt_algorithms"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_credits_algorithms,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("credits_jwt_issuer"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, jwt.issuer),
      NULL },

    { ngx_string("credits_jwt_audience"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, jwt.audience),
      NULL },

    { ngx_string("credits_jwt_project_claim"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, jwt.project_claim),
      NULL },

    { ngx_string("credits_jwt_token"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, jwt.token),
      NULL },

    { ngx_string("credits_jwt_leeway"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, jwt.leeway),
      NULL },

    { ngx_string("credits_jwt_cache_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, jwt.cache_size),
      NULL },

    { ngx_string("credits_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_credits_status,
      0,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_credits_module_ctx = {
    ngx_http_credits_add_variables,        /* preconfiguration */
    ngx_http_credits_init,                 /* postconfiguration */

    ngx_http_credits_create_main_conf,     /* create main configuration */
    ngx_http_credits_init_main_conf,       /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_credits_create_loc_conf,      /* create location configuration */
    ngx_http_credits_merge_loc_conf        /* merge location configuration */
};


ngx_module_t  ngx_http_credits_module = {
    NGX_MODULE_V1,
    &ngx_http_credits_module_ctx,          /* module context */
    ngx_http_credits_commands,             /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_credits_init_process,         /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_credits_exit_process,         /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


ngx_str_t  ngx_http_credits_outcome_names[] = {
    ngx_null_string,
    ngx_string("committed"),
    ngx_string("released"),
    ngx_string("expired"),
    ngx_string("unauthorized"),
    ngx_string("insufficient"),
    ngx_string("redis_unavailable"),
    ngx_string("fail_open"),
    ngx_string("free")
};


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
ngx_http_credits_access_handler(ngx_http_request_t *r)
{
    ngx_http_credits_ctx_t       *ctx;
    ngx_http_credits_loc_conf_t  *lcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_credits_module);
    ctx = ngx_http_credits_get_ctx(r);

    if (ctx == NULL) {
        return lcf->enable ? ngx_http_credits_gate(r, lcf) : NGX_DECLINED;
    }

    if (ctx->waiting) {
        return NGX_AGAIN;
    }

    /*
     * Resumed after the hold, or internally redirected (error_page,
     * try_files, named locations): the gate ran once and its verdict
     * stands in every metered location the request reaches.
     */

    return lcf->enable ? ngx_http_credits_verdict(r, ctx) : NGX_DECLINED;
}


static ngx_int_t
ngx_http_credits_gate(ngx_http_request_t *r, ngx_http_credits_loc_conf_t *lcf)
{
    ngx_int_t                rc;
    ngx_str_t                token;
    const char              *reason;
    ngx_http_credits_ctx_t  *ctx;

    ctx = ngx_http_credits_create_ctx(r);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->route = lcf->route;

    if (ngx_http_credits_token(r, &lcf->jwt, &token) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_credits_jwt_check(&lcf->jwt, &token, ngx_time(), r->pool,
                                    &ctx->project, &reason);

    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rc != NGX_OK) {
        ctx->outcome = NGX_HTTP_CREDITS_UNAUTHORIZED;
        ctx->rc = NGX_HTTP_UNAUTHORIZED;
        ctx->answered = 1;
        ngx_http_credits_count_outcome(ctx->outcome);
        return ngx_http_credits_unauthorized(r, reason);
    }

    ctx->price = ngx_http_credits_price(r, lcf);

    if (ctx->price == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ctx->price == 0) {
        ctx->outcome = NGX_HTTP_CREDITS_FREE;
        ctx->rc = NGX_DECLINED;
        return NGX_DECLINED;
    }

    rc = ngx_http_credits_hold(r, ctx, lcf);

    if (rc == NGX_AGAIN) {
        return NGX_AGAIN;
    }

    return ngx_http_credits_verdict(r, ctx);
}


/* what the gate decided, once the hold's answer (or its absence) is known */

static ngx_int_t
ngx_http_credits_verdict(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx)
{
    ngx_table_elt_t  *h;

    if (ctx->answered) {
        return ctx->rc;
    }

    ctx->answered = 1;

    switch (ctx->rc) {

    case NGX_HTTP_SERVICE_UNAVAILABLE:

        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "Retry-After");
        ngx_str_set(&h->value, "1");

        return NGX_HTTP_SERVICE_UNAVAILABLE;

    case NGX_HTTP_CREDITS_PAYMENT_REQUIRED:
        return ngx_http_credits_insufficient(r, ctx);

    default:
        return ctx->rc;
    }
}


static ngx_int_t
ngx_http_credits_insufficient(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx)
{
    size_t        len;
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    len = sizeof("{\"error\":\"insufficient_credits\",\"required\":"
                 ",\"balance\":}\n") - 1 + 2 * NGX_INT_T_LEN;

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last = ngx_sprintf(b->pos, "{\"error\":\"insufficient_credits\","
                          "\"required\":%i,\"balance\":%i}\n",
                          ctx->price, ctx->balance);
    b->last_buf = 1;
    b->last_in_chain = 1;

    r->headers_out.status = NGX_HTTP_CREDITS_PAYMENT_REQUIRED;
    r->headers_out.content_length_n = b->last - b->pos;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;

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

    if (h == NULL || h->value.len < sizeof("Bearer ") - 1
        || ngx_strncasecmp(h->value.data, (u_char *) "Bearer ",
                           sizeof("Bearer ") - 1) != 0)
    {
        return NGX_OK;
    }

    p = h->value.data + sizeof("Bearer ") - 1;
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


/* a non-negative integer of at most 15 digits (credits never get near) */

ngx_int_t
ngx_http_credits_parse_amount(u_char *p, size_t len)
{
    if (len == 0 || len > 15) {
        return NGX_ERROR;
    }

    return ngx_atoi(p, len);
}


/*
 * n in decimal, at most NGX_INT_T_LEN bytes.  A request writes several
 * numbers (script arguments, response headers); ngx_sprintf() would parse
 * its format string for each.
 */

u_char *
ngx_http_credits_write_int(u_char *p, ngx_int_t n)
{
    u_char      digits[NGX_INT_T_LEN], *d;
    ngx_uint_t  u;

    u = (ngx_uint_t) n;

    if (n < 0) {
        *p++ = '-';
        u = -u;
    }

    d = digits + NGX_INT_T_LEN;

    do {
        *--d = (u_char) ('0' + u % 10);
        u /= 10;
    } while (u);

    return ngx_cpymem(p, d, digits + NGX_INT_T_LEN - d);
}


static ngx_int_t
ngx_http_credits_unauthorized(ngx_http_request_t *r, const char *reason)
{
    ngx_table_elt_t  *h;

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "credits: invalid token: %s", reason);

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "WWW-Authenticate");
    ngx_str_set(&h->value, "Bearer error=\"invalid_token\"");

    r->headers_out.www_authenticate = h;

    return NGX_HTTP_UNAUTHORIZED;
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

    if (ctx->held && !ctx->settled) {
        ngx_http_credits_settle(ctx);
    }
}


static ngx_int_t
ngx_http_credits_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v,
    uintptr_t data)
{
    ngx_int_t                n;
    ngx_str_t                s;
    ngx_http_credits_ctx_t  *ctx;

    ctx = ngx_http_credits_get_ctx(r->main);

    if (ctx == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    ngx_http_credits_decide(ctx);

    n = -1;
    ngx_str_null(&s);

    switch (data) {

    case NGX_HTTP_CREDITS_VAR_PROJECT:
        s = ctx->project;
        break;

    case NGX_HTTP_CREDITS_VAR_ROUTE:
        s = ctx->route;
        break;

    case NGX_HTTP_CREDITS_VAR_PRICE:
        n = (ctx->project.len) ? ctx->price : -1;
        break;

    case NGX_HTTP_CREDITS_VAR_HELD:
        n = ctx->held ? ctx->price : -1;
        break;

    case NGX_HTTP_CREDITS_VAR_CHARGED:
        n = ctx->decided ? ctx->charged : -1;
        break;

    case NGX_HTTP_CREDITS_VAR_BALANCE:
        n = (ctx->held || ctx->outcome == NGX_HTTP_CREDITS_INSUFFICIENT)
            ? ctx->balance : -1;
        break;

    case NGX_HTTP_CREDITS_VAR_OUTCOME:
        s = ngx_http_credits_outcome_names[ctx->outcome];
        break;

    default: /* NGX_HTTP_CREDITS_VAR_HOLD_ID */
        s = ctx->held ? ctx->hold_id : s;
        break;
    }

    if (n >= 0) {
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


static ngx_int_t
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


static void *
ngx_http_credits_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_credits_main_conf_t  *cmcf;

    cmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_credits_main_conf_t));
    if (cmcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     cmcf->redis.host = { 0, NULL };
     *     cmcf->redis.password = { 0, NULL };
     *     cmcf->prefix = { 0, NULL };
     *     cmcf->shm_zone = NULL;
     *     cmcf->enabled = 0;
     */

    cmcf->redis.db = NGX_CONF_UNSET;
    cmcf->redis.timeout = NGX_CONF_UNSET_MSEC;

    return cmcf;
}


static char *
ngx_http_credits_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_credits_main_conf_t  *cmcf = conf;

    ngx_str_t  name = ngx_string("request_id");

    if (cmcf->redis.host.data == NULL) {
        ngx_str_set(&cmcf->redis.host, "127.0.0.1");
        ngx_str_set(&cmcf->redis.name, "127.0.0.1:6379");
        cmcf->redis.port = 6379;
    }

    ngx_conf_init_value(cmcf->redis.db, 0);
    ngx_conf_init_msec_value(cmcf->redis.timeout, 1000);

    if (cmcf->prefix.data == NULL) {
        ngx_str_set(&cmcf->prefix, "credits:");
    }

    cmcf->prices_key.len = cmcf->prefix.len + sizeof("prices") - 1;
    cmcf->prices_key.data = ngx_pnalloc(cf->pool, cmcf->prices_key.len);
    if (cmcf->prices_key.data == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memcpy(ngx_cpymem(cmcf->prices_key.data, cmcf->prefix.data,
                          cmcf->prefix.len),
               "prices", sizeof("prices") - 1);

    cmcf->request_id_index = ngx_http_get_variable_index(cf, &name);
    if (cmcf->request_id_index == NGX_ERROR) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_credits_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_credits_loc_conf_t  *lcf;

    lcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_credits_loc_conf_t));
    if (lcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     lcf->price = NULL;
     *     lcf->route = { 0, NULL };
     *     lcf->cost_header = { 0, NULL };
     *     lcf->jwt.key = { 0, NULL };
     *     lcf->jwt.algorithms = 0;
     *     lcf->jwt.issuer = { 0, NULL };
     *     lcf->jwt.audience = { 0, NULL };
     *     lcf->jwt.project_claim = { 0, NULL };
     *     lcf->jwt.token = NULL;
     */

    lcf->enable = NGX_CONF_UNSET;
    lcf->hold_ttl = NGX_CONF_UNSET_MSEC;
    lcf->fail = NGX_CONF_UNSET_UINT;
    lcf->jwt.leeway = NGX_CONF_UNSET;
    lcf->jwt.cache_size = NGX_CONF_UNSET_UINT;

    return lcf;
}


static char *
ngx_http_credits_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_credits_loc_conf_t  *prev = parent;
    ngx_http_credits_loc_conf_t  *conf = child;

    ngx_http_core_loc_conf_t          *clcf;
    ngx_http_credits_main_conf_t      *cmcf;
    ngx_http_compile_complex_value_t   ccv;

    static ngx_str_t  one = ngx_string("1");

    ngx_conf_merge_value(conf->enable, prev->enable, 0);
    ngx_conf_merge_msec_value(conf->hold_ttl, prev->hold_ttl, 300000);
    ngx_conf_merge_uint_value(conf->fail, prev->fail,
                              NGX_HTTP_CREDITS_ON_FAIL_CLOSE);
    ngx_conf_merge_str_value(conf->cost_header, prev->cost_header, "");

    if (conf->price == NULL) {
        conf->price = prev->price;
    }

    if (conf->price == NULL) {
        conf->price = ngx_pcalloc(cf->pool, sizeof(ngx_http_complex_value_t));
        if (conf->price == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

        ccv.cf = cf;
        ccv.value = &one;
        ccv.complex_value = conf->price;

        if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
            return NGX_CONF_ERROR;
        }
    }

    /*
     * A route set above is inherited, into nested locations and the "if"
     * and "limit_except" blocks too; a location without one is its own
     * route (a block takes its location's name), not its parent's.
     */

    if (conf->route.data == NULL && !prev->route_default) {
        conf->route = prev->route;
    }

    if (conf->route.data == NULL) {
        clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
        conf->route = clcf->name;
        conf->route_default = 1;
    }

    conf->route_hash = ngx_hash_key(conf->route.data, conf->route.len);

    if (conf->hold_ttl == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"credits_hold_ttl\" must be more than 0");
        return NGX_CONF_ERROR;
    }

    if (conf->jwt.key.data == NULL) {
        conf->jwt.key = prev->jwt.key;
        conf->jwt.key_type = prev->jwt.key_type;
        conf->jwt.key_bits = prev->jwt.key_bits;
    }

    if (conf->jwt.algorithms == 0) {
        conf->jwt.algorithms = prev->jwt.algorithms;
    }

    ngx_conf_merge_str_value(conf->jwt.issuer, prev->jwt.issuer, "");
    ngx_conf_merge_str_value(conf->jwt.audience, prev->jwt.audience, "");
    ngx_conf_merge_str_value(conf->jwt.project_claim, prev->jwt.project_claim,
                             "sub");
    ngx_conf_merge_value(conf->jwt.leeway, prev->jwt.leeway, 0);
    ngx_conf_merge_uint_value(conf->jwt.cache_size, prev->jwt.cache_size,
                              1024);

    if (conf->jwt.token == NULL) {
        conf->jwt.token = prev->jwt.token;
    }

    if (!conf->enable) {
        return NGX_CONF_OK;
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_credits_module);
    cmcf->enabled = 1;

    return ngx_http_credits_jwt_check_conf(cf, &conf->jwt);
}


/* credits_redis ADDR [password=S] [db=N] [timeout=T] */

static char *
ngx_http_credits_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_credits_main_conf_t *cmcf = conf;

    u_char                         *p;
    ngx_url_t                       u;
    ngx_str_t                      *value, s;
    ngx_uint_t                      i;
    ngx_http_credits_redis_conf_t  *rc;

    rc = &cmcf->redis;

    if (rc->host.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    ngx_memzero(&u, sizeof(ngx_url_t));

    u.url = value[1];
    u.default_port = 6379;

    if (ngx_parse_url(cf->pool, &u) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid redis address \"%V\": %s",
                           &u.url, u.err ? u.err : "unknown error");
        return NGX_CONF_ERROR;
    }

    if (u.naddrs == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "redis address \"%V\" has no addresses", &u.url);
        return NGX_CONF_ERROR;
    }

    rc->name = value[1];

    /* resolved here, once: a worker must never wait on DNS */

    p = ngx_pnalloc(cf->pool, NGX_SOCKADDR_STRLEN + 1);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

#if (NGX_HAVE_UNIX_DOMAIN)
    if (u.family == AF_UNIX) {
        rc->unix_socket = 1;
        rc->host.data = p;
        rc->host.len = ngx_cpystrn(p,
                   (u_char *) ((struct sockaddr_un *) u.addrs[0].sockaddr)
                   ->sun_path, NGX_SOCKADDR_STRLEN) - p;
    } else
#endif
    {
        rc->host.data = p;
        rc->host.len = ngx_sock_ntop(u.addrs[0].sockaddr, u.addrs[0].socklen,
                                     p, NGX_SOCKADDR_STRLEN, 0);
        p[rc->host.len] = '\0';
        rc->port = u.port;
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "password=", 9) == 0) {
            rc->password.data = value[i].data + 9;
            rc->password.len = value[i].len - 9;

            if (rc->password.len == 0) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "db=", 3) == 0) {
            rc->db = ngx_atoi(value[i].data + 3, value[i].len - 3);

            if (rc->db == NGX_ERROR) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "timeout=", 8) == 0) {
            s.data = value[i].data + 8;
            s.len = value[i].len - 8;

            rc->timeout = ngx_parse_time(&s, 0);

            if (rc->timeout == (ngx_msec_t) NGX_ERROR || rc->timeout == 0) {
                goto invalid;
            }

            continue;
        }

        goto invalid;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


static char *
ngx_http_credits_price_slot(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_credits_loc_conf_t *lcf = conf;

    ngx_str_t  *value;
    char       *rv;

    rv = ngx_http_set_complex_value_slot(cf, cmd, conf);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    value = cf->args->elts;

    /* a constant price is checked now; a variable one per request */

    if (lcf->price->lengths == NULL
        && ngx_http_credits_parse_amount(value[1].data, value[1].len)
           == NGX_ERROR)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid price \"%V\": a non-negative integer "
                           "or a variable is expected", &value[1]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_credits_key_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_credits_loc_conf_t *lcf = conf;

    ngx_str_t  *value;

    if (lcf->jwt.key.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    return ngx_http_credits_jwt_load_key(cf, &lcf->jwt, &value[1]);
}


static char *
ngx_http_credits_algorithms(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_credits_loc_conf_t *lcf = conf;

    ngx_str_t  *value;

    if (lcf->jwt.algorithms) {
        return "is duplicate";
    }

    value = cf->args->elts;

    return ngx_http_credits_jwt_parse_algorithms(cf, &lcf->jwt, &value[1],
                                                 cf->args->nelts - 1);
}


static ngx_int_t
ngx_http_credits_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt           *h;
    ngx_http_core_main_conf_t     *cmcf;
    ngx_http_credits_main_conf_t  *ccf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_credits_access_handler;

    ccf = ngx_http_conf_get_module_main_conf(cf, ngx_http_credits_module);

    if (ngx_http_credits_status_init_zone(cf, ccf) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_credits_filter_init(cf);
}


static ngx_int_t
ngx_http_credits_init_process(ngx_cycle_t *cycle)
{
    ngx_http_credits_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_credits_module);

    if (cmcf == NULL || !cmcf->enabled) {
        return NGX_OK;
    }

    if (ngx_http_credits_hold_init(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_http_credits_redis_init(cycle, &cmcf->redis) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_credits_prices_init(cycle, cmcf);
}


static void
ngx_http_credits_exit_process(ngx_cycle_t *cycle)
{
    /* batches not sent yet fail with the connection: their holds expire */
    ngx_http_credits_batch_flush();
    ngx_http_credits_redis_exit();
}
