
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Directives, configuration, and the wiring of the module's parts into
 * nginx's phases, filters and processes.
 */


#include "ngx_http_credits_module.h"


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

    { ngx_string("credits_cost_event"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_credits_cost_event_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, cost_event),
      NULL },

    { ngx_string("credits_hold_step"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_credits_step_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, hold_step),
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

    { ngx_string("credits_redis_ssl_verify"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_credits_main_conf_t, redis.ssl_verify),
      NULL },

    { ngx_string("credits_redis_ssl_verify_depth"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_credits_main_conf_t, redis.ssl_verify_depth),
      NULL },

    { ngx_string("credits_redis_ssl_name"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_credits_main_conf_t, redis.ssl_name),
      NULL },

    { ngx_string("credits_redis_ssl_trusted_certificate"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_credits_main_conf_t, redis.ssl_trusted_certificate),
      NULL },

    { ngx_string("credits_redis_ssl_certificate"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_credits_main_conf_t, redis.ssl_certificate),
      NULL },

    { ngx_string("credits_redis_ssl_certificate_key"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_credits_main_conf_t, redis.ssl_certificate_key),
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

    { ngx_string("credits_visitor"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, visitor),
      NULL },

    { ngx_string("credits_visitor_limit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF
                        |NGX_CONF_TAKE3|NGX_CONF_TAKE4,
      ngx_http_credits_limit_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, visitor_limit),
      NULL },

    { ngx_string("credits_budget"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF
                        |NGX_CONF_TAKE3|NGX_CONF_TAKE4,
      ngx_http_credits_limit_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_credits_loc_conf_t, budget),
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


static ngx_int_t
ngx_http_credits_init(ngx_conf_t *cf)
{
    ngx_http_credits_main_conf_t  *ccf;

    if (ngx_http_credits_access_init(cf) != NGX_OK) {
        return NGX_ERROR;
    }

    ccf = ngx_http_conf_get_module_main_conf(cf, ngx_http_credits_module);

    if (ngx_http_credits_redis_postconf(cf, &ccf->redis) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_http_credits_status_init_zone(cf, ccf) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_http_credits_filter_init(cf) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_credits_stream_init(cf);
}


static ngx_int_t
ngx_http_credits_init_process(ngx_cycle_t *cycle)
{
    ngx_http_credits_main_conf_t  *cmcf;

    /* the cache manager and loader serve no requests: no Redis there */
    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    cmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_credits_module);

    if (cmcf == NULL || !cmcf->enabled) {
        return NGX_OK;
    }

    if (ngx_http_credits_hold_init(cycle) != NGX_OK
        || ngx_http_credits_settle_init(cycle, cmcf->redis.timeout) != NGX_OK)
    {
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
