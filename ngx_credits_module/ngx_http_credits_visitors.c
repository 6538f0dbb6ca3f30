
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Visitors and budgets: the window counters a hold is counted in.
 *
 * "credits_visitor_limit N per TIME" caps what one visitor spends of the
 * project per window, "credits_budget N per TIME" what all of them spend
 * together; windows are fixed, TIME long, aligned on the Unix epoch (UTC).
 * The hold script checks the counters, the balance, and places the hold
 * in all of them or in none, in the one call the hold makes anyway.  The
 * hold's member names its counters (lua/expire.lua), so that whatever
 * gives credits back to the balance (release, expiry, the part of a
 * commit above the cost) gives them back to the counters too.
 *
 * A visitor value never reaches a key as it is: it is hashed with a key
 * of this deployment, SipHash-2-4-128 keyed by k of project || NUL ||
 * value, k being the first 16 bytes of the SHA-256 of a label and the
 * location's JWT key file, and the hash, in hex, names the visitor.
 * Hashes of one visitor in two
 * projects differ; without the JWT key nobody can tell which address or
 * cookie a hash stands for (with a public key file, whoever holds that
 * file can: see docs/deployment.md).
 */


#include "ngx_http_credits_module.h"

#include <openssl/evp.h>


#define NGX_HTTP_CREDITS_PERIOD_MAX    (30 * 86400)
#define NGX_HTTP_CREDITS_NAME_MAX      128
#define NGX_HTTP_CREDITS_VISITOR_LEN   16       /* bytes of the hash kept */


static ngx_int_t ngx_http_credits_counter_name(ngx_conf_t *cf,
    ngx_http_credits_limit_t *l, ngx_str_t *route, const char *directive);
static ngx_str_t *ngx_http_credits_limit_name(ngx_http_credits_limit_t *l,
    ngx_http_credits_loc_conf_t *lcf);
static u_char *ngx_http_credits_ref(u_char *p, u_char kind,
    ngx_http_credits_limit_t *l, ngx_http_credits_loc_conf_t *lcf,
    time_t start);
static ngx_int_t ngx_http_credits_visitor_id(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_http_credits_loc_conf_t *lcf,
    u_char *id);
static ngx_int_t ngx_http_credits_sha256(ngx_str_t *parts, ngx_uint_t n,
    u_char *digest);


static ngx_str_t  ngx_http_credits_visitor_label =
    ngx_string("ngx_http_credits_module visitor id");


/* N per TIME [name=S] */

char *
ngx_http_credits_limit_slot(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char  *p = conf;

    ngx_str_t                 *value, s;
    ngx_int_t                  period;
    ngx_http_credits_limit_t  *l;

    l = (ngx_http_credits_limit_t *) (p + cmd->offset);

    if (l->limit != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    value = cf->args->elts;

    l->limit = ngx_http_credits_parse_amount(value[1].data, value[1].len);

    if (l->limit == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid number \"%V\": a non-negative integer "
                           "of at most 15 digits is expected", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (value[2].len != 3 || ngx_strncmp(value[2].data, "per", 3) != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"per\" expected instead of \"%V\"", &value[2]);
        return NGX_CONF_ERROR;
    }

    period = ngx_parse_time(&value[3], 1);

    if (period == NGX_ERROR || period < 1
        || period > NGX_HTTP_CREDITS_PERIOD_MAX)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid period \"%V\": from 1s to 30d",
                           &value[3]);
        return NGX_CONF_ERROR;
    }

    l->period = (time_t) period;

    if (cf->args->nelts == 4) {
        return NGX_CONF_OK;
    }

    if (value[4].len <= 5 || ngx_strncmp(value[4].data, "name=", 5) != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[4]);
        return NGX_CONF_ERROR;
    }

    s.data = value[4].data + 5;
    s.len = value[4].len - 5;
    l->name = s;

    return NGX_CONF_OK;
}


