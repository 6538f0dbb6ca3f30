
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Configuration: the main and location confs created and merged the
 * nginx way, and the directives that need more than nginx's own slots.
 * The directive table itself is in ngx_http_credits_module.c.
 */


#include "ngx_http_credits_module.h"


void *
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
     *     cmcf->prefix = { 0, NULL };
     *     cmcf->shm_zone = NULL;
     *     cmcf->enabled = 0;
     */

    ngx_http_credits_redis_create_conf(&cmcf->redis);

    return cmcf;
}


char *
ngx_http_credits_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_credits_main_conf_t  *cmcf = conf;

    ngx_str_t  name = ngx_string("request_id");

    if (ngx_http_credits_redis_init_conf(cf, &cmcf->redis) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

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


void *
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
     *     lcf->cost_event = { 0, NULL };
     *     lcf->jwt.key = { 0, NULL };
     *     lcf->jwt.algorithms = 0;
     *     lcf->jwt.issuer = { 0, NULL };
     *     lcf->jwt.audience = { 0, NULL };
     *     lcf->jwt.project_claim = { 0, NULL };
     *     lcf->jwt.token = NULL;
     *     lcf->visitor = NULL;
     *     lcf->visitor_limit.name = { 0, NULL };
     *     lcf->budget.name = { 0, NULL };
     *     lcf->visitor_key = NULL;
     */

    lcf->enable = NGX_CONF_UNSET;
    lcf->hold_ttl = NGX_CONF_UNSET_MSEC;
    lcf->hold_step = NGX_CONF_UNSET;
    lcf->fail = NGX_CONF_UNSET_UINT;
    lcf->jwt.leeway = NGX_CONF_UNSET;
    lcf->jwt.cache_size = NGX_CONF_UNSET_UINT;
    lcf->visitor_limit.limit = NGX_CONF_UNSET;
    lcf->budget.limit = NGX_CONF_UNSET;

    return lcf;
}


char *
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
    ngx_conf_merge_str_value(conf->cost_event, prev->cost_event, "");
    ngx_conf_merge_value(conf->hold_step, prev->hold_step, 0);

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
                              16384);

    if (conf->jwt.token == NULL) {
        conf->jwt.token = prev->jwt.token;
    }

    if (ngx_http_credits_merge_limits(cf, prev, conf) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    if (!conf->enable) {
        return NGX_CONF_OK;
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_credits_module);
    cmcf->enabled = 1;

    return ngx_http_credits_jwt_check_conf(cf, &conf->jwt);
}


char *
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


/* credits_hold_step N: a positive number of credits */

char *
ngx_http_credits_step_slot(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_credits_loc_conf_t *lcf = conf;

    ngx_str_t  *value;

    if (lcf->hold_step != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    value = cf->args->elts;

    lcf->hold_step = ngx_http_credits_parse_amount(value[1].data,
                                                   value[1].len);

    if (lcf->hold_step == NGX_ERROR || lcf->hold_step == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid credits_hold_step \"%V\": a positive "
                           "integer is expected", &value[1]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* credits_cost_event NAME: a name an "event:" line can carry */

char *
ngx_http_credits_cost_event_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_credits_loc_conf_t *lcf = conf;

    ngx_str_t  *value;

    if (lcf->cost_event.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 0
        || ngx_strlchr(value[1].data, value[1].data + value[1].len, '\r')
        || ngx_strlchr(value[1].data, value[1].data + value[1].len, '\n'))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid credits_cost_event \"%V\": an event "
                           "name without line ends is expected", &value[1]);
        return NGX_CONF_ERROR;
    }

    lcf->cost_event = value[1];

    return NGX_CONF_OK;
}


char *
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


char *
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
