
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * A Redis node connection.  A worker has one per node it talks to (one
 * for a standalone Redis, one per master of a cluster, one per sentinel
 * asked); the router (ngx_http_credits_router.c) decides which node
 * serves a command and handles the replies.
 *
 * The socket is nginx's own: ngx_event_connect_peer(), c->send and
 * c->recv, so TLS is nginx's SSL (ngx_http_credits_handshake.c) and a
 * name is looked up through nginx's resolver at every connect; the
 * commands and their replies are ngx_http_credits_pipeline.c's.
 *
 * Connect and stalls are bounded by nginx timers; a lost connection fails
 * every awaited command (the router gets a NULL reply, and whether any
 * of its bytes were written).  A "persistent" node (the one a standalone
 * Redis is) connects again by itself with backoff, also while the worker
 * shuts down gracefully (its settles may wait for Redis; the connect
 * timer is cancelable, so it never keeps the worker alive by itself); a
 * cluster node connects again when a command needs it, once its backoff
 * has passed.  Nothing here ever blocks.
 */


#include "ngx_http_credits_redis.h"


#define NGX_HTTP_CREDITS_BACKOFF_MAX       5000


static ngx_int_t ngx_http_credits_node_sockaddr(ngx_http_credits_node_t *node);
static void ngx_http_credits_node_resolve(ngx_http_credits_node_t *node);
static void ngx_http_credits_node_resolved(ngx_resolver_ctx_t *ctx);
static void ngx_http_credits_node_open(ngx_http_credits_node_t *node);
static void ngx_http_credits_node_connect_handler(ngx_event_t *ev);
static void ngx_http_credits_node_retry(ngx_http_credits_node_t *node);
static void ngx_http_credits_node_timer_handler(ngx_event_t *ev);


/* a node of the address (copied); it connects when asked to */

ngx_http_credits_node_t *
ngx_http_credits_node_create(ngx_http_credits_redis_addr_t *addr,
    ngx_http_credits_redis_conf_t *conf, ngx_log_t *log)
{
    u_char                   *p;
    ngx_http_credits_node_t  *node;

    node = ngx_calloc(sizeof(ngx_http_credits_node_t) + addr->host.len + 1
                      + addr->name.len, log);
    if (node == NULL) {
        return NULL;
    }

    p = (u_char *) (node + 1);

    node->addr = *addr;
    node->addr.host.data = p;
    p = ngx_cpymem(p, addr->host.data, addr->host.len);
    *p++ = '\0';
    node->addr.name.data = p;
    ngx_memcpy(p, addr->name.data, addr->name.len);

    node->conf = conf;
    node->log = log;
    node->backoff = NGX_HTTP_CREDITS_BACKOFF_MIN;

    /* a name is looked up at every connect, an address only once */
    node->named = (ngx_http_credits_node_sockaddr(node) == NGX_DECLINED);

    node->timer.handler = ngx_http_credits_node_timer_handler;
    node->timer.log = log;
    node->timer.data = node;
    node->timer.cancelable = 1;

    /* not cancelable: a worker shutting down waits for settles in flight */
    node->stall_timer.handler = ngx_http_credits_node_stall_handler;
    node->stall_timer.log = log;
    node->stall_timer.data = node;

    node->flush.handler = ngx_http_credits_node_flush_handler;
    node->flush.log = log;
    node->flush.data = node;

    return node;
}


/* awaited replies are failed now, with a NULL reply */

void
ngx_http_credits_node_free(ngx_http_credits_node_t *node)
{
    node->persistent = 0;
    node->freeing = 1;

    ngx_http_credits_node_close(node);

    if (node->timer.timer_set) {
        ngx_del_timer(&node->timer);
    }

    ngx_free(node->out);
    ngx_free(node->waits);
    ngx_free(node);
}


/*
 * A persistent node keeps connecting by itself; "probe" asks it whether
 * it is part of a cluster on each connect.
 */

void
ngx_http_credits_node_keep(ngx_http_credits_node_t *node, ngx_uint_t on,
    ngx_uint_t probe)
{
    node->persistent = on;
    node->probe = probe;

    if (!on && node->state == NGX_HTTP_CREDITS_REDIS_DOWN
        && node->timer.timer_set)
    {
        ngx_del_timer(&node->timer);
    }
}


/*
 * What the node is to a Sentinel setup: a sentinel (authenticated with
 * sentinel_user=/sentinel_password=, no scripts; "push" gets what it
 * publishes) or the master it named (checked with ROLE).
 */

void
ngx_http_credits_node_role(ngx_http_credits_node_t *node, ngx_uint_t role,
    ngx_http_credits_node_reply_pt push, void *data)
{
    node->role = role;
    node->push = push;
    node->push_data = data;
}


