
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * A Redis node connection: hiredis's async API driven by nginx's event
 * loop.  A worker has one per node it talks to (one for a standalone
 * Redis, one per master of a cluster); the router (ngx_http_credits_
 * router.c) decides which node serves a command and handles the replies.
 *
 * The hiredis socket is wrapped in an nginx connection whose read and
 * write events call redisAsyncHandleRead/Write; hiredis asks for reading
 * and writing through its ev hooks, which add and delete level-triggered
 * events (the model hiredis is written for: it reads and writes once per
 * call).  Once connected, commands are not written one by one: hiredis's
 * request to write posts one flush event, so every command issued in an
 * event loop iteration leaves in one write(), and the socket is watched
 * for writability only when that write could not finish.
 *
 * Connect and stalls are bounded by nginx timers; a lost connection fails
 * every pending command (the router gets a NULL reply, and whether the
 * command may have reached Redis).  A "persistent" node (the one a
 * standalone Redis is) connects again by itself with backoff, also while
 * the worker shuts down gracefully (its settles may wait for Redis; the
 * connect timer is cancelable, so it never keeps the worker alive by
 * itself); a cluster node connects again when a command needs it, once
 * its backoff has passed.  Nothing here ever blocks: addresses are
 * numeric, resolved at configuration time or given so by the cluster.
 */


#include "ngx_http_credits_module.h"

#include <hiredis/async.h>


#define NGX_HTTP_CREDITS_BACKOFF_MIN       100
#define NGX_HTTP_CREDITS_BACKOFF_MAX       5000

/*
 * A request waits "timeout" for its reply; the connection is given three
 * times that to make progress before it is dropped.  A Redis that is only
 * slow thus still answers, and a hold whose request gave up is released at
 * once instead of being locked until its ttl; a Redis that hangs is left.
 */
#define NGX_HTTP_CREDITS_STALL_FACTOR      3


struct ngx_http_credits_node_s {
    redisAsyncContext                *ac;
    ngx_connection_t                 *conn;
    ngx_http_credits_redis_conf_t    *conf;
    ngx_http_credits_redis_addr_t     addr;
    ngx_log_t                        *log;

    ngx_event_t                       connect_timer;  /* connect, backoff */
    ngx_event_t                       stall_timer;    /* replies overdue */
    ngx_event_t                       flush;          /* write the commands */

    ngx_uint_t                        state;
    ngx_uint_t                        pending;
    ngx_uint_t                        reconnects;
    ngx_msec_t                        backoff;
    ngx_msec_t                        next_try;       /* on demand, not before */
    unsigned                          flushing:1;
    unsigned                          persistent:1;
    unsigned                          probe:1;        /* ask INFO cluster */
    unsigned                          tried:1;        /* connected once */
};


static void ngx_http_credits_node_reconnect_handler(ngx_event_t *ev);
static void ngx_http_credits_node_stall_handler(ngx_event_t *ev);
static void ngx_http_credits_node_on_connect(const redisAsyncContext *ac,
    int status);
static void ngx_http_credits_node_setup(ngx_http_credits_node_t *node);
static void ngx_http_credits_node_setup_reply(redisAsyncContext *ac,
    void *r, void *privdata);
static void ngx_http_credits_node_info_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_credits_node_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_credits_node_read_handler(ngx_event_t *ev);
static void ngx_http_credits_node_write_handler(ngx_event_t *ev);
static void ngx_http_credits_node_add_read(void *data);
static void ngx_http_credits_node_del_read(void *data);
static void ngx_http_credits_node_flush_handler(ngx_event_t *ev);
static void ngx_http_credits_node_add_write(void *data);
static void ngx_http_credits_node_del_write(void *data);
static void ngx_http_credits_node_cleanup(void *data);


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

    node->connect_timer.handler = ngx_http_credits_node_reconnect_handler;
    node->connect_timer.log = log;
    node->connect_timer.data = node;
    node->connect_timer.cancelable = 1;

    /* not cancelable: a worker shutting down waits for settles in flight */
    node->stall_timer.handler = ngx_http_credits_node_stall_handler;
    node->stall_timer.log = log;
    node->stall_timer.data = node;

    node->flush.handler = ngx_http_credits_node_flush_handler;
    node->flush.log = log;
    node->flush.data = node;

    return node;
}


