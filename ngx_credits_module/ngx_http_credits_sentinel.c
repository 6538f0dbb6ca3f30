
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Redis Sentinel: "credits_redis sentinel=NAME ADDR..." names sentinels,
 * and the router's one node is the master they name.  A sentinel is asked
 * with SENTINEL get-master-addr-by-name, in turn; the master answers ROLE
 * before anything else (ngx_http_credits_handshake.c), so a replica is
 * never charged on.  One sentinel connection is subscribed to
 * +switch-master and moves the router to the new master at once; a lost
 * master, or one that says READONLY, makes the sentinels be asked again,
 * once a second until the master is back.
 *
 * A master replaced is freed: its commands in flight fail as with any
 * lost connection (holds are released once Redis is reachable again).
 */


#include "ngx_http_credits_router.h"


#define NGX_HTTP_CREDITS_SENTINEL_RETRY  1000


typedef struct ngx_http_credits_sentinel_s {
    ngx_http_credits_node_t  **nodes;
    ngx_uint_t                 nnodes;
    ngx_uint_t                 next;       /* the sentinel asked next */
    ngx_http_credits_node_t   *listener;   /* subscribed */
    ngx_event_t                timer;      /* ask again */
    unsigned                   asking:1;
} ngx_http_credits_sentinel_t;


static void ngx_http_credits_sentinel_ask(ngx_http_credits_router_t *rt);
static void ngx_http_credits_sentinel_timer_handler(ngx_event_t *ev);
static void ngx_http_credits_sentinel_reply(ngx_http_credits_node_t *node,
    redisReply *reply, void *data);
static void ngx_http_credits_sentinel_listen(ngx_http_credits_router_t *rt,
    ngx_http_credits_node_t *node);
static void ngx_http_credits_sentinel_message(ngx_http_credits_node_t *node,
    redisReply *reply, void *data);
static void ngx_http_credits_sentinel_master(ngx_http_credits_router_t *rt,
    u_char *host, size_t len, ngx_int_t port);


ngx_int_t
ngx_http_credits_sentinel_init(ngx_http_credits_router_t *rt)
{
    ngx_uint_t                      i, n;
    ngx_http_credits_sentinel_t    *st;
    ngx_http_credits_redis_addr_t  *addr;

    n = rt->conf->addrs->nelts;
    addr = rt->conf->addrs->elts;

    st = ngx_calloc(sizeof(ngx_http_credits_sentinel_t) + n * sizeof(void *),
                    rt->log);
    if (st == NULL) {
        return NGX_ERROR;
    }

    st->nodes = (ngx_http_credits_node_t **) (st + 1);

    st->timer.handler = ngx_http_credits_sentinel_timer_handler;
    st->timer.data = rt;
    st->timer.log = rt->log;
    st->timer.cancelable = 1;

    rt->sentinel = st;

    for (i = 0; i < n; i++) {
        st->nodes[i] = ngx_http_credits_node_create(&addr[i], rt->conf,
                                                    rt->log);
        if (st->nodes[i] == NULL) {
            return NGX_ERROR;
        }

        st->nnodes++;

        ngx_http_credits_node_role(st->nodes[i],
                                   NGX_HTTP_CREDITS_NODE_SENTINEL, NULL, NULL);
    }

    ngx_http_credits_sentinel_ask(rt);

    return NGX_OK;
}


void
ngx_http_credits_sentinel_exit(ngx_http_credits_router_t *rt)
{
    ngx_uint_t                    i;
    ngx_http_credits_sentinel_t  *st = rt->sentinel;

    if (st->timer.timer_set) {
        ngx_del_timer(&st->timer);
    }

    if (st->listener) {
        ngx_http_credits_node_free(st->listener);
    }

    for (i = 0; i < st->nnodes; i++) {
        ngx_http_credits_node_free(st->nodes[i]);
    }

    ngx_free(st);
    rt->sentinel = NULL;
}


/* the master is gone or demoted: ask who it is now */

