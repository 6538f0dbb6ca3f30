
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Counters in a shared memory zone, summed over all workers and kept over
 * reloads (a zone of the same name, size and tag is reused), and the
 * credits_status handler that prints them in Prometheus text format.
 */


#include "ngx_http_credits_module.h"


#define NGX_HTTP_CREDITS_ZONE_SIZE    (64 * 1024)
#define NGX_HTTP_CREDITS_WORKERS      64
#define NGX_HTTP_CREDITS_BUCKETS      11


typedef struct {
    ngx_atomic_t    pid;
    ngx_atomic_t    redis_up;
    ngx_atomic_t    reconnects;
} ngx_http_credits_worker_stat_t;


typedef struct {
    ngx_atomic_t                    outcomes[NGX_HTTP_CREDITS_OUTCOMES];
    ngx_atomic_t                    held;
    ngx_atomic_t                    charged;
    ngx_atomic_t                    refunded;
    ngx_atomic_t                    latency[NGX_HTTP_CREDITS_BUCKETS];
    ngx_atomic_t                    latency_sum;     /* ms */
    ngx_atomic_t                    latency_count;
    ngx_http_credits_worker_stat_t  workers[NGX_HTTP_CREDITS_WORKERS];
} ngx_http_credits_stats_t;


static ngx_int_t ngx_http_credits_status_init(ngx_shm_zone_t *shm_zone,
    void *data);
static ngx_int_t ngx_http_credits_status_handler(ngx_http_request_t *r);
static u_char *ngx_http_credits_status_print(u_char *p,
    ngx_http_credits_stats_t *st);


/* bucket bounds in ms; the last one is +Inf */
static ngx_msec_t  ngx_http_credits_bounds[NGX_HTTP_CREDITS_BUCKETS - 1] = {
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000
};


static ngx_http_credits_stats_t  *ngx_http_credits_stats;


ngx_str_t  ngx_http_credits_outcome_names[] = {
    ngx_null_string,
    ngx_string("committed"),
    ngx_string("released"),
    ngx_string("expired"),
    ngx_string("unauthorized"),
    ngx_string("insufficient"),
    ngx_string("redis_unavailable"),
    ngx_string("fail_open"),
    ngx_string("visitor_limited"),
    ngx_string("budget_exhausted"),
    ngx_string("free")
};


ngx_int_t
ngx_http_credits_status_init_zone(ngx_conf_t *cf,
    ngx_http_credits_main_conf_t *cmcf)
{
    ngx_str_t  name = ngx_string("ngx_http_credits_status");

    cmcf->shm_zone = ngx_shared_memory_add(cf, &name,
                                           NGX_HTTP_CREDITS_ZONE_SIZE,
                                           &ngx_http_credits_module);
    if (cmcf->shm_zone == NULL) {
        return NGX_ERROR;
    }

    cmcf->shm_zone->init = ngx_http_credits_status_init;

    return NGX_OK;
}


static ngx_int_t
ngx_http_credits_status_init(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_slab_pool_t  *shpool;

    if (data) {
        /* a reload: the counters go on */
        shm_zone->data = data;
        ngx_http_credits_stats = data;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        shm_zone->data = shpool->data;
        ngx_http_credits_stats = shpool->data;
        return NGX_OK;
    }

    ngx_http_credits_stats = ngx_slab_calloc(shpool,
                                             sizeof(ngx_http_credits_stats_t));
    if (ngx_http_credits_stats == NULL) {
        return NGX_ERROR;
    }

    shpool->data = ngx_http_credits_stats;
    shm_zone->data = ngx_http_credits_stats;

    return NGX_OK;
}


void
ngx_http_credits_count_outcome(ngx_http_credits_outcome_e outcome)
{
    if (ngx_http_credits_stats) {
        (void) ngx_atomic_fetch_add(&ngx_http_credits_stats->outcomes[outcome],
                                    1);
    }
}


void
ngx_http_credits_count_credits(ngx_int_t held, ngx_int_t charged,
    ngx_int_t refunded)
{
    ngx_http_credits_stats_t  *st = ngx_http_credits_stats;

    if (st) {
        (void) ngx_atomic_fetch_add(&st->held, held);
        (void) ngx_atomic_fetch_add(&st->charged, charged);
        (void) ngx_atomic_fetch_add(&st->refunded, refunded);
    }
}


void
ngx_http_credits_count_latency(ngx_msec_t ms)
{
    ngx_uint_t                 i;
    ngx_http_credits_stats_t  *st = ngx_http_credits_stats;

    if (st == NULL) {
        return;
    }

    for (i = 0; i < NGX_HTTP_CREDITS_BUCKETS - 1; i++) {
        if (ms <= ngx_http_credits_bounds[i]) {
            break;
        }
    }

    (void) ngx_atomic_fetch_add(&st->latency[i], 1);
    (void) ngx_atomic_fetch_add(&st->latency_sum, ms);
    (void) ngx_atomic_fetch_add(&st->latency_count, 1);
}