/* pending handlers run now, with a NULL reply */

void
ngx_http_credits_node_free(ngx_http_credits_node_t *node)
{
    node->persistent = 0;

    if (node->connect_timer.timer_set) {
        ngx_del_timer(&node->connect_timer);
    }

    if (node->ac) {
        redisAsyncFree(node->ac);
    }

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

    if (!on && node->ac == NULL && node->connect_timer.timer_set) {
        ngx_del_timer(&node->connect_timer);
    }
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

    if (node->ac == NULL && node->persistent
        && node->backoff > NGX_HTTP_CREDITS_BACKOFF_MIN)
    {
        node->backoff = NGX_HTTP_CREDITS_BACKOFF_MIN;
        ngx_add_timer(&node->connect_timer, NGX_HTTP_CREDITS_BACKOFF_MIN);
    }
}


/*
 * Connects unless connected or connecting, or while the backoff of the
 * last failure lasts.  Returns the node's state.
 */

ngx_uint_t
ngx_http_credits_node_connect(ngx_http_credits_node_t *node)
{
    ngx_connection_t   *c;
    redisAsyncContext  *ac;

    if (node->ac || (ngx_msec_int_t) (node->next_try - ngx_current_msec) > 0
        || ngx_terminate)
    {
        return node->state;
    }

    if (node->tried) {
        node->reconnects++;
    }

    node->tried = 1;

    if (node->addr.unix_socket) {
        ac = redisAsyncConnectUnix((char *) node->addr.host.data);

    } else {
        ac = redisAsyncConnect((char *) node->addr.host.data, node->addr.port);
    }

    if (ac == NULL || ac->err) {
        ngx_log_error(NGX_LOG_ERR, node->log, 0,
                      "credits: redis %V: cannot connect: %s",
                      &node->addr.name, ac ? ac->errstr : "out of memory");
        if (ac) {
            redisAsyncFree(ac);
        }

        goto retry;
    }

    c = ngx_get_connection(ac->c.fd, node->log);
    if (c == NULL) {
        redisAsyncFree(ac);
        goto retry;
    }

    c->data = node;
    c->log = node->log;
    c->read->handler = ngx_http_credits_node_read_handler;
    c->write->handler = ngx_http_credits_node_write_handler;
    c->read->log = node->log;
    c->write->log = node->log;

    node->ac = ac;
    node->conn = c;
    node->state = NGX_HTTP_CREDITS_REDIS_CONNECTING;

    ac->data = node;
    ac->ev.data = c;
    ac->ev.addRead = ngx_http_credits_node_add_read;
    ac->ev.delRead = ngx_http_credits_node_del_read;
    ac->ev.addWrite = ngx_http_credits_node_add_write;
    ac->ev.delWrite = ngx_http_credits_node_del_write;
    ac->ev.cleanup = ngx_http_credits_node_cleanup;

    redisAsyncSetConnectCallback(ac, ngx_http_credits_node_on_connect);

    /* writable means connected (or refused); hiredis asked for it already
     * in redisAsyncSetConnectCallback(), this says so where it matters */
    ngx_http_credits_node_add_write(c);

    if (node->connect_timer.timer_set) {
        ngx_del_timer(&node->connect_timer);
    }

    ngx_add_timer(&node->connect_timer, node->conf->timeout);

    /* AUTH, INFO, SELECT and SCRIPT LOAD go first on the new connection */
    ngx_http_credits_node_setup(node);

    return node->state;

retry:

    node->next_try = ngx_current_msec + node->backoff;

    if (node->persistent) {
        ngx_add_timer(&node->connect_timer, node->backoff);
    }

    node->backoff = ngx_min(node->backoff * 2, NGX_HTTP_CREDITS_BACKOFF_MAX);

    return node->state;
}


