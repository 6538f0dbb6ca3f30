
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * What a new node connection does before it serves.  With "ssl", the TLS
 * handshake through nginx's OpenSSL, verified as proxy_ssl_verify does it
 * (the chain, then the name).  Then the Redis setup, queued ahead of every
 * other command: AUTH, INFO cluster (the router's probe) or ROLE (the
 * master a sentinel named must be one), SELECT, SCRIPT LOAD; a sentinel
 * gets AUTH only, and SUBSCRIBE when it is listened to.
 */


#include "ngx_http_credits_redis.h"


#if (NGX_SSL)
static void ngx_http_credits_node_tls(ngx_http_credits_node_t *node);
static void ngx_http_credits_node_tls_done(ngx_connection_t *c);
#endif
static void ngx_http_credits_node_setup_reply(ngx_http_credits_node_t *node,
    redisReply *reply, void *data);
static void ngx_http_credits_node_info_reply(ngx_http_credits_node_t *node,
    redisReply *reply, void *data);
static void ngx_http_credits_node_role_reply(ngx_http_credits_node_t *node,
    redisReply *reply, void *data);


void
ngx_http_credits_node_connected(ngx_http_credits_node_t *node)
{
#if (NGX_SSL)
    if (node->conf->ssl) {
        ngx_http_credits_node_tls(node);
        return;
    }
#endif

    ngx_http_credits_node_up(node);
}


#if (NGX_SSL)

static void
ngx_http_credits_node_tls(ngx_http_credits_node_t *node)
{
    ngx_int_t                       rc;
    ngx_connection_t               *c = node->conn;
    ngx_http_credits_redis_conf_t  *conf = node->conf;

    if (ngx_ssl_create_connection(conf->ssl, c, NGX_SSL_CLIENT) != NGX_OK) {
        ngx_http_credits_node_close(node);
        return;
    }

    if (conf->ssl_sni
        && SSL_set_tlsext_host_name(c->ssl->connection,
                                    (char *) conf->ssl_name.data)
           == 0)
    {
        ngx_ssl_error(NGX_LOG_ERR, node->log, 0,
                      "credits: redis %V: SSL_set_tlsext_host_name(\"%V\") "
                      "failed", &node->addr.name, &conf->ssl_name);
        ngx_http_credits_node_close(node);
        return;
    }

    /* the connect timer goes on running: it bounds the handshake too */

    rc = ngx_ssl_handshake(c);

    if (rc == NGX_AGAIN) {
        c->ssl->handler = ngx_http_credits_node_tls_done;
        return;
    }

    ngx_http_credits_node_tls_done(c);
}


static void
ngx_http_credits_node_tls_done(ngx_connection_t *c)
{
    long                            rc;
    ngx_http_credits_node_t        *node = c->data;
    ngx_http_credits_redis_conf_t  *conf = node->conf;

    if (!c->ssl->handshaked) {
        /* OpenSSL's reason is in the line ngx_ssl_handshake() logged */
        ngx_log_error(NGX_LOG_ERR, node->log, 0,
                      "credits: redis %V: TLS handshake failed",
                      &node->addr.name);
        ngx_http_credits_node_close(node);
        return;
    }

    if (conf->ssl_verify) {
        rc = SSL_get_verify_result(c->ssl->connection);

        if (rc != X509_V_OK) {
            ngx_log_error(NGX_LOG_ERR, node->log, 0,
                          "credits: redis %V: TLS certificate verify error: "
                          "(%l:%s)", &node->addr.name, rc,
                          X509_verify_cert_error_string(rc));
            ngx_http_credits_node_close(node);
            return;
        }

        if (ngx_ssl_check_host(c, &conf->ssl_name) != NGX_OK) {
            ngx_log_error(NGX_LOG_ERR, node->log, 0,
                          "credits: redis %V: TLS certificate does not match "
                          "\"%V\"", &node->addr.name, &conf->ssl_name);
            ngx_http_credits_node_close(node);
            return;
        }
    }

    ngx_http_credits_node_up(node);
}

#endif