ngx_uint_t
ngx_http_credits_node_state(ngx_http_credits_node_t *node)
{
    return node->state;
}


ngx_uint_t
ngx_http_credits_node_reconnects(ngx_http_credits_node_t *node)
{
    return node->reconnects;
}


ngx_http_credits_redis_addr_t *
ngx_http_credits_node_addr(ngx_http_credits_node_t *node)
{
    return &node->addr;
}


/* work waits for the connection while the worker exits: try again soon */

void
ngx_http_credits_node_hurry(ngx_http_credits_node_t *node)
{
    node->next_try = 0;

    if (node->state == NGX_HTTP_CREDITS_REDIS_DOWN && node->persistent
        && node->backoff > NGX_HTTP_CREDITS_BACKOFF_MIN)
    {
        node->backoff = NGX_HTTP_CREDITS_BACKOFF_MIN;
        ngx_add_timer(&node->timer, NGX_HTTP_CREDITS_BACKOFF_MIN);
    }
}


/* the address, unless it is a name: NGX_DECLINED */

static ngx_int_t
ngx_http_credits_node_sockaddr(ngx_http_credits_node_t *node)
{
    u_char                         *host;
    size_t                          len;
    in_addr_t                       inaddr;
    ngx_http_credits_redis_addr_t  *addr = &node->addr;

#if (NGX_HAVE_UNIX_DOMAIN)
    if (addr->unix_socket) {
        node->sockaddr.sockaddr_un.sun_family = AF_UNIX;
        ngx_cpystrn((u_char *) node->sockaddr.sockaddr_un.sun_path,
                    addr->host.data,
                    sizeof(node->sockaddr.sockaddr_un.sun_path));
        node->socklen = sizeof(struct sockaddr_un);
        return NGX_OK;
    }
#endif

    host = addr->host.data;
    len = addr->host.len;

    inaddr = ngx_inet_addr(host, len);

    if (inaddr != INADDR_NONE) {
        node->sockaddr.sockaddr_in.sin_family = AF_INET;
        node->sockaddr.sockaddr_in.sin_addr.s_addr = inaddr;
        node->socklen = sizeof(struct sockaddr_in);
        ngx_inet_set_port(&node->sockaddr.sockaddr, addr->port);
        return NGX_OK;
    }

#if (NGX_HAVE_INET6)
    if (len > 2 && host[0] == '[' && host[len - 1] == ']') {
        host++;
        len -= 2;
    }

    if (ngx_inet6_addr(host, len,
                       node->sockaddr.sockaddr_in6.sin6_addr.s6_addr)
        == NGX_OK)
    {
        node->sockaddr.sockaddr_in6.sin6_family = AF_INET6;
        node->socklen = sizeof(struct sockaddr_in6);
        ngx_inet_set_port(&node->sockaddr.sockaddr, addr->port);
        return NGX_OK;
    }
#endif

    return NGX_DECLINED;
}


/*
 * Connects unless connected or connecting, or while the backoff of the
 * last failure lasts.  Returns the node's state.  The setup commands
 * (AUTH, INFO, ROLE, SELECT, SCRIPT LOAD) are queued first: they go
 * before anything else on the new connection.
 */

ngx_uint_t
ngx_http_credits_node_connect(ngx_http_credits_node_t *node)
{
    if (node->state != NGX_HTTP_CREDITS_REDIS_DOWN
        || (ngx_msec_int_t) (node->next_try - ngx_current_msec) > 0
        || ngx_terminate || node->freeing)
    {
        return node->state;
    }

    if (node->tried) {
        node->reconnects++;
    }

    node->tried = 1;
    node->state = NGX_HTTP_CREDITS_REDIS_CONNECTING;

    if (node->timer.timer_set) {
        ngx_del_timer(&node->timer);
    }

    /* the name, the connect and the handshake, all within timeout= */
    ngx_add_timer(&node->timer, node->conf->timeout);

    if (ngx_http_credits_node_setup(node) != NGX_OK) {
        ngx_http_credits_node_close(node);
        return node->state;
    }

    if (node->named) {
        ngx_http_credits_node_resolve(node);

    } else {
        ngx_http_credits_node_open(node);
    }

    return node->state;
}