static void
ngx_http_credits_node_reconnect_handler(ngx_event_t *ev)
{
    ngx_http_credits_node_t  *node = ev->data;

    if (node->state == NGX_HTTP_CREDITS_REDIS_CONNECTING) {
        ngx_log_error(NGX_LOG_ERR, node->log, 0,
                      "credits: redis %V: connect timed out after %Mms",
                      &node->addr.name, node->conf->timeout);

        redisAsyncFree(node->ac);   /* reconnects through the cleanup hook */
        return;
    }

    /* a worker shutting down gracefully still reconnects: settles wait */
    if (node->persistent) {
        node->next_try = 0;
        (void) ngx_http_credits_node_connect(node);
    }
}


static void
ngx_http_credits_node_stall_handler(ngx_event_t *ev)
{
    ngx_http_credits_node_t  *node = ev->data;

    ngx_log_error(NGX_LOG_ERR, node->log, 0,
                  "credits: redis %V: no reply within %Mms, %ui commands "
                  "pending: dropping the connection",
                  &node->addr.name,
                  node->conf->timeout * NGX_HTTP_CREDITS_STALL_FACTOR,
                  node->pending);

    if (node->ac) {
        redisAsyncFree(node->ac);
    }
}


static void
ngx_http_credits_node_on_connect(const redisAsyncContext *ac, int status)
{
    ngx_http_credits_node_t  *node = ac->data;

    if (node->connect_timer.timer_set) {
        ngx_del_timer(&node->connect_timer);
    }

    if (status != REDIS_OK) {
        ngx_log_error(NGX_LOG_ERR, node->log, 0,
                      "credits: redis %V: cannot connect: %s",
                      &node->addr.name, ac->errstr);
        return;     /* hiredis frees the context: see the cleanup hook */
    }

    node->state = NGX_HTTP_CREDITS_REDIS_UP;
    node->backoff = NGX_HTTP_CREDITS_BACKOFF_MIN;

    ngx_log_error(NGX_LOG_INFO, node->log, 0,
                  "credits: redis %V: connected", &node->addr.name);

    ngx_http_credits_router_node_changed(node);
}


/*
 * Issues a command of the adapter's own (setup, ASKING, CLUSTER SLOTS) on
 * the node; "fn" may be NULL when the reply does not matter.
 */

