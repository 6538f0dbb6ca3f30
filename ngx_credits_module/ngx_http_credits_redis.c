
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The Redis adapter: hiredis's async API driven by nginx's event loop.
 *
 * One connection per worker, every command pipelined on it.  The hiredis
 * socket is wrapped in an nginx connection whose read and write events
 * call redisAsyncHandleRead/Write; hiredis asks for reading and writing
 * through its ev hooks, which add and delete level-triggered events (the
 * model hiredis is written for: it reads and writes once per call).
 * Once connected, commands are not written one by one: hiredis's request
 * to write posts one flush event, so every command issued in an event loop
 * iteration leaves in one write(), and the socket is watched for
 * writability only when that write could not finish.
 * Connect and stalls are bounded by nginx timers; a lost connection fails
 * every pending command (its handler gets a NULL reply) and is made again
 * with backoff, also while the worker shuts down gracefully (its settles
 * may wait for Redis; the connect timer is cancelable, so it never keeps
 * the worker alive by itself).  Nothing here ever blocks: addresses are
 * resolved at configuration time.
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


typedef struct {
    redisAsyncContext              *ac;
    ngx_connection_t               *conn;
    ngx_http_credits_redis_conf_t  *conf;
    ngx_log_t                      *log;

    ngx_event_t                     connect_timer;  /* connect, backoff */
    ngx_event_t                     stall_timer;    /* replies overdue */
    ngx_event_t                     flush;          /* write the commands */

    ngx_uint_t                      state;
    ngx_uint_t                      pending;
    ngx_uint_t                      reconnects;
    ngx_msec_t                      backoff;
    unsigned                        flushing:1;
} ngx_http_credits_redis_t;


static void ngx_http_credits_redis_connect(void);
static void ngx_http_credits_redis_reconnect_handler(ngx_event_t *ev);
static void ngx_http_credits_redis_stall_handler(ngx_event_t *ev);
static void ngx_http_credits_redis_on_connect(const redisAsyncContext *ac,
    int status);
static void ngx_http_credits_redis_setup(void);
static void ngx_http_credits_redis_setup_reply(redisAsyncContext *ac,
    void *r, void *privdata);
static ngx_int_t ngx_http_credits_redis_send(ngx_http_credits_redis_cmd_t *cmd);
static u_char *ngx_http_credits_redis_length(u_char *p, u_char type,
    size_t n);
static void ngx_http_credits_redis_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_credits_redis_read_handler(ngx_event_t *ev);
static void ngx_http_credits_redis_write_handler(ngx_event_t *ev);
static void ngx_http_credits_redis_add_read(void *data);
static void ngx_http_credits_redis_del_read(void *data);
static void ngx_http_credits_redis_flush_handler(ngx_event_t *ev);
static void ngx_http_credits_redis_add_write(void *data);
static void ngx_http_credits_redis_del_write(void *data);
static void ngx_http_credits_redis_cleanup(void *data);


static ngx_http_credits_redis_t  ngx_http_credits_redis;


ngx_int_t
ngx_http_credits_redis_init(ngx_cycle_t *cycle,
    ngx_http_credits_redis_conf_t *conf)
{
    ngx_http_credits_redis_t  *rd = &ngx_http_credits_redis;

    ngx_memzero(rd, sizeof(ngx_http_credits_redis_t));

    rd->conf = conf;
    rd->log = cycle->log;
    rd->backoff = NGX_HTTP_CREDITS_BACKOFF_MIN;

    rd->connect_timer.handler = ngx_http_credits_redis_reconnect_handler;
    rd->connect_timer.log = cycle->log;
    rd->connect_timer.data = rd;
    rd->connect_timer.cancelable = 1;

    /* not cancelable: a worker shutting down waits for settles in flight */
    rd->stall_timer.handler = ngx_http_credits_redis_stall_handler;
    rd->stall_timer.log = cycle->log;
    rd->stall_timer.data = rd;

    rd->flush.handler = ngx_http_credits_redis_flush_handler;
    rd->flush.log = cycle->log;
    rd->flush.data = rd;

    ngx_http_credits_count_redis(0, 0);
    ngx_http_credits_redis_connect();

    return NGX_OK;
}


