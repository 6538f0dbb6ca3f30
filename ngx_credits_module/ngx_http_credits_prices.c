
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Runtime prices: every worker reads the prices hash on a timer, about
 * once a second, and keeps the overrides in its own memory, so that a
 * request never waits for a price.  When Redis cannot be read the last
 * known overrides stay in force.
 */


#include "ngx_http_credits_module.h"


#define NGX_HTTP_CREDITS_PRICES_INTERVAL  1000


typedef struct {
    ngx_str_t       route;
    ngx_uint_t      hash;
    ngx_int_t       price;
} ngx_http_credits_override_t;


typedef struct {
    ngx_event_t                     timer;
    ngx_str_t                       key;
    ngx_pool_t                     *pool;        /* holds the overrides */
    ngx_array_t                    *overrides;   /* of override_t */
    ngx_uint_t                      in_flight;
} ngx_http_credits_prices_t;


static void ngx_http_credits_prices_refresh(ngx_event_t *ev);
static void ngx_http_credits_prices_handler(ngx_http_credits_redis_cmd_t *cmd,
    redisReply *reply);


static ngx_http_credits_prices_t  ngx_http_credits_prices;


ngx_int_t
ngx_http_credits_prices_init(ngx_cycle_t *cycle,
    ngx_http_credits_main_conf_t *cmcf)
{
    ngx_http_credits_prices_t  *pr = &ngx_http_credits_prices;

    ngx_memzero(pr, sizeof(ngx_http_credits_prices_t));

    pr->key = cmcf->prices_key;

    pr->timer.handler = ngx_http_credits_prices_refresh;
    pr->timer.log = cycle->log;
    pr->timer.data = pr;
    pr->timer.cancelable = 1;

    /* the first read goes out as soon as the connection is up */
    ngx_add_timer(&pr->timer, 1);

    return NGX_OK;
}


ngx_int_t
ngx_http_credits_price_override(ngx_str_t *route, ngx_uint_t hash)
{
    ngx_uint_t                    i;
    ngx_http_credits_override_t  *o;

    if (ngx_http_credits_prices.overrides == NULL) {
        return NGX_DECLINED;
    }

    o = ngx_http_credits_prices.overrides->elts;

    for (i = 0; i < ngx_http_credits_prices.overrides->nelts; i++) {
        if (o[i].hash == hash
            && o[i].route.len == route->len
            && ngx_strncmp(o[i].route.data, route->data, route->len) == 0)
        {
            return o[i].price;
        }
    }

    return NGX_DECLINED;
}


static void
ngx_http_credits_prices_refresh(ngx_event_t *ev)
{
    const char                 *argv[2];
    size_t                      argvlen[2];
    ngx_http_credits_prices_t  *pr = ev->data;

    if (ngx_exiting) {
        return;
    }

    if (!pr->in_flight) {
        argv[0] = "HGETALL";
        argvlen[0] = 7;
        argv[1] = (const char *) pr->key.data;
        argvlen[1] = pr->key.len;

        /* from the node that owns the key, in a cluster */
        if (ngx_http_credits_redis_command(&pr->key, NULL, 2, argv, argvlen,
                                           ngx_http_credits_prices_handler,
                                           pr)
            == NGX_OK)
        {
            pr->in_flight = 1;
        }
    }

    ngx_add_timer(&pr->timer, NGX_HTTP_CREDITS_PRICES_INTERVAL);
}


static void
ngx_http_credits_prices_handler(ngx_http_credits_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_pool_t                 *pool;
    ngx_array_t                *overrides;
    ngx_http_credits_prices_t  *pr = cmd->data;

    pr->in_flight = 0;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY) {
        return;
    }

    pool = ngx_create_pool(1024, ngx_cycle->log);
    if (pool == NULL) {
        return;
    }

    overrides = ngx_http_credits_prices_parse(reply, pool);
    if (overrides == NULL) {
        ngx_destroy_pool(pool);
        return;
    }

    if (pr->pool) {
        ngx_destroy_pool(pr->pool);
    }

    pr->pool = pool;
    pr->overrides = overrides;
}


/* route -> price pairs; a value that is not a price is skipped, logged */

ngx_array_t *
ngx_http_credits_prices_parse(redisReply *reply, ngx_pool_t *pool)
{
    size_t                        i;
    ngx_int_t                     price;
    redisReply                   *name, *value;
    ngx_array_t                  *a;
    ngx_http_credits_override_t  *o;

    a = ngx_array_create(pool, reply->elements / 2 + 1,
                         sizeof(ngx_http_credits_override_t));
    if (a == NULL) {
        return NULL;
    }

    for (i = 0; i + 1 < reply->elements; i += 2) {
        name = reply->element[i];
        value = reply->element[i + 1];

        if (name->type != REDIS_REPLY_STRING
            || value->type != REDIS_REPLY_STRING)
        {
            continue;
        }

        price = ngx_http_credits_parse_amount((u_char *) value->str,
                                              value->len);

        if (price == NGX_ERROR) {
            ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                          "credits: ignoring price override \"%*s\" for "
                          "route \"%*s\": not a non-negative integer",
                          value->len, value->str, name->len, name->str);
            continue;
        }

        o = ngx_array_push(a);
        if (o == NULL) {
            return NULL;
        }

        o->route.len = name->len;
        o->route.data = ngx_pnalloc(pool, name->len);
        if (o->route.data == NULL) {
            return NULL;
        }

        ngx_memcpy(o->route.data, name->str, name->len);
        o->hash = ngx_hash_key(o->route.data, o->route.len);
        o->price = price;
    }

    return a;
}