void
ngx_http_credits_sentinel_lost(ngx_http_credits_node_t *node)
{
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    if (rt->nnodes && node == rt->nodes[0]) {
        ngx_http_credits_sentinel_ask(rt);
    }
}


/* one question at a time, to the next sentinel that can be reached */

static void
ngx_http_credits_sentinel_ask(ngx_http_credits_router_t *rt)
{
    ngx_uint_t                    i;
    const char                   *argv[3];
    size_t                        argvlen[3];
    ngx_http_credits_node_t      *node;
    ngx_http_credits_sentinel_t  *st = rt->sentinel;

    if (st->asking || rt->exiting) {
        return;
    }

    argv[0] = "SENTINEL";
    argvlen[0] = 8;
    argv[1] = "get-master-addr-by-name";
    argvlen[1] = 23;
    argv[2] = (const char *) rt->conf->sentinel.data;
    argvlen[2] = rt->conf->sentinel.len;

    for (i = 0; i < st->nnodes; i++) {
        node = st->nodes[st->next++ % st->nnodes];

        if (ngx_http_credits_node_connect(node) != NGX_HTTP_CREDITS_REDIS_DOWN
            && ngx_http_credits_node_internal(node, 3, argv, argvlen,
                                         ngx_http_credits_sentinel_reply, rt)
               == NGX_OK)
        {
            st->asking = 1;
            return;
        }
    }

    if (!st->timer.timer_set) {
        ngx_add_timer(&st->timer, NGX_HTTP_CREDITS_SENTINEL_RETRY);
    }
}


static void
ngx_http_credits_sentinel_timer_handler(ngx_event_t *ev)
{
    ngx_http_credits_sentinel_ask(ev->data);
}


/* [host, port], or nil for a name the sentinel does not know */

static void
ngx_http_credits_sentinel_reply(ngx_http_credits_node_t *node,
    redisReply *reply, void *data)
{
    ngx_int_t                     port;
    ngx_str_t                     err;
    redisReply                  **e;
    ngx_http_credits_router_t    *rt = data;
    ngx_http_credits_sentinel_t  *st = rt->sentinel;

    if (rt->exiting) {
        return;
    }

    st->asking = 0;

    e = reply ? reply->element : NULL;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != 2 || e[0]->type != REDIS_REPLY_STRING
        || e[1]->type != REDIS_REPLY_STRING
        || (port = ngx_atoi((u_char *) e[1]->str, e[1]->len)) <= 0
        || port > 65535)
    {
        ngx_log_error(NGX_LOG_ERR, rt->log, 0,
                      "credits: redis sentinel %V: no master \"%V\": %s",
                      &ngx_http_credits_node_addr(node)->name,
                      &rt->conf->sentinel,
                      reply && reply->type == REDIS_REPLY_NIL
                      ? "unknown name"
                      : ngx_http_credits_reply_error(reply, &err));

        if (!st->timer.timer_set) {
            ngx_add_timer(&st->timer, NGX_HTTP_CREDITS_PAUSE_MAX);
        }

        return;
    }

    ngx_http_credits_sentinel_listen(rt, node);

    ngx_http_credits_sentinel_master(rt, (u_char *) e[0]->str, e[0]->len,
                                     port);

    /* a master that is down still: ask again until it is up */
    if (ngx_http_credits_node_state(rt->nodes[0]) != NGX_HTTP_CREDITS_REDIS_UP
        && !st->timer.timer_set)
    {
        ngx_add_timer(&st->timer, NGX_HTTP_CREDITS_SENTINEL_RETRY);
    }
}


/* a sentinel that answers is listened to, when none is */

static void
ngx_http_credits_sentinel_listen(ngx_http_credits_router_t *rt,
    ngx_http_credits_node_t *node)
{
    ngx_http_credits_sentinel_t  *st = rt->sentinel;

    if (st->listener
        && ngx_http_credits_node_state(st->listener)
           != NGX_HTTP_CREDITS_REDIS_DOWN)
    {
        return;
    }

    if (st->listener) {
        ngx_http_credits_node_free(st->listener);
    }

    st->listener = ngx_http_credits_node_create(
                                      ngx_http_credits_node_addr(node),
                                      rt->conf, rt->log);
    if (st->listener == NULL) {
        return;
    }

    /* a subscriber: its setup subscribes again at every reconnect */
    ngx_http_credits_node_role(st->listener, NGX_HTTP_CREDITS_NODE_SENTINEL,
                               ngx_http_credits_sentinel_message, rt);
    ngx_http_credits_node_keep(st->listener, 1, 0);
    (void) ngx_http_credits_node_connect(st->listener);
}