void
ngx_http_credits_redis_exit(void)
{
    ngx_http_credits_redis_t  *rd = &ngx_http_credits_redis;

    if (rd->connect_timer.timer_set) {
        ngx_del_timer(&rd->connect_timer);
    }

    if (rd->ac) {
        /* pending handlers run now, with a NULL reply */
        redisAsyncFree(rd->ac);
    }
}


/* work waits for the connection while the worker exits: try again soon */

void
ngx_http_credits_redis_hurry(void)
{
    ngx_http_credits_redis_t  *rd = &ngx_http_credits_redis;

    if (rd->ac == NULL && rd->backoff > NGX_HTTP_CREDITS_BACKOFF_MIN) {
        rd->backoff = NGX_HTTP_CREDITS_BACKOFF_MIN;
        ngx_add_timer(&rd->connect_timer, NGX_HTTP_CREDITS_BACKOFF_MIN);
    }
}


ngx_uint_t
ngx_http_credits_redis_state(void)
{
    return ngx_http_credits_redis.state;
}


ngx_uint_t
ngx_http_credits_redis_reconnects(void)
{
    return ngx_http_credits_redis.reconnects;
}


static void
ngx_http_credits_redis_connect(void)
{
    ngx_http_credits_redis_t  *rd = &ngx_http_credits_redis;

    ngx_connection_t   *c;
    redisAsyncContext  *ac;

    if (rd->conf->unix_socket) {
        ac = redisAsyncConnectUnix((char *) rd->conf->host.data);

    } else {
        ac = redisAsyncConnect((char *) rd->conf->host.data, rd->conf->port);
    }

    if (ac == NULL || ac->err) {
        ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                      "credits: redis %V: cannot connect: %s",
                      &rd->conf->name, ac ? ac->errstr : "out of memory");
        if (ac) {
            redisAsyncFree(ac);
        }

        goto retry;
    }

    c = ngx_get_connection(ac->c.fd, rd->log);
    if (c == NULL) {
        redisAsyncFree(ac);
        goto retry;
    }

    c->data = rd;
    c->log = rd->log;
    c->read->handler = ngx_http_credits_redis_read_handler;
    c->write->handler = ngx_http_credits_redis_write_handler;
    c->read->log = rd->log;
    c->write->log = rd->log;

    rd->ac = ac;
    rd->conn = c;
    rd->state = NGX_HTTP_CREDITS_REDIS_CONNECTING;

    ac->ev.data = c;
    ac->ev.addRead = ngx_http_credits_redis_add_read;
    ac->ev.delRead = ngx_http_credits_redis_del_read;
    ac->ev.addWrite = ngx_http_credits_redis_add_write;
    ac->ev.delWrite = ngx_http_credits_redis_del_write;
    ac->ev.cleanup = ngx_http_credits_redis_cleanup;

    redisAsyncSetConnectCallback(ac, ngx_http_credits_redis_on_connect);

    /* writable means connected (or refused); hiredis asked for it already
     * in redisAsyncSetConnectCallback(), this says so where it matters */
    ngx_http_credits_redis_add_write(c);

    ngx_add_timer(&rd->connect_timer, rd->conf->timeout);

    /* AUTH, SELECT and SCRIPT LOAD go first on the new connection */
    ngx_http_credits_redis_setup();

    return;

retry:

    ngx_add_timer(&rd->connect_timer, rd->backoff);
    rd->backoff = ngx_min(rd->backoff * 2, NGX_HTTP_CREDITS_BACKOFF_MAX);
}


static void
ngx_http_credits_redis_reconnect_handler(ngx_event_t *ev)
{
    ngx_http_credits_redis_t  *rd = ev->data;

    if (rd->state == NGX_HTTP_CREDITS_REDIS_CONNECTING) {
        ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                      "credits: redis %V: connect timed out after %Mms",
                      &rd->conf->name, rd->conf->timeout);

        redisAsyncFree(rd->ac);     /* reconnects through the cleanup hook */
        return;
    }

    /* a worker shutting down gracefully still reconnects: settles wait */
    if (rd->ac == NULL && !ngx_terminate) {
        rd->reconnects++;
        ngx_http_credits_redis_connect();
    }
}


