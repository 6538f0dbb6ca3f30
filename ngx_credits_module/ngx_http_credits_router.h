
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The router's state, shared by the command side (ngx_http_credits_
 * router.c) and the slot map's (ngx_http_credits_slots.c).
 */


#ifndef _NGX_HTTP_CREDITS_ROUTER_H_INCLUDED_
#define _NGX_HTTP_CREDITS_ROUTER_H_INCLUDED_


#include "ngx_http_credits_module.h"


#define NGX_HTTP_CREDITS_SLOTS             16384
#define NGX_HTTP_CREDITS_NODES_MAX         256
#define NGX_HTTP_CREDITS_REFRESH_INTERVAL  1000
#define NGX_HTTP_CREDITS_HOPS_MAX          8
#define NGX_HTTP_CREDITS_PAUSE_MIN         10
#define NGX_HTTP_CREDITS_PAUSE_MAX         200


typedef enum {
    NGX_HTTP_CREDITS_MODE_UNKNOWN = 0,
    NGX_HTTP_CREDITS_MODE_STANDALONE,
    NGX_HTTP_CREDITS_MODE_CLUSTER,
    NGX_HTTP_CREDITS_MODE_BROKEN         /* misconfigured: nothing is sent */
} ngx_http_credits_mode_e;


typedef struct {
    ngx_http_credits_redis_conf_t  *conf;
    ngx_log_t                      *log;
    ngx_http_credits_mode_e         mode;

    ngx_http_credits_node_t       **nodes;      /* seeds first */
    ngx_uint_t                      nnodes;
    ngx_uint_t                      nseeds;
    ngx_uint_t                      seed;       /* the one in use */
    ngx_uint_t                      source;     /* next to ask for the map */

    ngx_http_credits_node_t        *slots[NGX_HTTP_CREDITS_SLOTS];
    ngx_uint_t                      covered;

    struct ngx_http_credits_sentinel_s  *sentinel;  /* sentinel= */

    ngx_event_t                     refresh;
    ngx_msec_t                      refreshed;  /* last asked */
    unsigned                        refreshing:1;
    unsigned                        exiting:1;
} ngx_http_credits_router_t;


extern ngx_http_credits_router_t  *ngx_http_credits_router;


void ngx_http_credits_slots_init(ngx_http_credits_router_t *rt);
ngx_int_t ngx_http_credits_router_add(ngx_http_credits_redis_addr_t *addr);
ngx_http_credits_node_t *ngx_http_credits_router_node(u_char *host,
    size_t len, in_port_t port);
void ngx_http_credits_router_refresh(ngx_http_credits_node_t *avoid);
void ngx_http_credits_router_count(void);

ngx_int_t ngx_http_credits_sentinel_init(ngx_http_credits_router_t *rt);
void ngx_http_credits_sentinel_exit(ngx_http_credits_router_t *rt);
void ngx_http_credits_sentinel_lost(ngx_http_credits_node_t *node);


#endif /* _NGX_HTTP_CREDITS_ROUTER_H_INCLUDED_ */