ngx_int_t
ngx_http_credits_node_internal(ngx_http_credits_node_t *node, int argc,
    const char **argv, const size_t *argvlen,
    ngx_http_credits_node_reply_pt fn, void *privdata)
{
    if (node->ac == NULL
        || redisAsyncCommandArgv(node->ac, (redisCallbackFn *) fn, privdata,
                                 argc, argv, argvlen)
           != REDIS_OK)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/* pipelined: the script is loaded before any later command runs */

ngx_int_t
ngx_http_credits_node_load(ngx_http_credits_node_t *node,
    ngx_http_credits_script_t *script)
{
    const char  *argv[3];
    size_t       argvlen[3];

    argv[0] = "SCRIPT";
    argvlen[0] = 6;
    argv[1] = "LOAD";
    argvlen[1] = 4;
    argv[2] = (const char *) script->body.data;
    argvlen[2] = script->body.len;

    if (node->ac == NULL
        || redisAsyncCommandArgv(node->ac, ngx_http_credits_node_setup_reply,
                                 "SCRIPT LOAD", 3, argv, argvlen)
           != REDIS_OK)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


static void
ngx_http_credits_node_setup(ngx_http_credits_node_t *node)
{
    u_char                      db[NGX_INT_T_LEN];
    const char                 *argv[3];
    size_t                      argvlen[3];
    ngx_http_credits_script_t **s;

    if (node->conf->password.len) {
        argv[0] = "AUTH";
        argvlen[0] = 4;
        argv[1] = (const char *) node->conf->password.data;
        argvlen[1] = node->conf->password.len;

        redisAsyncCommandArgv(node->ac, ngx_http_credits_node_setup_reply,
                              "AUTH", 2, argv, argvlen);
    }

    /* before SELECT: a cluster refuses it, and the router says why */
    if (node->probe) {
        argv[0] = "INFO";
        argvlen[0] = 4;
        argv[1] = "cluster";
        argvlen[1] = 7;

        redisAsyncCommandArgv(node->ac, ngx_http_credits_node_info_reply,
                              NULL, 2, argv, argvlen);
    }

    if (node->conf->db) {
        argv[0] = "SELECT";
        argvlen[0] = 6;
        argv[1] = (const char *) db;
        argvlen[1] = ngx_sprintf(db, "%i", node->conf->db) - db;

        redisAsyncCommandArgv(node->ac, ngx_http_credits_node_setup_reply,
                              "SELECT", 2, argv, argvlen);
    }

    for (s = ngx_http_credits_scripts; *s; s++) {
        (void) ngx_http_credits_node_load(node, *s);
    }
}


/* a failed AUTH or SELECT would send every later command to the wrong
 * place or nowhere: drop the connection and try again with backoff */

static void
ngx_http_credits_node_setup_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    ngx_str_t                 err;
    redisReply               *reply = r;
    ngx_http_credits_node_t  *node = ac->data;

    if (reply == NULL || reply->type != REDIS_REPLY_ERROR) {
        return;
    }

    ngx_http_credits_reply_error(reply, &err);

    ngx_log_error(NGX_LOG_ERR, node->log, 0,
                  "credits: redis %V: %s failed: %V",
                  &node->addr.name, (char *) privdata, &err);

    redisAsyncDisconnect(ac);
}


static void
ngx_http_credits_node_info_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply  *reply = r;

    if (reply) {
        ngx_http_credits_router_probed(ac->data, reply);
    }
}


/* sends a command formatted by the router; its reply goes to the router */

ngx_int_t
ngx_http_credits_node_send(ngx_http_credits_node_t *node,
    ngx_http_credits_redis_cmd_t *cmd)
{
    if (node->ac == NULL
        || redisAsyncFormattedCommand(node->ac, ngx_http_credits_node_reply,
                                      cmd, (const char *) cmd->formatted,
                                      cmd->formatted_len)
           != REDIS_OK)
    {
        return NGX_DECLINED;
    }

    if (node->pending++ == 0) {
        ngx_add_timer(&node->stall_timer,
                      node->conf->timeout * NGX_HTTP_CREDITS_STALL_FACTOR);
    }

    return NGX_OK;
}


static void
ngx_http_credits_node_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    ngx_http_credits_node_t  *node = ac->data;

    /* every reply is progress: the stall timer restarts or stops */

    if (--node->pending == 0) {
        if (node->stall_timer.timer_set) {
            ngx_del_timer(&node->stall_timer);
        }

    } else {
        ngx_add_timer(&node->stall_timer,
                      node->conf->timeout * NGX_HTTP_CREDITS_STALL_FACTOR);
    }

    /* nothing is written before the connect completes */
    ngx_http_credits_router_reply(node, privdata, r,
                                  node->state == NGX_HTTP_CREDITS_REDIS_UP);
}


const char *
ngx_http_credits_reply_error(redisReply *reply, ngx_str_t *err)
{
    if (reply == NULL) {
        ngx_str_set(err, "connection lost or not connected");

    } else if (reply->type == REDIS_REPLY_ERROR) {
        err->data = (u_char *) reply->str;
        err->len = reply->len;

    } else {
        ngx_str_set(err, "unexpected reply");
    }

    return (const char *) err->data;
}


static void
ngx_http_credits_node_read_handler(ngx_event_t *ev)
{
    ngx_connection_t         *c = ev->data;
    ngx_http_credits_node_t  *node = c->data;

    redisAsyncHandleRead(node->ac);
}


