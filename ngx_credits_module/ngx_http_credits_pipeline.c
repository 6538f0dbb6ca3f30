
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * A node connection's commands.  They are appended to one output buffer
 * and their replies awaited in order, in a ring of waits; every command
 * issued in an event loop iteration leaves in one write (appending posts
 * one flush event).  hiredis is used for the protocol only: a redisReader
 * parses the replies read from nginx's c->recv.
 */


#include "ngx_http_credits_redis.h"


#define NGX_HTTP_CREDITS_READ_SIZE         16384


static ngx_int_t ngx_http_credits_node_queue(ngx_http_credits_node_t *node,
    u_char *data, size_t len, ngx_http_credits_node_reply_pt handler,
    void *arg, ngx_http_credits_redis_cmd_t *cmd);
static ngx_int_t ngx_http_credits_node_replies(ngx_http_credits_node_t *node);


static u_char  ngx_http_credits_read_buf[NGX_HTTP_CREDITS_READ_SIZE];


/*
 * Issues a command of the adapter's own (setup, ASKING, CLUSTER SLOTS,
 * SENTINEL) on the node; "handler" may be NULL when the reply does not
 * matter.
 */

ngx_int_t
ngx_http_credits_node_internal(ngx_http_credits_node_t *node, int argc,
    const char **argv, const size_t *argvlen,
    ngx_http_credits_node_reply_pt handler, void *data)
{
    int        len;
    char      *formatted;
    ngx_int_t  rc;

    if (node->state == NGX_HTTP_CREDITS_REDIS_DOWN) {
        return NGX_DECLINED;
    }

    len = redisFormatCommandArgv(&formatted, argc, argv, argvlen);
    if (len < 0) {
        return NGX_ERROR;
    }

    rc = ngx_http_credits_node_queue(node, (u_char *) formatted, len,
                                     handler, data, NULL);

    free(formatted);

    return rc;
}


/* sends a command formatted by the router; its reply goes to the router */

ngx_int_t
ngx_http_credits_node_send(ngx_http_credits_node_t *node,
    ngx_http_credits_redis_cmd_t *cmd)
{
    if (node->state == NGX_HTTP_CREDITS_REDIS_DOWN) {
        return NGX_DECLINED;
    }

    return ngx_http_credits_node_queue(node, cmd->formatted,
                                       cmd->formatted_len, NULL, NULL, cmd);
}


/* the bytes go to the output buffer, the reply is awaited in order */

static ngx_int_t
ngx_http_credits_node_queue(ngx_http_credits_node_t *node, u_char *data,
    size_t len, ngx_http_credits_node_reply_pt handler, void *arg,
    ngx_http_credits_redis_cmd_t *cmd)
{
    u_char                   *out;
    size_t                    size;
    ngx_uint_t                n, i;
    ngx_http_credits_wait_t  *w, *waits;

    if (node->out_last + len > node->out_size) {
        size = ngx_max(node->out_size * 2, node->out_last + len);
        size = ngx_max(size, 4096);

        out = ngx_alloc(size, node->log);
        if (out == NULL) {
            return NGX_ERROR;
        }

        if (node->out) {
            ngx_memcpy(out, node->out, node->out_last);
            ngx_free(node->out);
        }

        node->out = out;
        node->out_size = size;
    }

    if (node->nwaits == node->waits_size) {
        n = ngx_max(node->waits_size * 2, 64);

        waits = ngx_alloc(n * sizeof(ngx_http_credits_wait_t), node->log);
        if (waits == NULL) {
            return NGX_ERROR;
        }

        for (i = 0; i < node->nwaits; i++) {
            waits[i] = node->waits[(node->head + i) % node->waits_size];
        }

        ngx_free(node->waits);
        node->waits = waits;
        node->waits_size = n;
        node->head = 0;
    }

    w = &node->waits[(node->head + node->nwaits++) % node->waits_size];
    w->handler = handler;
    w->data = arg;
    w->cmd = cmd;
    w->start = node->queued;

    node->out_last = ngx_cpymem(node->out + node->out_last, data, len)
                     - node->out;
    node->queued += len;

    /*
     * Not cancelable: a worker shutting down waits while commands wait
     * for their replies, also for a connection still being made.
     */
    if (node->nwaits == 1) {
        ngx_add_timer(&node->stall_timer,
                      node->conf->timeout * NGX_HTTP_CREDITS_STALL_FACTOR);
    }

    if (node->state == NGX_HTTP_CREDITS_REDIS_UP && !node->flush.posted) {
        ngx_post_event(&node->flush, &ngx_posted_events);
    }

    return NGX_OK;
}