/* "message", "+switch-master", "NAME old-ip old-port new-ip new-port" */

static void
ngx_http_credits_sentinel_message(ngx_http_credits_node_t *node,
    redisReply *reply, void *data)
{
    u_char                     *p, *last, *word[5];
    size_t                      len[5];
    ngx_int_t                   port;
    ngx_uint_t                  n;
    redisReply                 *text;
    ngx_http_credits_router_t  *rt = data;

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 3
        || reply->element[2]->type != REDIS_REPLY_STRING)
    {
        return;
    }

    text = reply->element[2];
    p = (u_char *) text->str;
    last = p + text->len;

    for (n = 0; n < 5 && p < last; n++) {
        word[n] = p;

        while (p < last && *p != ' ') {
            p++;
        }

        len[n] = p - word[n];

        while (p < last && *p == ' ') {
            p++;
        }
    }

    if (n < 5 || len[0] != rt->conf->sentinel.len
        || ngx_strncmp(word[0], rt->conf->sentinel.data, len[0]) != 0)
    {
        return;
    }

    port = ngx_atoi(word[4], len[4]);
    if (port <= 0 || port > 65535) {
        return;
    }

    ngx_log_error(NGX_LOG_NOTICE, rt->log, 0,
                  "credits: redis sentinel %V: +switch-master %*s",
                  &ngx_http_credits_node_addr(node)->name,
                  text->len, text->str);

    ngx_http_credits_sentinel_master(rt, word[3], len[3], port);
}


/* the router's node becomes the named master, unless it is already */

static void
ngx_http_credits_sentinel_master(ngx_http_credits_router_t *rt, u_char *host,
    size_t len, ngx_int_t port)
{
    u_char                          name[NGX_SOCKADDR_STRLEN + 8];
    ngx_http_credits_node_t        *old;
    ngx_http_credits_redis_addr_t   addr, *a;

    old = rt->nnodes ? rt->nodes[0] : NULL;

    if (old) {
        a = ngx_http_credits_node_addr(old);

        if (a->port == port && a->host.len == len
            && ngx_strncmp(a->host.data, host, len) == 0)
        {
            (void) ngx_http_credits_node_connect(old);
            return;
        }
    }

    if (len == 0 || len > NGX_SOCKADDR_STRLEN) {
        return;
    }

    ngx_memzero(&addr, sizeof(ngx_http_credits_redis_addr_t));

    addr.host.data = host;
    addr.host.len = len;
    addr.port = (in_port_t) port;
    addr.name.data = name;
    addr.name.len = ngx_sprintf(name, "%*s:%i", len, host, port) - name;

    ngx_log_error(NGX_LOG_NOTICE, rt->log, 0,
                  "credits: redis sentinel: master \"%V\" is %V",
                  &rt->conf->sentinel, &addr.name);

    rt->nodes[0] = ngx_http_credits_node_create(&addr, rt->conf, rt->log);
    if (rt->nodes[0] == NULL) {
        rt->nodes[0] = old;
        return;
    }

    rt->nnodes = 1;
    rt->nseeds = 1;
    rt->seed = 0;

    ngx_http_credits_node_role(rt->nodes[0], NGX_HTTP_CREDITS_NODE_MASTER,
                               NULL, NULL);
    ngx_http_credits_node_keep(rt->nodes[0], 1, 0);
    (void) ngx_http_credits_node_connect(rt->nodes[0]);

    /* its commands in flight fail now; later ones go to the new master */
    if (old) {
        ngx_http_credits_node_free(old);
    }

    ngx_http_credits_router_count();
}