char *
ngx_http_credits_merge_limits(ngx_conf_t *cf,
    ngx_http_credits_loc_conf_t *prev, ngx_http_credits_loc_conf_t *conf)
{
    ngx_str_t                 parts[2], *route;
    ngx_http_core_loc_conf_t  *clcf;

    if (conf->visitor == NULL) {
        conf->visitor = prev->visitor;
    }

    if (conf->visitor_limit.limit == NGX_CONF_UNSET) {
        conf->visitor_limit = prev->visitor_limit;
    }

    if (conf->budget.limit == NGX_CONF_UNSET) {
        conf->budget = prev->budget;
    }

    if (!conf->enable) {
        return NGX_CONF_OK;
    }

    /*
     * A server's own configuration has no route to name counters by: its
     * locations name their own, and a request that matches none is
     * refused (ngx_http_credits_counters())
     */
    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    route = (clcf->name.len || conf->route.len) ? &conf->route : NULL;

    if (ngx_http_credits_counter_name(cf, &conf->budget, route,
                                      "credits_budget")
        != NGX_OK
        || ngx_http_credits_counter_name(cf, &conf->visitor_limit, route,
                                         "credits_visitor_limit")
           != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    if (conf->visitor_limit.limit == NGX_CONF_UNSET) {
        return NGX_CONF_OK;
    }

    if (conf->visitor == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"credits_visitor_limit\" needs "
                           "\"credits_visitor\": who is the visitor?");
        return NGX_CONF_ERROR;
    }

    if (conf->jwt.key.len == 0) {
        /* ngx_http_credits_jwt_check_conf() says what is missing */
        return NGX_CONF_OK;
    }

    conf->visitor_key = ngx_pnalloc(cf->pool, NGX_HTTP_CREDITS_DIGEST_LEN);
    if (conf->visitor_key == NULL) {
        return NGX_CONF_ERROR;
    }

    parts[0] = ngx_http_credits_visitor_label;
    parts[1] = conf->jwt.key;

    if (ngx_http_credits_sha256(parts, 2, conf->visitor_key) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * A counter's name is part of its key and of the hold's member: letters,
 * digits and "._/@~-" only (a route that has others needs "name=").
 * route: NULL where there is none (a server's own configuration).
 */

static ngx_int_t
ngx_http_credits_counter_name(ngx_conf_t *cf, ngx_http_credits_limit_t *l,
    ngx_str_t *route, const char *directive)
{
    u_char     c;
    ngx_str_t  *name;
    ngx_uint_t  i;

    if (l->limit == NGX_CONF_UNSET) {
        return NGX_OK;
    }

    name = l->name.len ? &l->name : route;

    if (name == NULL) {
        return NGX_OK;
    }

    for (i = 0; i < name->len; i++) {
        c = name->data[i];

        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
            || (c >= '0' && c <= '9') || ngx_strchr("._/@~-", c) != NULL)
        {
            continue;
        }

        break;
    }

    if (name->len == 0 || name->len > NGX_HTTP_CREDITS_NAME_MAX
        || i < name->len)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%s\": \"%V\" cannot name counters: up to %d "
                           "letters, digits and \"._/@~-\"%s", directive,
                           name, NGX_HTTP_CREDITS_NAME_MAX,
                           l->name.len ? "" : " (set name=)");
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_str_t *
ngx_http_credits_limit_name(ngx_http_credits_limit_t *l,
    ngx_http_credits_loc_conf_t *lcf)
{
    return l->name.len ? &l->name : &lcf->route;
}


/*
 * The request's counters in this location, for the hold or the move: the
 * refs its member carries (";v,NAME,PERIOD,START,ID" for the visitor,
 * ";b,NAME,PERIOD,START" for the budget).
 */

ngx_int_t
ngx_http_credits_counters(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx,
    ngx_http_credits_loc_conf_t *lcf)
{
    u_char                    *p, id[2 * NGX_HTTP_CREDITS_VISITOR_LEN];
    time_t                     now, start;
    ngx_uint_t                 i;
    ngx_http_credits_limit_t  *l[2];

    ngx_str_null(&ctx->refs);

    l[0] = &lcf->visitor_limit;
    l[1] = &lcf->budget;

    if (l[0]->limit == NGX_CONF_UNSET && l[1]->limit == NGX_CONF_UNSET) {
        return NGX_OK;
    }

    if (l[0]->limit != NGX_CONF_UNSET
        && ngx_http_credits_visitor_id(r, ctx, lcf, id) != NGX_OK)
    {
        return NGX_ERROR;
    }

    p = ngx_pnalloc(r->pool, 2 * (sizeof(";v,,,") - 1
                                  + NGX_HTTP_CREDITS_NAME_MAX
                                  + 2 * NGX_INT_T_LEN)
                             + 1 + sizeof(id));
    if (p == NULL) {
        return NGX_ERROR;
    }

    ctx->refs.data = p;

    now = ngx_time();

    for (i = 0; i < 2; i++) {
        if (l[i]->limit == NGX_CONF_UNSET) {
            continue;
        }

        if (ngx_http_credits_limit_name(l[i], lcf)->len == 0) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "credits: the request matches no location, "
                          "whose route would name the counters of "
                          "\"%s\": set name=",
                          i ? "credits_budget" : "credits_visitor_limit");
            return NGX_ERROR;
        }

        start = now - now % l[i]->period;
        ctx->ends[i] = start + l[i]->period;

        *p++ = ';';
        p = ngx_http_credits_ref(p, i ? 'b' : 'v', l[i], lcf, start);

        if (i == 0) {
            *p++ = ',';
            p = ngx_cpymem(p, id, sizeof(id));
        }
    }

    ctx->refs.len = p - ctx->refs.data;

    return NGX_OK;
}