static void
ngx_http_credits_redis_stall_handler(ngx_event_t *ev)
{
    ngx_http_credits_redis_t  *rd = ev->data;

    ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                  "credits: redis %V: no reply within %Mms, %ui commands "
                  "pending: dropping the connection",
                  &rd->conf->name,
                  rd->conf->timeout * NGX_HTTP_CREDITS_STALL_FACTOR,
                  rd->pending);

    if (rd->ac) {
        redisAsyncFree(rd->ac);
    }
}


static void
ngx_http_credits_redis_on_connect(const redisAsyncContext *ac, int status)
{
    ngx_http_credits_redis_t  *rd = &ngx_http_credits_redis;

    if (rd->connect_timer.timer_set) {
        ngx_del_timer(&rd->connect_timer);
    }

    if (status != REDIS_OK) {
        ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                      "credits: redis %V: cannot connect: %s",
                      &rd->conf->name, ac->errstr);
        return;     /* hiredis frees the context: see the cleanup hook */
    }

    rd->state = NGX_HTTP_CREDITS_REDIS_UP;
    rd->backoff = NGX_HTTP_CREDITS_BACKOFF_MIN;

    ngx_http_credits_count_redis(1, rd->reconnects);

    ngx_log_error(NGX_LOG_INFO, rd->log, 0,
                  "credits: redis %V: connected", &rd->conf->name);
}


static void
ngx_http_credits_redis_setup(void)
{
    ngx_http_credits_redis_t  *rd = &ngx_http_credits_redis;

    u_char                      db[NGX_INT_T_LEN];
    const char                 *argv[3];
    size_t                      argvlen[3];
    ngx_http_credits_script_t **s;

    if (rd->conf->password.len) {
        argv[0] = "AUTH";
        argvlen[0] = 4;
        argv[1] = (const char *) rd->conf->password.data;
        argvlen[1] = rd->conf->password.len;

        redisAsyncCommandArgv(rd->ac, ngx_http_credits_redis_setup_reply,
                              "AUTH", 2, argv, argvlen);
    }

    if (rd->conf->db) {
        argv[0] = "SELECT";
        argvlen[0] = 6;
        argv[1] = (const char *) db;
        argvlen[1] = ngx_sprintf(db, "%i", rd->conf->db) - db;

        redisAsyncCommandArgv(rd->ac, ngx_http_credits_redis_setup_reply,
                              "SELECT", 2, argv, argvlen);
    }

    for (s = ngx_http_credits_scripts; *s; s++) {
        argv[0] = "SCRIPT";
        argvlen[0] = 6;
        argv[1] = "LOAD";
        argvlen[1] = 4;
        argv[2] = (const char *) (*s)->body.data;
        argvlen[2] = (*s)->body.len;

        redisAsyncCommandArgv(rd->ac, ngx_http_credits_redis_setup_reply,
                              "SCRIPT LOAD", 3, argv, argvlen);
    }
}


/* a failed AUTH or SELECT would send every later command to the wrong
 * place or nowhere: drop the connection and try again with backoff */

static void
ngx_http_credits_redis_setup_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    ngx_str_t                  err;
    redisReply                *reply = r;
    ngx_http_credits_redis_t  *rd = &ngx_http_credits_redis;

    if (reply == NULL || reply->type != REDIS_REPLY_ERROR) {
        return;
    }

    ngx_http_credits_reply_error(reply, &err);

    ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                  "credits: redis %V: %s failed: %V",
                  &rd->conf->name, (char *) privdata, &err);

    redisAsyncDisconnect(ac);
}


/*
 * Sends a command, or a script by its SHA1 when "script" is set (the
 * arguments then start with numkeys).  The command is formatted in the
 * protocol once, into memory of its own that also keeps the arguments
 * (cmd->argv points into it, unterminated): a NOSCRIPT reply (Redis
 * restarted or flushed) loads the script again and sends the same bytes
 * once more.  Returns NGX_DECLINED, and never calls the handler, when
 * Redis is not connected.
 */

