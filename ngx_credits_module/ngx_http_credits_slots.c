
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The router's map: the probe that
 * tells a standalone Redis from a cluster, a cluster's slot map from
 * CLUSTER SLOTS and its refreshes, and the hash slot of a key.
 */


#include "ngx_http_credits_router.h"


static void ngx_http_credits_router_refresh_handler(ngx_event_t *ev);
static ngx_http_credits_node_t *ngx_http_credits_router_source(
    ngx_http_credits_node_t *avoid);
static void ngx_http_credits_router_slots_reply(ngx_http_credits_node_t *node,
    redisReply *reply, void *data);
static void ngx_http_credits_router_apply(ngx_http_credits_node_t *source,
    redisReply *reply);


static uint16_t  ngx_http_credits_crc16_table[256];


/* credits_redis's addresses: resolved here, once, a worker never waits */

void
ngx_http_credits_slots_init(ngx_http_credits_router_t *rt)
{
    uint16_t    crc;
    ngx_uint_t  i, b;

    rt->refresh.handler = ngx_http_credits_router_refresh_handler;
    rt->refresh.log = rt->log;
    rt->refresh.data = rt;
    rt->refresh.cancelable = 1;

    /* CRC16-CCITT (XModem), polynomial 0x1021: Redis Cluster's key hash */

    for (i = 0; i < 256; i++) {
        crc = (uint16_t) (i << 8);

        for (b = 0; b < 8; b++) {
            crc = (crc & 0x8000) ? (uint16_t) ((crc << 1) ^ 0x1021)
                                 : (uint16_t) (crc << 1);
        }

        ngx_http_credits_crc16_table[i] = crc;
    }
}


/*
 * keyHashSlot as Redis computes it: the key's hash tag, the part between
 * the first '{' and the first '}' after it, when that is not empty;
 * otherwise the whole key.
 */

ngx_uint_t
ngx_http_credits_key_slot(u_char *key, size_t len)
{
    u_char    *p, *last, *open, *close;
    uint16_t   crc;

    p = key;
    last = key + len;

    open = ngx_strlchr(key, last, '{');

    if (open) {
        close = ngx_strlchr(open + 1, last, '}');

        if (close && close != open + 1) {
            p = open + 1;
            last = close;
        }
    }

    for (crc = 0; p < last; p++) {
        crc = (uint16_t) (crc << 8)
              ^ ngx_http_credits_crc16_table[((crc >> 8) ^ *p) & 0xff];
    }

    return crc & (NGX_HTTP_CREDITS_SLOTS - 1);
}


/* the node of a master the cluster named; numeric addresses only */

ngx_http_credits_node_t *
ngx_http_credits_router_node(u_char *host, size_t len, in_port_t port)
{
    u_char                          name[NGX_SOCKADDR_STRLEN + 8];
    ngx_uint_t                      i;
    struct in6_addr                 in6;
    ngx_http_credits_redis_addr_t   addr, *a;
    ngx_http_credits_router_t      *rt = ngx_http_credits_router;

    for (i = 0; i < rt->nnodes; i++) {
        a = ngx_http_credits_node_addr(rt->nodes[i]);

        if (!a->unix_socket && a->port == port && a->host.len == len
            && ngx_strncmp(a->host.data, host, len) == 0)
        {
            return rt->nodes[i];
        }
    }

    if (len == 0 || len > NGX_SOCKADDR_STRLEN
        || (ngx_inet_addr(host, len) == INADDR_NONE
            && ngx_inet6_addr(host, len, in6.s6_addr) != NGX_OK))
    {
        ngx_log_error(NGX_LOG_ERR, rt->log, 0,
                      "credits: redis: cluster node \"%*s\" is not a numeric "
                      "address", len, host);
        return NULL;
    }

    addr.host.data = host;
    addr.host.len = len;
    addr.port = port;
    addr.unix_socket = 0;
    addr.name.data = name;
    addr.name.len = ngx_sprintf(name, "%*s:%d", len, host, (int) port) - name;

    if (ngx_http_credits_router_add(&addr) != NGX_OK) {
        return NULL;
    }

    return rt->nodes[rt->nnodes - 1];
}


/* one refresh at a time, at most one a second: others wait for it */