static void
ngx_http_credits_node_resolve(ngx_http_credits_node_t *node)
{
    ngx_resolver_ctx_t  *ctx;

    if (node->conf->resolver == NULL) {
        /* a name the cluster or a sentinel gave, and no resolver */
        ngx_log_error(NGX_LOG_ERR, node->log, 0,
                      "credits: redis %V: a name needs a \"resolver\"",
                      &node->addr.name);
        ngx_http_credits_node_close(node);
        return;
    }

    ctx = ngx_resolve_start(node->conf->resolver, NULL);
    if (ctx == NULL || ctx == NGX_NO_RESOLVER) {
        ngx_http_credits_node_close(node);
        return;
    }

    ctx->name = node->addr.host;
    ctx->handler = ngx_http_credits_node_resolved;
    ctx->data = node;
    ctx->timeout = node->conf->resolver_timeout;

    node->resolving = ctx;

    if (ngx_resolve_name(ctx) != NGX_OK) {
        node->resolving = NULL;
        ngx_http_credits_node_close(node);
    }
}


/* may run from ngx_resolve_name() itself, when the answer is cached */

static void
ngx_http_credits_node_resolved(ngx_resolver_ctx_t *ctx)
{
    ngx_uint_t                i;
    ngx_http_credits_node_t  *node = ctx->data;

    node->resolving = NULL;

    if (ctx->state) {
        ngx_log_error(NGX_LOG_ERR, node->log, 0,
                      "credits: redis %V: cannot resolve \"%V\": %s",
                      &node->addr.name, &ctx->name,
                      ngx_resolver_strerror(ctx->state));
        ngx_resolve_name_done(ctx);
        ngx_http_credits_node_close(node);
        return;
    }

    /* several addresses: a different one at each connect */
    i = node->reconnects % ctx->naddrs;

    ngx_memcpy(&node->sockaddr, ctx->addrs[i].sockaddr, ctx->addrs[i].socklen);
    node->socklen = ctx->addrs[i].socklen;
    ngx_inet_set_port(&node->sockaddr.sockaddr, node->addr.port);

    ngx_resolve_name_done(ctx);

    ngx_http_credits_node_open(node);
}


static void
ngx_http_credits_node_open(ngx_http_credits_node_t *node)
{
    ngx_int_t          rc;
    ngx_connection_t  *c;

    ngx_memzero(&node->peer, sizeof(ngx_peer_connection_t));

    node->peer.sockaddr = &node->sockaddr.sockaddr;
    node->peer.socklen = node->socklen;
    node->peer.name = &node->addr.name;
    node->peer.get = ngx_event_get_peer;
    node->peer.log = node->log;
    node->peer.log_error = NGX_ERROR_ERR;

    node->reader = ngx_http_credits_reply_reader(node->log);
    if (node->reader == NULL) {
        ngx_http_credits_node_close(node);
        return;
    }

    rc = ngx_event_connect_peer(&node->peer);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        ngx_log_error(NGX_LOG_ERR, node->log, 0,
                      "credits: redis %V: cannot connect", &node->addr.name);
        node->conn = node->peer.connection;
        ngx_http_credits_node_close(node);
        return;
    }

    c = node->peer.connection;
    node->conn = c;

    /* the TLS handshake allocates from the connection's pool */
    c->pool = ngx_create_pool(512, node->log);
    if (c->pool == NULL) {
        ngx_http_credits_node_close(node);
        return;
    }

    c->data = node;
    c->read->handler = ngx_http_credits_node_connect_handler;
    c->write->handler = ngx_http_credits_node_connect_handler;

    if (rc == NGX_OK) {
        ngx_http_credits_node_connected(node);
    }
}


static void
ngx_http_credits_node_connect_handler(ngx_event_t *ev)
{
    int                       err;
    socklen_t                 len;
    ngx_connection_t         *c = ev->data;
    ngx_http_credits_node_t  *node = c->data;

    err = 0;
    len = sizeof(int);

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len) == -1) {
        err = ngx_socket_errno;
    }

    if (err) {
        ngx_log_error(NGX_LOG_ERR, node->log, err,
                      "credits: redis %V: cannot connect", &node->addr.name);
        ngx_http_credits_node_close(node);
        return;
    }

    ngx_http_credits_node_connected(node);
}


/* after the connect and, with ssl, the handshake: the setup goes first */

void
ngx_http_credits_node_up(ngx_http_credits_node_t *node)
{
    ngx_connection_t  *c = node->conn;

    c->read->handler = ngx_http_credits_node_read_handler;
    c->write->handler = ngx_http_credits_node_write_handler;

    if (node->timer.timer_set) {
        ngx_del_timer(&node->timer);
    }

    node->state = NGX_HTTP_CREDITS_REDIS_UP;

    ngx_log_error(NGX_LOG_INFO, node->log, 0,
                  "credits: redis %V: connected", &node->addr.name);

    ngx_http_credits_node_flush_handler(&node->flush);

    if (node->conn == c && c->read->ready) {
        ngx_http_credits_node_read_handler(c->read);
    }

    if (node->state == NGX_HTTP_CREDITS_REDIS_UP) {
        ngx_http_credits_router_node_changed(node);
    }
}