ngx_int_t
ngx_http_credits_redis_command(ngx_http_credits_script_t *script, int argc,
    const char **argv, const size_t *argvlen,
    ngx_http_credits_redis_handler_pt handler, void *data,
    ngx_http_credits_redis_cmd_t **cmdp)
{
    int                            i, n;
    u_char                        *p;
    size_t                         size;
    const char                    *arg;
    ngx_http_credits_redis_cmd_t  *cmd;

    if (ngx_http_credits_redis.state == NGX_HTTP_CREDITS_REDIS_DOWN) {
        return NGX_DECLINED;
    }

    n = argc + (script ? 2 : 0);

    /* "*n\r\n", then "$len\r\narg\r\n" for each argument */
    size = sizeof(ngx_http_credits_redis_cmd_t)
           + n * (sizeof(char *) + sizeof(size_t))
           + 1 + NGX_INT_T_LEN + 2
           + n * (1 + NGX_SIZE_T_LEN + 4)
           + (script ? sizeof("EVALSHA") - 1 + 40 : 0);

    for (i = 0; i < argc; i++) {
        size += argvlen[i];
    }

    cmd = ngx_alloc(size, ngx_cycle->log);
    if (cmd == NULL) {
        return NGX_ERROR;
    }

    cmd->handler = handler;
    cmd->data = data;
    cmd->script = script;
    cmd->start = ngx_current_msec;
    cmd->retried = 0;
    cmd->argc = n;
    cmd->argv = (const char **) (cmd + 1);
    cmd->argvlen = (size_t *) (cmd->argv + n);
    cmd->formatted = (u_char *) (cmd->argvlen + n);

    p = ngx_http_credits_redis_length(cmd->formatted, '*', n);

    for (i = -(script ? 2 : 0); i < argc; i++) {

        if (i == -2) {
            arg = "EVALSHA";
            cmd->argvlen[0] = 7;

        } else if (i == -1) {
            arg = (const char *) script->sha1;
            cmd->argvlen[1] = 40;

        } else {
            arg = argv[i];
            cmd->argvlen[n - argc + i] = argvlen[i];
        }

        size = cmd->argvlen[n - argc + i];

        p = ngx_http_credits_redis_length(p, '$', size);
        cmd->argv[n - argc + i] = (const char *) p;
        p = ngx_cpymem(p, arg, size);
        *p++ = '\r';
        *p++ = '\n';
    }

    cmd->formatted_len = p - cmd->formatted;

    if (ngx_http_credits_redis_send(cmd) != NGX_OK) {
        ngx_free(cmd);
        return NGX_DECLINED;
    }

    if (cmdp) {
        *cmdp = cmd;
    }

    return NGX_OK;
}


/* "*n\r\n" or "$n\r\n": every argument has one */

static u_char *
ngx_http_credits_redis_length(u_char *p, u_char type, size_t n)
{
    *p++ = type;
    p = ngx_http_credits_write_int(p, (ngx_int_t) n);
    *p++ = '\r';
    *p++ = '\n';

    return p;
}


static ngx_int_t
ngx_http_credits_redis_send(ngx_http_credits_redis_cmd_t *cmd)
{
    ngx_http_credits_redis_t  *rd = &ngx_http_credits_redis;

    if (rd->ac == NULL
        || redisAsyncFormattedCommand(rd->ac, ngx_http_credits_redis_reply,
                                      cmd, (const char *) cmd->formatted,
                                      cmd->formatted_len)
           != REDIS_OK)
    {
        return NGX_DECLINED;
    }

    if (rd->pending++ == 0) {
        ngx_add_timer(&rd->stall_timer,
                      rd->conf->timeout * NGX_HTTP_CREDITS_STALL_FACTOR);
    }

    return NGX_OK;
}