void
ngx_http_credits_router_refresh(ngx_http_credits_node_t *avoid)
{
    ngx_msec_t                  since;
    const char                 *argv[2];
    size_t                      argvlen[2];
    ngx_http_credits_node_t    *source;
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    if (rt->mode != NGX_HTTP_CREDITS_MODE_CLUSTER || rt->refreshing
        || rt->exiting)
    {
        return;
    }

    since = ngx_current_msec - rt->refreshed;

    if (rt->refreshed && since < NGX_HTTP_CREDITS_REFRESH_INTERVAL) {
        if (!rt->refresh.timer_set) {
            ngx_add_timer(&rt->refresh,
                          NGX_HTTP_CREDITS_REFRESH_INTERVAL - since);
        }

        return;
    }

    rt->refreshed = ngx_current_msec;

    source = ngx_http_credits_router_source(avoid);

    argv[0] = "CLUSTER";
    argvlen[0] = 7;
    argv[1] = "SLOTS";
    argvlen[1] = 5;

    if (source == NULL
        || ngx_http_credits_node_internal(source, 2, argv, argvlen,
                                          ngx_http_credits_router_slots_reply,
                                          source)
           != NGX_OK)
    {
        ngx_add_timer(&rt->refresh, NGX_HTTP_CREDITS_REFRESH_INTERVAL);
        return;
    }

    rt->refreshing = 1;
}


static void
ngx_http_credits_router_refresh_handler(ngx_event_t *ev)
{
    ngx_http_credits_router_refresh(NULL);
}


/* a connected node other than "avoid", in turn; else one to connect */

static ngx_http_credits_node_t *
ngx_http_credits_router_source(ngx_http_credits_node_t *avoid)
{
    ngx_uint_t                  i, n, pass;
    ngx_http_credits_node_t    *node;
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    for (pass = 0; pass < 2; pass++) {
        for (n = 0; n < rt->nnodes; n++) {
            i = (rt->source + n) % rt->nnodes;
            node = rt->nodes[i];

            if (node == avoid) {
                continue;
            }

            if (pass == 0
                ? ngx_http_credits_node_state(node) == NGX_HTTP_CREDITS_REDIS_UP
                : ngx_http_credits_node_connect(node)
                  != NGX_HTTP_CREDITS_REDIS_DOWN)
            {
                rt->source = i + 1;
                return node;
            }
        }
    }

    return avoid;
}


static void
ngx_http_credits_router_slots_reply(ngx_http_credits_node_t *node,
    redisReply *reply, void *data)
{
    ngx_str_t                   err;
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    if (rt == NULL || rt->exiting) {
        return;
    }

    rt->refreshing = 0;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY) {
        ngx_log_error(NGX_LOG_ERR, rt->log, 0,
                      "credits: redis %V: CLUSTER SLOTS failed: %s",
                      &ngx_http_credits_node_addr(node)->name,
                      ngx_http_credits_reply_error(reply, &err));

    } else {
        ngx_http_credits_router_apply(node, reply);
    }

    /* a map with holes (a failover under way) is asked for again */
    if (rt->covered < NGX_HTTP_CREDITS_SLOTS && !rt->refresh.timer_set) {
        ngx_add_timer(&rt->refresh, NGX_HTTP_CREDITS_REFRESH_INTERVAL);
    }
}


/* [[start, end, [ip, port, id...], replicas...], ...]: masters only */

static void
ngx_http_credits_router_apply(ngx_http_credits_node_t *source,
    redisReply *reply)
{
    size_t                          i;
    u_char                         *host;
    size_t                          len;
    ngx_int_t                       s, start, end;
    ngx_uint_t                      level;
    redisReply                     *e, *m;
    ngx_http_credits_node_t        *node;
    ngx_http_credits_redis_addr_t  *a;
    ngx_http_credits_router_t      *rt = ngx_http_credits_router;

    ngx_memzero(rt->slots, sizeof(rt->slots));
    rt->covered = 0;

    for (i = 0; i < reply->elements; i++) {
        e = reply->element[i];

        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3
            || e->element[0]->type != REDIS_REPLY_INTEGER
            || e->element[1]->type != REDIS_REPLY_INTEGER
            || e->element[2]->type != REDIS_REPLY_ARRAY
            || e->element[2]->elements < 2
            || e->element[2]->element[0]->type != REDIS_REPLY_STRING
            || e->element[2]->element[1]->type != REDIS_REPLY_INTEGER)
        {
            continue;
        }

        start = (ngx_int_t) e->element[0]->integer;
        end = (ngx_int_t) e->element[1]->integer;
        m = e->element[2];

        if (start < 0 || end >= NGX_HTTP_CREDITS_SLOTS || start > end
            || m->element[1]->integer < 1 || m->element[1]->integer > 65535)
        {
            continue;
        }

        /* an empty address: the node that answered */
        host = (u_char *) m->element[0]->str;
        len = m->element[0]->len;

        if (len == 0) {
            a = ngx_http_credits_node_addr(source);
            host = a->host.data;
            len = a->host.len;
        }

        node = ngx_http_credits_router_node(host, len,
                                       (in_port_t) m->element[1]->integer);
        if (node == NULL) {
            continue;
        }

        for (s = start; s <= end; s++) {
            rt->slots[s] = node;
        }

        rt->covered += end - start + 1;
    }

    level = (rt->covered < NGX_HTTP_CREDITS_SLOTS) ? NGX_LOG_WARN
                                                   : NGX_LOG_INFO;

    ngx_log_error(level, rt->log, 0,
                  "credits: redis cluster: slot map from %V, %ui of %d "
                  "slots served", &ngx_http_credits_node_addr(source)->name,
                  rt->covered, NGX_HTTP_CREDITS_SLOTS);
}