void
ngx_http_credits_count_redis(ngx_uint_t up, ngx_uint_t reconnects)
{
    ngx_http_credits_worker_stat_t  *w;

    if (ngx_http_credits_stats == NULL
        || ngx_worker >= NGX_HTTP_CREDITS_WORKERS)
    {
        return;
    }

    w = &ngx_http_credits_stats->workers[ngx_worker];

    w->pid = ngx_pid;
    w->redis_up = up;
    w->reconnects = reconnects;
}


char *
ngx_http_credits_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_credits_status_handler;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_credits_status_handler(ngx_http_request_t *r)
{
    size_t        size;
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    if (ngx_http_credits_stats == NULL) {
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    size = 4096 + NGX_HTTP_CREDITS_WORKERS * 160;

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last = ngx_http_credits_status_print(b->pos, ngx_http_credits_stats);
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = b->last - b->pos;
    ngx_str_set(&r->headers_out.content_type, "text/plain; version=0.0.4");
    r->headers_out.content_type_len = r->headers_out.content_type.len;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


static u_char *
ngx_http_credits_status_print(u_char *p, ngx_http_credits_stats_t *st)
{
    ngx_uint_t                       i;
    ngx_atomic_uint_t                cumulative;
    ngx_http_credits_worker_stat_t  *w;

    p = ngx_sprintf(p, "# HELP credits_requests_total Metered requests "
                       "by outcome.\n"
                       "# TYPE credits_requests_total counter\n");

    for (i = NGX_HTTP_CREDITS_COMMITTED; i < NGX_HTTP_CREDITS_FREE; i++) {
        p = ngx_sprintf(p, "credits_requests_total{outcome=\"%V\"} %uA\n",
                        &ngx_http_credits_outcome_names[i], st->outcomes[i]);
    }

    p = ngx_sprintf(p, "# HELP credits_credits_total Credits held, charged "
                       "and refunded.\n"
                       "# TYPE credits_credits_total counter\n"
                       "credits_credits_total{kind=\"held\"} %uA\n"
                       "credits_credits_total{kind=\"charged\"} %uA\n"
                       "credits_credits_total{kind=\"refunded\"} %uA\n",
                    st->held, st->charged, st->refunded);

    p = ngx_sprintf(p, "# HELP credits_redis_up Whether the worker's Redis "
                       "connection is up.\n"
                       "# TYPE credits_redis_up gauge\n");

    for (i = 0; i < NGX_HTTP_CREDITS_WORKERS; i++) {
        w = &st->workers[i];

        if (w->pid) {
            p = ngx_sprintf(p, "credits_redis_up{worker=\"%ui\",pid=\"%uA\"}"
                            " %uA\n", i, w->pid, w->redis_up);
        }
    }

    p = ngx_sprintf(p, "# HELP credits_redis_reconnects_total Redis "
                       "reconnects of the worker.\n"
                       "# TYPE credits_redis_reconnects_total counter\n");

    for (i = 0; i < NGX_HTTP_CREDITS_WORKERS; i++) {
        w = &st->workers[i];

        if (w->pid) {
            p = ngx_sprintf(p, "credits_redis_reconnects_total{worker=\"%ui\","
                            "pid=\"%uA\"} %uA\n", i, w->pid, w->reconnects);
        }
    }

    p = ngx_sprintf(p, "# HELP credits_hold_latency_seconds Time from "
                       "sending a hold to its reply.\n"
                       "# TYPE credits_hold_latency_seconds histogram\n");

    cumulative = 0;

    for (i = 0; i < NGX_HTTP_CREDITS_BUCKETS; i++) {
        cumulative += st->latency[i];

        if (i < NGX_HTTP_CREDITS_BUCKETS - 1) {
            p = ngx_sprintf(p, "credits_hold_latency_seconds_bucket"
                            "{le=\"%.3f\"} %uA\n",
                            (double) ngx_http_credits_bounds[i] / 1000,
                            cumulative);

        } else {
            p = ngx_sprintf(p, "credits_hold_latency_seconds_bucket"
                            "{le=\"+Inf\"} %uA\n", cumulative);
        }
    }

    return ngx_sprintf(p, "credits_hold_latency_seconds_sum %.3f\n"
                          "credits_hold_latency_seconds_count %uA\n",
                       (double) st->latency_sum / 1000, st->latency_count);
}