static void
ngx_http_credits_redis_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    redisReply                    *reply = r;
    ngx_http_credits_redis_t      *rd = &ngx_http_credits_redis;
    ngx_http_credits_redis_cmd_t  *cmd = privdata;

    const char  *argv[3];
    size_t       argvlen[3];

    /* every reply is progress: the stall timer restarts or stops */

    if (--rd->pending == 0) {
        if (rd->stall_timer.timer_set) {
            ngx_del_timer(&rd->stall_timer);
        }

    } else {
        ngx_add_timer(&rd->stall_timer,
                      rd->conf->timeout * NGX_HTTP_CREDITS_STALL_FACTOR);
    }

    if (reply && reply->type == REDIS_REPLY_ERROR && cmd->script
        && !cmd->retried
        && ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0)
    {
        ngx_log_error(NGX_LOG_NOTICE, rd->log, 0,
                      "credits: redis %V: script \"%V\" not loaded, "
                      "loading it again", &rd->conf->name, &cmd->script->name);

        argv[0] = "SCRIPT";
        argvlen[0] = 6;
        argv[1] = "LOAD";
        argvlen[1] = 4;
        argv[2] = (const char *) cmd->script->body.data;
        argvlen[2] = cmd->script->body.len;

        cmd->retried = 1;

        /* pipelined: the script is loaded before the EVALSHA runs again */
        if (redisAsyncCommandArgv(ac, ngx_http_credits_redis_setup_reply,
                                  "SCRIPT LOAD", 3, argv, argvlen)
            == REDIS_OK
            && ngx_http_credits_redis_send(cmd) == NGX_OK)
        {
            return;
        }

        reply = NULL;
    }

    cmd->handler(cmd, reply);

    ngx_free(cmd);
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
ngx_http_credits_redis_read_handler(ngx_event_t *ev)
{
    ngx_connection_t          *c = ev->data;
    ngx_http_credits_redis_t  *rd = c->data;

    redisAsyncHandleRead(rd->ac);
}


static void
ngx_http_credits_redis_write_handler(ngx_event_t *ev)
{
    ngx_connection_t          *c = ev->data;
    ngx_http_credits_redis_t  *rd = c->data;

    redisAsyncHandleWrite(rd->ac);
}


static void
ngx_http_credits_redis_add_read(void *data)
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
ngx_http_credits_redis_del_read(void *data)
{
    ngx_connection_t  *c = data;

    if (c->read->active) {
        ngx_del_event(c->read, NGX_READ_EVENT, 0);
    }
}


static void
ngx_http_credits_redis_flush_handler(ngx_event_t *ev)
{
    ngx_http_credits_redis_t  *rd = ev->data;

    if (rd->ac == NULL) {
        return;
    }

    rd->flushing = 1;
    redisAsyncHandleWrite(rd->ac);
    rd->flushing = 0;
}


/*
 * Before the connect completes, and when a flush could not write all,
 * wait for the socket to become writable; otherwise flush once, soon.
 */

static void
ngx_http_credits_redis_add_write(void *data)
{
    ngx_connection_t          *c = data;
    ngx_http_credits_redis_t  *rd = c->data;

    if (c->write->active) {
        return;
    }

    if (rd->flushing || rd->state != NGX_HTTP_CREDITS_REDIS_UP) {
        if (ngx_add_event(c->write, NGX_WRITE_EVENT, NGX_LEVEL_EVENT)
            != NGX_OK)
        {
            ngx_log_error(NGX_LOG_ALERT, c->log, 0,
                          "credits: cannot watch the redis socket");
        }

        return;
    }

    if (!rd->flush.posted) {
        ngx_post_event(&rd->flush, &ngx_posted_events);
    }
}


static void
ngx_http_credits_redis_del_write(void *data)
{
    ngx_connection_t  *c = data;

    if (c->write->active) {
        ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
    }
}


/* hiredis is freeing the context and will close the socket itself */

static void
ngx_http_credits_redis_cleanup(void *data)
{
    ngx_connection_t          *c = data;
    ngx_http_credits_redis_t  *rd = c->data;

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

    if (rd->flush.posted) {
        ngx_delete_posted_event(&rd->flush);
    }

    ngx_free_connection(c);
    c->fd = (ngx_socket_t) -1;

    if (rd->state == NGX_HTTP_CREDITS_REDIS_UP && rd->ac && rd->ac->err) {
        ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                      "credits: redis %V: connection lost: %s",
                      &rd->conf->name, rd->ac->errstr);
    }

    rd->ac = NULL;
    rd->conn = NULL;
    rd->state = NGX_HTTP_CREDITS_REDIS_DOWN;
    rd->pending = 0;

    ngx_http_credits_count_redis(0, rd->reconnects);

    if (rd->stall_timer.timer_set) {
        ngx_del_timer(&rd->stall_timer);
    }

    if (rd->connect_timer.timer_set) {
        ngx_del_timer(&rd->connect_timer);
    }

    if (!ngx_terminate) {
        ngx_add_timer(&rd->connect_timer, rd->backoff);
        rd->backoff = ngx_min(rd->backoff * 2, NGX_HTTP_CREDITS_BACKOFF_MAX);
    }
}