/* the seed's answer to "INFO cluster" */

void
ngx_http_credits_router_probed(ngx_http_credits_node_t *node,
    redisReply *reply)
{
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    if (reply->type != REDIS_REPLY_STRING && reply->type != 5 /* VERB */) {
        return;
    }

    if (ngx_strlcasestrn((u_char *) reply->str,
                         (u_char *) reply->str + reply->len,
                         (u_char *) "cluster_enabled:1", 17 - 1)
        == NULL)
    {
        rt->mode = NGX_HTTP_CREDITS_MODE_STANDALONE;
        return;
    }

    ngx_http_credits_node_keep(node, 0, 0);

    if (rt->conf->db) {
        ngx_log_error(NGX_LOG_ERR, rt->log, 0,
                      "credits: redis %V is a Redis Cluster, which has no "
                      "db %i: metered locations fail per credits_fail",
                      &ngx_http_credits_node_addr(node)->name, rt->conf->db);

        rt->mode = NGX_HTTP_CREDITS_MODE_BROKEN;
        return;
    }

    if (rt->mode != NGX_HTTP_CREDITS_MODE_CLUSTER) {
        ngx_log_error(NGX_LOG_INFO, rt->log, 0,
                      "credits: redis %V is a Redis Cluster",
                      &ngx_http_credits_node_addr(node)->name);

        rt->mode = NGX_HTTP_CREDITS_MODE_CLUSTER;
    }

    rt->refreshed = 0;
    ngx_http_credits_router_refresh(NULL);
}


void
ngx_http_credits_router_node_changed(ngx_http_credits_node_t *node)
{
    ngx_http_credits_router_count();
}


/*
 * A connection is gone.  A seed that could not be reached hands over to
 * the next address; a cluster asks another node for the map.
 */

void
ngx_http_credits_router_node_lost(ngx_http_credits_node_t *node,
    ngx_uint_t was_up)
{
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    if (rt == NULL || rt->exiting) {
        return;
    }

    ngx_http_credits_router_count();

    if (rt->mode == NGX_HTTP_CREDITS_MODE_CLUSTER) {
        ngx_http_credits_router_refresh(node);
        return;
    }

    if (rt->sentinel) {
        ngx_http_credits_sentinel_lost(node);
        return;
    }

    if (rt->mode == NGX_HTTP_CREDITS_MODE_BROKEN || was_up
        || rt->nseeds < 2 || node != rt->nodes[rt->seed])
    {
        return;
    }

    ngx_http_credits_node_keep(node, 0, 0);

    rt->seed = (rt->seed + 1) % rt->nseeds;

    ngx_log_error(NGX_LOG_NOTICE, rt->log, 0,
                  "credits: redis: trying %V next",
                  &ngx_http_credits_node_addr(rt->nodes[rt->seed])->name);

    ngx_http_credits_node_keep(rt->nodes[rt->seed], 1, 1);
}


/* credits_redis_up: some node is connected; reconnects of all of them */

void
ngx_http_credits_router_count(void)
{
    ngx_uint_t                  i, up, reconnects;
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    up = 0;
    reconnects = 0;

    for (i = 0; i < rt->nnodes; i++) {
        if (ngx_http_credits_node_state(rt->nodes[i])
            == NGX_HTTP_CREDITS_REDIS_UP)
        {
            up = 1;
        }

        reconnects += ngx_http_credits_node_reconnects(rt->nodes[i]);
    }

    ngx_http_credits_count_redis(up, reconnects);
}