/* the limits of the location's counters, "N,M" in the refs' order (move) */

ngx_int_t
ngx_http_credits_counter_limits(ngx_http_request_t *r,
    ngx_http_credits_loc_conf_t *lcf, ngx_str_t *limits)
{
    u_char                    *p;
    ngx_uint_t                 i;
    ngx_http_credits_limit_t  *l[2];

    l[0] = &lcf->visitor_limit;
    l[1] = &lcf->budget;

    p = ngx_pnalloc(r->pool, 2 * (NGX_INT_T_LEN + 1));
    if (p == NULL) {
        return NGX_ERROR;
    }

    limits->data = p;

    for (i = 0; i < 2; i++) {
        if (l[i]->limit == NGX_CONF_UNSET) {
            continue;
        }

        if (p != limits->data) {
            *p++ = ',';
        }

        p = ngx_http_credits_write_int(p, l[i]->limit);
    }

    limits->len = p - limits->data;

    return NGX_OK;
}


/*
 * The hold script's arguments for the request's counters, the ones its
 * member's refs name, ready for use: key (base "credits:{P}:" and the ref
 * with ':' for ','), limit, PXAT of the key (a minute after the window),
 * and the budget's name ("" for the visitor's limit).  Returns how many
 * counters, or NGX_ERROR.
 */