static void
ngx_http_credits_node_write_handler(ngx_event_t *ev)
{
    ngx_connection_t         *c = ev->data;
    ngx_http_credits_node_t  *node = c->data;

    redisAsyncHandleWrite(node->ac);
}


static void
ngx_http_credits_node_add_read(void *data)
{
    ngx_connection_t  *c = data;

    if (!c->read->active) {
        if (ngx_add_event(c->read, NGX_READ_EVENT, NGX_LEVEL_EVENT)
            != NGX_OK)
        {
            ngx_log_error(NGX_LOG_ALERT, c->log, 0,
                          "credits: cannot watch the redis socket");
        }
    }
}


static void
ngx_http_credits_node_del_read(void *data)
{
    ngx_connection_t  *c = data;

    if (c->read->active) {
        ngx_del_event(c->read, NGX_READ_EVENT, 0);
    }
}


static void
ngx_http_credits_node_flush_handler(ngx_event_t *ev)
{
    ngx_http_credits_node_t  *node = ev->data;

    if (node->ac == NULL) {
        return;
    }

    node->flushing = 1;
    redisAsyncHandleWrite(node->ac);
    node->flushing = 0;
}


/*
 * Before the connect completes, and when a flush could not write all,
 * wait for the socket to become writable; otherwise flush once, soon.
 */

static void
ngx_http_credits_node_add_write(void *data)
{
    ngx_connection_t         *c = data;
    ngx_http_credits_node_t  *node = c->data;

    if (c->write->active) {
        return;
    }

    if (node->flushing || node->state != NGX_HTTP_CREDITS_REDIS_UP) {
        if (ngx_add_event(c->write, NGX_WRITE_EVENT, NGX_LEVEL_EVENT)
            != NGX_OK)
        {
            ngx_log_error(NGX_LOG_ALERT, c->log, 0,
                          "credits: cannot watch the redis socket");
        }

        return;
    }

    if (!node->flush.posted) {
        ngx_post_event(&node->flush, &ngx_posted_events);
    }
}


static void
ngx_http_credits_node_del_write(void *data)
{
    ngx_connection_t  *c = data;

    if (c->write->active) {
        ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
    }
}


/* hiredis is freeing the context and will close the socket itself */

static void
ngx_http_credits_node_cleanup(void *data)
{
    ngx_connection_t         *c = data;
    ngx_http_credits_node_t  *node = c->data;

    ngx_uint_t  was_up;

    if (c->read->active) {
        ngx_del_event(c->read, NGX_READ_EVENT, NGX_CLOSE_EVENT);
    }

    if (c->write->active) {
        ngx_del_event(c->write, NGX_WRITE_EVENT, NGX_CLOSE_EVENT);
    }

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    if (node->flush.posted) {
        ngx_delete_posted_event(&node->flush);
    }

    ngx_free_connection(c);
    c->fd = (ngx_socket_t) -1;

    was_up = (node->state == NGX_HTTP_CREDITS_REDIS_UP);

    if (was_up && node->ac && node->ac->err) {
        ngx_log_error(NGX_LOG_ERR, node->log, 0,
                      "credits: redis %V: connection lost: %s",
                      &node->addr.name, node->ac->errstr);
    }

    node->ac = NULL;
    node->conn = NULL;
    node->state = NGX_HTTP_CREDITS_REDIS_DOWN;
    node->pending = 0;

    if (node->stall_timer.timer_set) {
        ngx_del_timer(&node->stall_timer);
    }

    if (node->connect_timer.timer_set) {
        ngx_del_timer(&node->connect_timer);
    }

    node->next_try = ngx_current_msec + node->backoff;

    if (node->persistent && !ngx_terminate) {
        ngx_add_timer(&node->connect_timer, node->backoff);
    }

    node->backoff = ngx_min(node->backoff * 2, NGX_HTTP_CREDITS_BACKOFF_MAX);

    ngx_http_credits_router_node_lost(node, was_up);
}