ngx_int_t
ngx_http_credits_node_setup(ngx_http_credits_node_t *node)
{
    int                             n;
    u_char                          db[NGX_INT_T_LEN];
    ngx_str_t                      *user, *password;
    const char                     *argv[3];
    size_t                          argvlen[3];
    ngx_http_credits_script_t     **s;
    ngx_http_credits_redis_conf_t  *conf = node->conf;

    if (node->role == NGX_HTTP_CREDITS_NODE_SENTINEL) {
        user = &conf->sentinel_user;
        password = &conf->sentinel_password;

    } else {
        user = &conf->user;
        password = &conf->password;
    }

    if (password->len) {
        n = 0;
        argv[n] = "AUTH";
        argvlen[n++] = 4;

        if (user->len) {
            argv[n] = (const char *) user->data;
            argvlen[n++] = user->len;
        }

        argv[n] = (const char *) password->data;
        argvlen[n++] = password->len;

        if (ngx_http_credits_node_internal(node, n, argv, argvlen,
                                           ngx_http_credits_node_setup_reply,
                                           "AUTH")
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    if (node->role == NGX_HTTP_CREDITS_NODE_SENTINEL) {
        if (node->push == NULL) {
            return NGX_OK;
        }

        /* the sentinel's news: a subscriber says nothing else */
        argv[0] = "SUBSCRIBE";
        argvlen[0] = 9;
        argv[1] = "+switch-master";
        argvlen[1] = 14;

        return ngx_http_credits_node_internal(node, 2, argv, argvlen, NULL,
                                              NULL);
    }

    argv[0] = "INFO";
    argvlen[0] = 4;
    argv[1] = "cluster";
    argvlen[1] = 7;

    if (node->role == NGX_HTTP_CREDITS_NODE_MASTER) {
        argv[0] = "ROLE";

        if (ngx_http_credits_node_internal(node, 1, argv, argvlen,
                                           ngx_http_credits_node_role_reply,
                                           NULL)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

    /* before SELECT: a cluster refuses it, and the router says why */
    } else if (node->probe
               && ngx_http_credits_node_internal(node, 2, argv, argvlen,
                                       ngx_http_credits_node_info_reply, NULL)
                  != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (conf->db) {
        argv[0] = "SELECT";
        argvlen[0] = 6;
        argv[1] = (const char *) db;
        argvlen[1] = ngx_sprintf(db, "%i", conf->db) - db;

        if (ngx_http_credits_node_internal(node, 2, argv, argvlen,
                                           ngx_http_credits_node_setup_reply,
                                           "SELECT")
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    for (s = ngx_http_credits_scripts; *s; s++) {
        if (ngx_http_credits_node_load(node, *s) != NGX_OK) {
            return NGX_ERROR;
        }
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

    return ngx_http_credits_node_internal(node, 3, argv, argvlen,
                                          ngx_http_credits_node_setup_reply,
                                          "SCRIPT LOAD");
}


/* a failed AUTH or SELECT would send every later command to the wrong
 * place or nowhere: drop the connection and try again with backoff */

static void
ngx_http_credits_node_setup_reply(ngx_http_credits_node_t *node,
    redisReply *reply, void *data)
{
    ngx_str_t  err;

    if (reply == NULL || reply->type != REDIS_REPLY_ERROR) {
        return;
    }

    ngx_http_credits_reply_error(reply, &err);

    /*
     * A Redis loading its data refuses the scripts too: the commands
     * behind them are refused alike and retried by the router, and a
     * script missing later is loaded on NOSCRIPT.  Closing would lose
     * their replies, and with them whether they ran.
     */
    if (ngx_strcmp(data, "SCRIPT LOAD") == 0
        && err.len >= 7 && ngx_strncmp(err.data, "LOADING", 7) == 0)
    {
        ngx_log_error(NGX_LOG_WARN, node->log, 0,
                      "credits: redis %V: %s: %V",
                      &node->addr.name, (char *) data, &err);
        return;
    }

    ngx_log_error(NGX_LOG_ERR, node->log, 0,
                  "credits: redis %V: %s failed: %V",
                  &node->addr.name, (char *) data, &err);

    ngx_http_credits_node_close(node);
}


static void
ngx_http_credits_node_info_reply(ngx_http_credits_node_t *node,
    redisReply *reply, void *data)
{
    if (reply) {
        ngx_http_credits_router_probed(node, reply);
    }
}


/* "master" first in ROLE's reply; a replica must not take a hold */

static void
ngx_http_credits_node_role_reply(ngx_http_credits_node_t *node,
    redisReply *reply, void *data)
{
    if (reply == NULL) {
        return;
    }

    if (reply->type == REDIS_REPLY_ARRAY && reply->elements > 0
        && reply->element[0]->type == REDIS_REPLY_STRING
        && reply->element[0]->len == 6
        && ngx_strncmp(reply->element[0]->str, "master", 6) == 0)
    {
        return;
    }

    ngx_http_credits_node_drop(node, "not a master (ROLE)");
}