ngx_int_t
ngx_http_credits_counter_args(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_http_credits_loc_conf_t *lcf,
    ngx_str_t *base, ngx_str_t *args)
{
    u_char                    *p, *ref, *end, *last;
    ngx_uint_t                 n, visitor;
    ngx_http_credits_limit_t  *l;

    if (ctx->refs.len == 0) {
        return 0;
    }

    p = ngx_pnalloc(r->pool, 2 * (base->len + 2 * NGX_INT_T_LEN)
                             + ctx->refs.len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    n = 0;
    last = ctx->refs.data + ctx->refs.len;

    /* ";ref;ref": each ref after its ';' */

    for (ref = ctx->refs.data + 1; ref < last; ref = end + 1) {
        end = ngx_strlchr(ref, last, ';');
        end = end ? end : last;

        visitor = (*ref == 'v');
        l = visitor ? &lcf->visitor_limit : &lcf->budget;

        args[0].data = p;
        p = ngx_cpymem(p, base->data, base->len);

        for ( /* void */ ; ref < end; ref++) {
            *p++ = (*ref == ',') ? ':' : *ref;
        }

        args[0].len = p - args[0].data;

        args[1].data = p;
        p = ngx_http_credits_write_int(p, l->limit);
        args[1].len = p - args[1].data;

        args[2].data = p;
        p = ngx_http_credits_write_int(p,
                              (ngx_int_t) ctx->ends[visitor ? 0 : 1] * 1000
                              + 60000);
        args[2].len = p - args[2].data;

        if (visitor) {
            ngx_str_null(&args[3]);

        } else {
            args[3] = *ngx_http_credits_limit_name(l, lcf);
        }

        args += 4;
        n++;
    }

    return n;
}


/* a counter "KIND,NAME,PERIOD,START", as a member's ref names it */

static u_char *
ngx_http_credits_ref(u_char *p, u_char kind, ngx_http_credits_limit_t *l,
    ngx_http_credits_loc_conf_t *lcf, time_t start)
{
    ngx_str_t  *name;

    name = ngx_http_credits_limit_name(l, lcf);

    *p++ = kind;
    *p++ = ',';
    p = ngx_cpymem(p, name->data, name->len);
    *p++ = ',';
    p = ngx_http_credits_write_int(p, (ngx_int_t) l->period);
    *p++ = ',';

    return ngx_http_credits_write_int(p, (ngx_int_t) start);
}


/*
 * The visitor's id: hex of the keyed hash (SipHash-2-4-128, keyed by the
 * first 16 bytes of the location's visitor key) of the project and the
 * value, whatever bytes the value has
 */

static ngx_int_t
ngx_http_credits_visitor_id(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_http_credits_loc_conf_t *lcf, u_char *id)
{
    u_char     hash[NGX_HTTP_CREDITS_VISITOR_LEN];
    ngx_str_t  parts[3];

    if (lcf->visitor_key == NULL) {
        return NGX_ERROR;
    }

    parts[0] = ctx->project;
    parts[1].data = (u_char *) "";
    parts[1].len = 1;

    if (ngx_http_complex_value(r, lcf->visitor, &parts[2]) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_http_credits_siphash(lcf->visitor_key, parts, 3, hash);
    ngx_hex_dump(id, hash, NGX_HTTP_CREDITS_VISITOR_LEN);

    return NGX_OK;
}


/*
 * The SHA-256 of the parts, one after the other: the visitor key, once
 * per location at configuration time.
 */

static ngx_int_t
ngx_http_credits_sha256(ngx_str_t *parts, ngx_uint_t n, u_char *digest)
{
    ngx_int_t    rc;
    ngx_uint_t   i;
    EVP_MD_CTX  *ctx;

    ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        return NGX_ERROR;
    }

    rc = (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1) ? NGX_OK
                                                          : NGX_ERROR;

    for (i = 0; rc == NGX_OK && i < n; i++) {
        if (EVP_DigestUpdate(ctx, parts[i].data, parts[i].len) != 1) {
            rc = NGX_ERROR;
        }
    }

    if (rc == NGX_OK && EVP_DigestFinal_ex(ctx, digest, NULL) != 1) {
        rc = NGX_ERROR;
    }

    EVP_MD_CTX_free(ctx);

    return rc;
}


/* the hold script's code 2 or 3: a 429, never a charge */

void
ngx_http_credits_limited(ngx_http_credits_ctx_t *ctx, ngx_int_t code,
    ngx_int_t limit)
{
    ngx_http_credits_outcome_e  outcome;

    outcome = (code == NGX_HTTP_CREDITS_OVER_VISITOR)
              ? NGX_HTTP_CREDITS_VISITOR_LIMITED
              : NGX_HTTP_CREDITS_BUDGET_EXHAUSTED;

    ctx->limit = limit;
    ctx->over_visitor = (code == NGX_HTTP_CREDITS_OVER_VISITOR);
    ctx->retry_at = ctx->ends[code == NGX_HTTP_CREDITS_OVER_VISITOR ? 0 : 1];
    ctx->rc = NGX_HTTP_TOO_MANY_REQUESTS;

    /* a move's hold stays until the 429 releases it: that is its outcome */
    if (!ctx->held) {
        ctx->outcome = outcome;
    }

    ngx_http_credits_count_outcome(outcome);
}


/* seconds to the end of the window that refused the request, at least 1 */

time_t
ngx_http_credits_window_left(ngx_http_credits_ctx_t *ctx)
{
    return ngx_max(ctx->retry_at - ngx_time(), 1);
}
