
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The Redis router: which node connection (ngx_http_credits_redis.c)
 * serves a command, and what a reply that is a redirection means.
 *
 * The configured addresses are seeds, tried in turn.  The first
 * connection asks "INFO cluster": a standalone Redis is one node and no
 * slots, every command goes to it as it always did; until the answer is
 * in, commands go to that node too (a cluster redirects those it does not
 * serve).  In a cluster the slot map comes from CLUSTER SLOTS, one
 * connection per master, opened when a command first needs it.
 *
 * A command is sent again, with the same bytes (so the same hold id: the
 * scripts are idempotent per hold id), only when Redis said it did not
 * run it: MOVED (the slot is patched, the map refreshed), ASK (ASKING on
 * the target first, the map unchanged), TRYAGAIN, CLUSTERDOWN, LOADING,
 * MASTERDOWN, READONLY, NOSCRIPT (loaded on that node first), or when it
 * was never written (its node was down or still connecting).  Waits are
 * jittered and end with "timeout"; then the handler gets a NULL reply, as
 * for a connection lost with the command in it, and its caller decides
 * (credits_fail, the settle's resend queue, a release).
 *
 * Map refreshes go one at a time and at most once a second per worker: a
 * failover makes every worker of every gateway ask, and a storm of
 * CLUSTER SLOTS is what a cluster in trouble can do without.
 */


#include "ngx_http_credits_module.h"

#include "ngx_http_credits_router.h"


static ngx_int_t ngx_http_credits_router_send(
    ngx_http_credits_redis_cmd_t *cmd);
static ngx_int_t ngx_http_credits_router_redirect(
    ngx_http_credits_node_t *node, ngx_http_credits_redis_cmd_t *cmd,
    redisReply *reply);
static ngx_http_credits_node_t *ngx_http_credits_router_target(
    redisReply *reply, ngx_int_t *slot);
static void ngx_http_credits_router_pause(ngx_http_credits_redis_cmd_t *cmd,
    const char *why);
static void ngx_http_credits_router_retry_handler(ngx_event_t *ev);
static void ngx_http_credits_router_done(ngx_http_credits_redis_cmd_t *cmd,
    redisReply *reply);
static u_char *ngx_http_credits_router_length(u_char *p, u_char type,
    size_t n);


ngx_http_credits_router_t  *ngx_http_credits_router;


ngx_int_t
ngx_http_credits_redis_init(ngx_cycle_t *cycle,
    ngx_http_credits_redis_conf_t *conf)
{
    ngx_uint_t                      i;
    ngx_http_credits_router_t      *rt;
    ngx_http_credits_redis_addr_t  *addr;

    rt = ngx_calloc(sizeof(ngx_http_credits_router_t), cycle->log);
    if (rt == NULL) {
        return NGX_ERROR;
    }

    rt->nodes = ngx_calloc(NGX_HTTP_CREDITS_NODES_MAX * sizeof(void *),
                           cycle->log);
    if (rt->nodes == NULL) {
        ngx_free(rt);
        return NGX_ERROR;
    }

    rt->conf = conf;
    rt->log = cycle->log;

    ngx_http_credits_router = rt;

    ngx_http_credits_slots_init(rt);

    ngx_http_credits_count_redis(0, 0);

    /* the addresses are sentinels: the master is the one they name */
    if (conf->sentinel.len) {
        rt->mode = NGX_HTTP_CREDITS_MODE_STANDALONE;
        return ngx_http_credits_sentinel_init(rt);
    }

    addr = conf->addrs->elts;

    for (i = 0; i < conf->addrs->nelts; i++) {
        if (ngx_http_credits_router_add(&addr[i]) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    rt->nseeds = rt->nnodes;

    ngx_http_credits_node_keep(rt->nodes[0], 1, 1);
    (void) ngx_http_credits_node_connect(rt->nodes[0]);

    return NGX_OK;
}


ngx_int_t
ngx_http_credits_router_add(ngx_http_credits_redis_addr_t *addr)
{
    ngx_http_credits_node_t    *node;
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    if (rt->nnodes == NGX_HTTP_CREDITS_NODES_MAX) {
        ngx_log_error(NGX_LOG_ERR, rt->log, 0,
                      "credits: redis: more than %d nodes, ignoring %V",
                      NGX_HTTP_CREDITS_NODES_MAX, &addr->name);
        return NGX_DECLINED;
    }

    node = ngx_http_credits_node_create(addr, rt->conf, rt->log);
    if (node == NULL) {
        return NGX_ERROR;
    }

    rt->nodes[rt->nnodes++] = node;

    return NGX_OK;
}


void
ngx_http_credits_redis_exit(void)
{
    ngx_uint_t                  i;
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    if (rt == NULL) {
        return;
    }

    /* the nodes' pending commands get their NULL replies, nothing more */
    rt->exiting = 1;

    if (rt->refresh.timer_set) {
        ngx_del_timer(&rt->refresh);
    }

    if (rt->sentinel) {
        ngx_http_credits_sentinel_exit(rt);
    }

    for (i = 0; i < rt->nnodes; i++) {
        ngx_http_credits_node_free(rt->nodes[i]);
    }

    ngx_free(rt->nodes);
    ngx_free(rt);

    ngx_http_credits_router = NULL;
}


/* settles wait for Redis while the worker exits: connect again soon */

void
ngx_http_credits_redis_hurry(void)
{
    ngx_uint_t                  i;
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    for (i = 0; i < rt->nnodes; i++) {
        ngx_http_credits_node_hurry(rt->nodes[i]);
    }
}


/*
 * Whether a command can be taken now.  A standalone Redis takes it only
 * while connected, or connecting (hiredis keeps it until then); a cluster
 * always, its router waits for the node that serves it, within timeout=.
 * Until the probe answers, a db other than 0 waits: a cluster has none.
 */

ngx_uint_t
ngx_http_credits_redis_state(void)
{
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    /* the sentinels are being asked: a command waits, within timeout= */
    if (rt->sentinel) {
        return (rt->nnodes && ngx_http_credits_node_state(rt->nodes[0])
                              == NGX_HTTP_CREDITS_REDIS_UP)
               ? NGX_HTTP_CREDITS_REDIS_UP : NGX_HTTP_CREDITS_REDIS_CONNECTING;
    }

    switch (rt->mode) {

    case NGX_HTTP_CREDITS_MODE_CLUSTER:
        return NGX_HTTP_CREDITS_REDIS_UP;

    case NGX_HTTP_CREDITS_MODE_BROKEN:
        return NGX_HTTP_CREDITS_REDIS_DOWN;

    case NGX_HTTP_CREDITS_MODE_UNKNOWN:
        if (rt->conf->db) {
            return NGX_HTTP_CREDITS_REDIS_DOWN;
        }

        /* fall through */

    default:
        return ngx_http_credits_node_state(rt->nodes[rt->seed]);
    }
}


/*
 * Sends a command for "key" (NULL: any node), or a script by its SHA1
 * when "script" is set (the arguments then start with numkeys).  The
 * command is formatted in the protocol once, into memory of its own: a
 * redirection sends the same bytes again.  Returns NGX_DECLINED, and
 * never calls the handler, when Redis cannot take it (see _state()).
 */

ngx_int_t
ngx_http_credits_redis_command(ngx_str_t *key,
    ngx_http_credits_script_t *script, int argc, const char **argv,
    const size_t *argvlen, ngx_http_credits_redis_handler_pt handler,
    void *data)
{
    int                            i, n;
    u_char                        *p;
    size_t                         size;
    ngx_http_credits_redis_cmd_t  *cmd;

    if (ngx_http_credits_redis_state() == NGX_HTTP_CREDITS_REDIS_DOWN) {
        return NGX_DECLINED;
    }

    n = argc + (script ? 2 : 0);

    /* "*n\r\n", then "$len\r\narg\r\n" for each argument */
    size = sizeof(ngx_http_credits_redis_cmd_t)
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

    ngx_memzero(cmd, sizeof(ngx_http_credits_redis_cmd_t));

    cmd->handler = handler;
    cmd->data = data;
    cmd->script = script;
    cmd->start = ngx_current_msec;
    cmd->slot = key ? (ngx_int_t) ngx_http_credits_key_slot(key->data,
                                                            key->len)
                    : -1;
    cmd->formatted = (u_char *) (cmd + 1);

    p = ngx_http_credits_router_length(cmd->formatted, '*', n);

    if (script) {
        p = ngx_http_credits_router_length(p, '$', 7);
        p = ngx_cpymem(p, "EVALSHA\r\n", 9);
        p = ngx_http_credits_router_length(p, '$', 40);
        p = ngx_cpymem(p, script->sha1, 40);
        *p++ = '\r';
        *p++ = '\n';
    }

    for (i = 0; i < argc; i++) {
        p = ngx_http_credits_router_length(p, '$', argvlen[i]);
        p = ngx_cpymem(p, argv[i], argvlen[i]);
        *p++ = '\r';
        *p++ = '\n';
    }

    cmd->formatted_len = p - cmd->formatted;

    if (ngx_http_credits_router_send(cmd) == NGX_OK) {
        return NGX_OK;
    }

    if (ngx_http_credits_router->mode != NGX_HTTP_CREDITS_MODE_CLUSTER
        && ngx_http_credits_router->sentinel == NULL)
    {
        ngx_free(cmd);
        return NGX_DECLINED;
    }

    /* a cluster node is down, its slot has no master yet, or the
     * sentinels are naming a master: wait */
    ngx_http_credits_router_refresh(NULL);
    ngx_http_credits_router_pause(cmd, NULL);

    return NGX_OK;
}


/* "*n\r\n" or "$n\r\n": every argument has one */

static u_char *
ngx_http_credits_router_length(u_char *p, u_char type, size_t n)
{
    *p++ = type;
    p = ngx_http_credits_write_int(p, (ngx_int_t) n);
    *p++ = '\r';
    *p++ = '\n';

    return p;
}


/* to the ASK target, the slot's master, or the Redis; connects on demand */

static ngx_int_t
ngx_http_credits_router_send(ngx_http_credits_redis_cmd_t *cmd)
{
    size_t                      asking_len[1];
    const char                 *asking[1];
    ngx_uint_t                  i;
    ngx_http_credits_node_t    *node;
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    node = cmd->node;

    if (node == NULL) {
        if (rt->mode != NGX_HTTP_CREDITS_MODE_CLUSTER) {
            node = rt->nnodes ? rt->nodes[rt->seed] : NULL;

        } else if (cmd->slot >= 0) {
            node = rt->slots[cmd->slot];

        } else {
            for (i = 0; i < rt->nnodes; i++) {
                if (ngx_http_credits_node_state(rt->nodes[i])
                    == NGX_HTTP_CREDITS_REDIS_UP)
                {
                    node = rt->nodes[i];
                    break;
                }
            }
        }
    }

    if (node == NULL
        || ngx_http_credits_node_connect(node) == NGX_HTTP_CREDITS_REDIS_DOWN)
    {
        return NGX_DECLINED;
    }

    if (cmd->asking) {
        asking[0] = "ASKING";
        asking_len[0] = 6;

        if (ngx_http_credits_node_internal(node, 1, asking, asking_len, NULL,
                                           NULL)
            != NGX_OK)
        {
            return NGX_DECLINED;
        }
    }

    return ngx_http_credits_node_send(node, cmd);
}


/*
 * A node's reply to a command.  "sent": the command may have reached
 * Redis (a NULL reply then leaves its effect unknown, and the caller
 * deals with it: release, resend); a cluster's command that never left
 * waits for another try.
 */

void
ngx_http_credits_router_reply(ngx_http_credits_node_t *node,
    ngx_http_credits_redis_cmd_t *cmd, redisReply *reply, ngx_uint_t sent)
{
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    if (rt->exiting) {
        ngx_http_credits_router_done(cmd, reply);
        return;
    }

    if (reply == NULL) {
        if (!sent && (rt->mode == NGX_HTTP_CREDITS_MODE_CLUSTER
                      || rt->sentinel))
        {
            cmd->node = NULL;
            cmd->asking = 0;
            ngx_http_credits_router_pause(cmd, "node unavailable");
            return;
        }

        ngx_http_credits_router_done(cmd, NULL);
        return;
    }

    if (reply->type == REDIS_REPLY_ERROR
        && ngx_http_credits_router_redirect(node, cmd, reply) == NGX_OK)
    {
        return;
    }

    ngx_http_credits_router_done(cmd, reply);
}


/* NGX_OK: the error said the command did not run, and it goes again */

static ngx_int_t
ngx_http_credits_router_redirect(ngx_http_credits_node_t *node,
    ngx_http_credits_redis_cmd_t *cmd, redisReply *reply)
{
    ngx_int_t                   slot;
    ngx_str_t                   err;
    ngx_http_credits_node_t    *target;
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    err.data = (u_char *) reply->str;
    err.len = reply->len;

#define ngx_http_credits_is(prefix)                                          \
    (err.len >= sizeof(prefix) - 1                                           \
     && ngx_strncmp(err.data, prefix, sizeof(prefix) - 1) == 0)

    if (ngx_http_credits_is("MOVED ") || ngx_http_credits_is("ASK ")) {

        if (++cmd->hops > NGX_HTTP_CREDITS_HOPS_MAX) {
            ngx_log_error(NGX_LOG_ERR, rt->log, 0,
                          "credits: redis: too many redirections, last: %V",
                          &err);
            ngx_http_credits_router_done(cmd, NULL);
            return NGX_OK;
        }

        target = ngx_http_credits_router_target(reply, &slot);
        if (target == NULL) {
            return NGX_DECLINED;
        }

        if (err.data[0] == 'M') {
            rt->mode = NGX_HTTP_CREDITS_MODE_CLUSTER;
            rt->slots[slot] = target;
            cmd->node = NULL;
            cmd->asking = 0;
            ngx_http_credits_router_refresh(NULL);

        } else {
            cmd->node = target;
            cmd->asking = 1;
        }

        /* seen during resharding and failover only */
        ngx_log_error(NGX_LOG_INFO, rt->log, 0, "credits: redis %V: %V",
                      &ngx_http_credits_node_addr(node)->name, &err);

        if (ngx_http_credits_router_send(cmd) != NGX_OK) {
            ngx_http_credits_router_pause(cmd, "redirected to a node that "
                                          "is unavailable");
        }

        return NGX_OK;
    }

    if (ngx_http_credits_is("NOSCRIPT") && cmd->script) {

        if (++cmd->hops > NGX_HTTP_CREDITS_HOPS_MAX) {
            return NGX_DECLINED;
        }

        ngx_log_error(NGX_LOG_NOTICE, rt->log, 0,
                      "credits: redis %V: script \"%V\" not loaded, "
                      "loading it again",
                      &ngx_http_credits_node_addr(node)->name,
                      &cmd->script->name);

        /* pipelined: loaded before the script runs again; ASKING again */
        cmd->node = cmd->asking ? cmd->node : node;

        if (ngx_http_credits_node_load(node, cmd->script) != NGX_OK
            || ngx_http_credits_router_send(cmd) != NGX_OK)
        {
            ngx_http_credits_router_pause(cmd, "cannot load the script");
            return NGX_OK;
        }

        /* the slot may move on: only an ASK pins the node */
        cmd->node = cmd->asking ? cmd->node : NULL;

        return NGX_OK;
    }

    if (ngx_http_credits_is("TRYAGAIN")) {
        /*
         * A script's keys are half migrated: the source has some of
         * them, or the target, after ASK, not all of them yet (a
         * project without an open hold has no holds key).  Asked again
         * until the migration moves on: a wait that timeout= bounds,
         * not a redirection loop, so the hops start over.
         */
        ngx_log_error(NGX_LOG_INFO, rt->log, 0, "credits: redis %V: %V",
                      &ngx_http_credits_node_addr(node)->name, &err);

        cmd->node = NULL;
        cmd->asking = 0;
        cmd->hops = 0;
        ngx_http_credits_router_pause(cmd, "a slot migrating");
        return NGX_OK;
    }

    if (ngx_http_credits_is("CLUSTERDOWN") || ngx_http_credits_is("LOADING")
        || ngx_http_credits_is("MASTERDOWN") || ngx_http_credits_is("READONLY"))
    {
        ngx_log_error(NGX_LOG_WARN, rt->log, 0,
                      "credits: redis %V: %V",
                      &ngx_http_credits_node_addr(node)->name, &err);

        cmd->node = NULL;
        cmd->asking = 0;

        /*
         * A cluster's map says who serves now.  A standalone Redis
         * (or a Sentinel's master) that is loading or was demoted is
         * connected to again: its name may point elsewhere by now.
         */
        if (rt->mode == NGX_HTTP_CREDITS_MODE_CLUSTER) {
            ngx_http_credits_router_refresh(node);

        } else if (!ngx_http_credits_is("CLUSTERDOWN")) {
            ngx_http_credits_node_drop(node, "it cannot serve");
        }

        ngx_http_credits_router_pause(cmd, "a node that cannot serve");
        return NGX_OK;
    }

#undef ngx_http_credits_is

    return NGX_DECLINED;
}


/* "MOVED 3999 127.0.0.1:6381", "ASK 3999 127.0.0.1:6381" */

static ngx_http_credits_node_t *
ngx_http_credits_router_target(redisReply *reply, ngx_int_t *slot)
{
    u_char     *p, *last, *colon;
    ngx_int_t   port;

    p = (u_char *) reply->str;
    last = p + reply->len;

    p = ngx_strlchr(p, last, ' ');
    if (p == NULL) {
        goto invalid;
    }

    colon = ngx_strlchr(++p, last, ' ');
    if (colon == NULL) {
        goto invalid;
    }

    *slot = ngx_atoi(p, colon - p);
    if (*slot == NGX_ERROR || *slot >= NGX_HTTP_CREDITS_SLOTS) {
        goto invalid;
    }

    p = colon + 1;

    for (colon = last - 1; colon > p && *colon != ':'; colon--) {
        /* void */
    }

    port = ngx_atoi(colon + 1, last - colon - 1);
    if (colon == p || port < 1 || port > 65535) {
        goto invalid;
    }

    return ngx_http_credits_router_node(p, colon - p, (in_port_t) port);

invalid:

    ngx_log_error(NGX_LOG_ERR, ngx_http_credits_router->log, 0,
                  "credits: redis: cannot parse \"%*s\"",
                  (size_t) reply->len, reply->str);
    return NULL;
}


/*
 * Waits a jittered pause and sends again, while the request's timeout
 * allows; then the handler gets NULL: Redis is unavailable.  Never calls
 * the handler from here unless a reply is being handled ("why" is set).
 */

static void
ngx_http_credits_router_pause(ngx_http_credits_redis_cmd_t *cmd,
    const char *why)
{
    ngx_msec_t                  pause, spent;
    ngx_http_credits_router_t  *rt = ngx_http_credits_router;

    pause = ngx_min(NGX_HTTP_CREDITS_PAUSE_MIN << ngx_min(cmd->tries, 5),
                    NGX_HTTP_CREDITS_PAUSE_MAX);
    pause = pause / 2 + (ngx_msec_t) ngx_random() % (pause / 2 + 1);

    spent = ngx_current_msec - cmd->start;

    if (why && spent + pause >= rt->conf->timeout) {
        ngx_log_error(NGX_LOG_ERR, rt->log, 0,
                      "credits: redis: %s for %Mms", why, spent);
        ngx_http_credits_router_done(cmd, NULL);
        return;
    }

    cmd->tries++;

    cmd->retry.handler = ngx_http_credits_router_retry_handler;
    cmd->retry.data = cmd;
    cmd->retry.log = rt->log;

    ngx_add_timer(&cmd->retry, pause);
}


static void
ngx_http_credits_router_retry_handler(ngx_event_t *ev)
{
    ngx_http_credits_redis_cmd_t  *cmd = ev->data;

    if (ngx_http_credits_router->exiting) {
        ngx_http_credits_router_done(cmd, NULL);
        return;
    }

    if (ngx_http_credits_router_send(cmd) != NGX_OK) {
        ngx_http_credits_router_refresh(NULL);
        ngx_http_credits_router_pause(cmd, "no node serves the key");
    }
}


static void
ngx_http_credits_router_done(ngx_http_credits_redis_cmd_t *cmd,
    redisReply *reply)
{
    if (cmd->retry.timer_set) {
        ngx_del_timer(&cmd->retry);
    }

    cmd->handler(cmd, reply);

    ngx_free(cmd);
}