/* a connect, handshake or setup failed: again after the backoff */

static void
ngx_http_credits_node_retry(ngx_http_credits_node_t *node)
{
    node->next_try = ngx_current_msec + node->backoff;

    if (node->persistent && !ngx_terminate) {
        ngx_add_timer(&node->timer, node->backoff);
    }

    node->backoff = ngx_min(node->backoff * 2, NGX_HTTP_CREDITS_BACKOFF_MAX);
}


static void
ngx_http_credits_node_timer_handler(ngx_event_t *ev)
{
    ngx_http_credits_node_t  *node = ev->data;

    if (node->state == NGX_HTTP_CREDITS_REDIS_CONNECTING) {
        ngx_log_error(NGX_LOG_ERR, node->log, 0,
                      "credits: redis %V: connect timed out after %Mms",
                      &node->addr.name, node->conf->timeout);

        ngx_http_credits_node_close(node);
        return;
    }

    /* a worker shutting down gracefully still reconnects: settles wait */
    if (node->persistent) {
        node->next_try = 0;
        (void) ngx_http_credits_node_connect(node);
    }
}


/* the node cannot serve (a demoted master): connect again, re-resolved */

void
ngx_http_credits_node_drop(ngx_http_credits_node_t *node, const char *why)
{
    if (node->state == NGX_HTTP_CREDITS_REDIS_DOWN || node->draining) {
        return;
    }

    ngx_log_error(NGX_LOG_WARN, node->log, 0,
                  "credits: redis %V: %s: dropping the connection",
                  &node->addr.name, why);

    /* not a failure of the network: no need to wait long */
    node->backoff = NGX_HTTP_CREDITS_BACKOFF_MIN;

    /*
     * The commands already sent are answered first (the replies close
     * it): refused ones are retried, and one that ran is not lost.  The
     * commands queued meanwhile wait for the next connection.
     */
    if (node->state == NGX_HTTP_CREDITS_REDIS_UP
        && ngx_http_credits_node_awaits_sent(node))
    {
        node->draining = 1;
        return;
    }

    ngx_http_credits_node_close(node);
}


/*
 * The one way down: the connection (if any) is closed, every awaited
 * reply fails, and the node connects again after its backoff.
 */

void
ngx_http_credits_node_close(ngx_http_credits_node_t *node)
{
    ngx_uint_t                was_up;
    ngx_pool_t               *pool;
    ngx_connection_t         *c;
    ngx_http_credits_wait_t   w;

    if (node->closing) {
        return;
    }

    node->closing = 1;

    was_up = (node->state == NGX_HTTP_CREDITS_REDIS_UP);

    if (node->resolving) {
        ngx_resolve_name_done(node->resolving);
        node->resolving = NULL;
    }

    c = node->conn;

    if (c) {
        pool = c->pool;

#if (NGX_SSL)
        if (c->ssl) {
            c->ssl->no_wait_shutdown = 1;
            (void) ngx_ssl_shutdown(c);
        }
#endif

        ngx_close_connection(c);

        if (pool) {
            ngx_destroy_pool(pool);
        }

        node->conn = NULL;
    }

    if (node->reader) {
        ngx_http_credits_reply_reader_free(node->reader);
        node->reader = NULL;
    }

    if (node->flush.posted) {
        ngx_delete_posted_event(&node->flush);
    }

    if (node->stall_timer.timer_set) {
        ngx_del_timer(&node->stall_timer);
    }

    if (node->timer.timer_set) {
        ngx_del_timer(&node->timer);
    }

    node->generation++;
    node->state = NGX_HTTP_CREDITS_REDIS_DOWN;
    node->draining = 0;
    node->out_pos = 0;
    node->out_last = 0;

    if (!node->freeing) {
        ngx_http_credits_node_retry(node);
    }

    /* a command none of whose bytes left may go to another node */

    while (node->nwaits) {
        w = node->waits[node->head];
        node->head = (node->head + 1) % node->waits_size;
        node->nwaits--;

        if (w.cmd) {
            ngx_http_credits_router_reply(node, w.cmd, NULL,
                                          node->written > w.start);

        } else if (w.handler) {
            w.handler(node, NULL, w.data);
        }
    }

    node->queued = 0;
    node->written = 0;
    node->closing = 0;

    if (!node->freeing) {
        ngx_http_credits_router_node_lost(node, was_up);
    }
}

