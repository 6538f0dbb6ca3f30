
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * A node connection's state, shared by the connection itself
 * (ngx_http_credits_redis.c), its handshake (ngx_http_credits_
 * handshake.c: TLS, then the Redis setup) and its commands (ngx_http_
 * credits_pipeline.c).
 */


#ifndef _NGX_HTTP_CREDITS_REDIS_H_INCLUDED_
#define _NGX_HTTP_CREDITS_REDIS_H_INCLUDED_


#include "ngx_http_credits_module.h"

#include <hiredis/read.h>


/*
 * A request waits "timeout" for its reply; the connection is given three
 * times that to make progress before it is dropped.  A Redis that is only
 * slow thus still answers, and a hold whose request gave up is released at
 * once instead of being locked until its ttl; a Redis that hangs is left.
 */
#define NGX_HTTP_CREDITS_STALL_FACTOR      3

/* a connection is good once Redis has answered on it (a TLS 1.3 server
 * refuses a client certificate only after the handshake) */
#define NGX_HTTP_CREDITS_BACKOFF_MIN       100


/* a reply awaited: for the router's command, or for a handler */
typedef struct {
    ngx_http_credits_node_reply_pt    handler;
    void                             *data;
    ngx_http_credits_redis_cmd_t     *cmd;
    uint64_t                          start;     /* bytes queued before it */
} ngx_http_credits_wait_t;


struct ngx_http_credits_node_s {
    ngx_connection_t                 *conn;
    ngx_peer_connection_t             peer;
    redisReader                      *reader;
    ngx_resolver_ctx_t               *resolving;
    ngx_http_credits_redis_conf_t    *conf;
    ngx_http_credits_redis_addr_t     addr;
    ngx_sockaddr_t                    sockaddr;
    socklen_t                         socklen;
    ngx_log_t                        *log;

    u_char                           *out;       /* commands to write */
    size_t                            out_size;
    size_t                            out_pos;
    size_t                            out_last;
    uint64_t                          queued;    /* bytes, this connection */
    uint64_t                          written;

    ngx_http_credits_wait_t          *waits;     /* a ring, oldest at head */
    ngx_uint_t                        waits_size;
    ngx_uint_t                        head;
    ngx_uint_t                        nwaits;

    ngx_http_credits_node_reply_pt    push;      /* replies nobody awaits */
    void                             *push_data;

    ngx_event_t                       timer;     /* connect, backoff */
    ngx_event_t                       stall_timer;  /* replies overdue */
    ngx_event_t                       flush;     /* write the commands */

    ngx_uint_t                        state;
    ngx_uint_t                        role;
    ngx_uint_t                        generation;   /* connections made */
    ngx_uint_t                        reconnects;
    ngx_msec_t                        backoff;
    ngx_msec_t                        next_try;  /* on demand, not before */
    unsigned                          named:1;   /* resolved at connect */
    unsigned                          persistent:1;
    unsigned                          probe:1;   /* ask INFO cluster */
    unsigned                          tried:1;   /* connected once */
    unsigned                          closing:1;
    unsigned                          freeing:1;
    unsigned                          draining:1;  /* dropped: no writes */
};


ngx_int_t ngx_http_credits_node_setup(ngx_http_credits_node_t *node);
void ngx_http_credits_node_connected(ngx_http_credits_node_t *node);
void ngx_http_credits_node_up(ngx_http_credits_node_t *node);
void ngx_http_credits_node_close(ngx_http_credits_node_t *node);
ngx_uint_t ngx_http_credits_node_awaits_sent(ngx_http_credits_node_t *node);
void ngx_http_credits_node_read_handler(ngx_event_t *ev);
void ngx_http_credits_node_write_handler(ngx_event_t *ev);
void ngx_http_credits_node_flush_handler(ngx_event_t *ev);
void ngx_http_credits_node_stall_handler(ngx_event_t *ev);


#endif /* _NGX_HTTP_CREDITS_REDIS_H_INCLUDED_ */