void
ngx_http_credits_node_flush_handler(ngx_event_t *ev)
{
    ssize_t                   n;
    ngx_connection_t         *c;
    ngx_http_credits_node_t  *node = ev->data;

    if (node->state != NGX_HTTP_CREDITS_REDIS_UP || node->draining) {
        return;
    }

    c = node->conn;

    while (node->out_pos < node->out_last) {
        n = c->send(c, node->out + node->out_pos,
                    node->out_last - node->out_pos);

        if (n == NGX_AGAIN) {
            if (ngx_handle_write_event(c->write, 0) != NGX_OK) {
                ngx_http_credits_node_close(node);
            }

            return;
        }

        if (n <= 0) {
            ngx_log_error(NGX_LOG_ERR, node->log, 0,
                          "credits: redis %V: connection lost: write failed",
                          &node->addr.name);
            ngx_http_credits_node_close(node);
            return;
        }

        node->out_pos += n;
        node->written += n;
    }

    node->out_pos = 0;
    node->out_last = 0;
}


void
ngx_http_credits_node_write_handler(ngx_event_t *ev)
{
    ngx_connection_t         *c = ev->data;
    ngx_http_credits_node_t  *node = c->data;

    ngx_http_credits_node_flush_handler(&node->flush);
}


void
ngx_http_credits_node_read_handler(ngx_event_t *ev)
{
    ssize_t                   n;
    ngx_connection_t         *c = ev->data;
    ngx_http_credits_node_t  *node = c->data;

    /* c->recv() clears "ready" when it read less than asked: drained */

    while (c->read->ready) {
        n = c->recv(c, ngx_http_credits_read_buf, NGX_HTTP_CREDITS_READ_SIZE);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n <= 0) {
            ngx_log_error(NGX_LOG_ERR, node->log, 0,
                          "credits: redis %V: connection lost: %s",
                          &node->addr.name,
                          n == 0 ? "closed by Redis" : "read failed");
            ngx_http_credits_node_close(node);
            return;
        }

        if (redisReaderFeed(node->reader, (char *) ngx_http_credits_read_buf,
                            n)
            != REDIS_OK
            || ngx_http_credits_node_replies(node) != NGX_OK)
        {
            return;
        }
    }

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        ngx_http_credits_node_close(node);
    }
}


/*
 * Each reply goes to the oldest wait; one nobody waits for is a message
 * of a subscription.  A handler may close the connection: then the
 * reader is gone and NGX_DONE stops the reading.
 */

static ngx_int_t
ngx_http_credits_node_replies(ngx_http_credits_node_t *node)
{
    void                     *r;
    ngx_uint_t                generation;
    ngx_http_credits_wait_t   w;

    generation = node->generation;

    for ( ;; ) {
        if (redisReaderGetReply(node->reader, &r) != REDIS_OK) {
            ngx_log_error(NGX_LOG_ERR, node->log, 0,
                          "credits: redis %V: protocol error: %s",
                          &node->addr.name, node->reader->errstr);
            ngx_http_credits_node_close(node);
            return NGX_DONE;
        }

        if (r == NULL) {
            return NGX_OK;
        }

        node->backoff = NGX_HTTP_CREDITS_BACKOFF_MIN;

        if (node->nwaits == 0) {
            if (node->push) {
                node->push(node, r, node->push_data);

            } else {
                ngx_log_error(NGX_LOG_ERR, node->log, 0,
                              "credits: redis %V: a reply nobody asked for",
                              &node->addr.name);
            }

        } else {
            w = node->waits[node->head];
            node->head = (node->head + 1) % node->waits_size;

            /* every reply is progress: the stall timer restarts or stops */

            if (--node->nwaits == 0) {
                if (node->stall_timer.timer_set) {
                    ngx_del_timer(&node->stall_timer);
                }

            } else {
                ngx_add_timer(&node->stall_timer, node->conf->timeout
                                          * NGX_HTTP_CREDITS_STALL_FACTOR);
            }

            if (w.cmd) {
                ngx_http_credits_router_reply(node, w.cmd, r, 1);

            } else if (w.handler) {
                w.handler(node, r, w.data);
            }
        }

        ngx_http_credits_reply_free(r);

        if (node->generation != generation) {
            return NGX_DONE;
        }

        if (node->draining && !ngx_http_credits_node_awaits_sent(node)) {
            ngx_http_credits_node_close(node);
            return NGX_DONE;
        }
    }
}


/*
 * Whether the oldest awaited command left whole: its reply will come.  A
 * dropped connection is closed once none does, so that the commands it
 * sent are answered (a refusal is retried, not taken for a loss).
 */

ngx_uint_t
ngx_http_credits_node_awaits_sent(ngx_http_credits_node_t *node)
{
    uint64_t  end;

    if (node->nwaits == 0) {
        return 0;
    }

    end = (node->nwaits > 1)
          ? node->waits[(node->head + 1) % node->waits_size].start
          : node->queued;

    return node->written >= end;
}


void
ngx_http_credits_node_stall_handler(ngx_event_t *ev)
{
    ngx_http_credits_node_t  *node = ev->data;

    ngx_log_error(NGX_LOG_ERR, node->log, 0,
                  "credits: redis %V: no reply within %Mms, %ui commands "
                  "pending: dropping the connection",
                  &node->addr.name,
                  node->conf->timeout * NGX_HTTP_CREDITS_STALL_FACTOR,
                  node->nwaits);

    ngx_http_credits_node_close(node);
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
