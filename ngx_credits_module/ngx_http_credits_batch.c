
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Batches: the holds (or the settles) of one project issued during one
 * event loop iteration go to Redis as one script call.
 *
 * A script call costs Redis a fixed few microseconds before its first key
 * operation (the call itself, the lazy expiry of the project's holds), and
 * Redis answers a pipelined burst only once it has run all of it, so every
 * request in the burst waits for every script in it.  One call per
 * project and iteration pays the fixed part once and keeps the burst short.
 * A call only ever touches one project's keys, so a batch stays within one
 * Redis Cluster hash slot, and the script runs each item in order exactly
 * as separate calls would.
 *
 * An item owns copies of its arguments: it outlives its request when the
 * request gives up waiting (item->data is then NULL) and a settle is
 * issued from a pool that is being destroyed.  The batch is sent by a
 * posted event, still in the iteration that filled it.
 */


#include "ngx_http_credits_module.h"


#define NGX_HTTP_CREDITS_BATCH_MAX      64     /* items per script call */
#define NGX_HTTP_CREDITS_BATCH_BUCKETS  64     /* open batches, by project */
#define NGX_HTTP_CREDITS_BATCH_ARGS     12     /* per item, at most */
#define NGX_HTTP_CREDITS_BATCH_POOL     4096
#define NGX_HTTP_CREDITS_BATCH_SPARE    16     /* pools kept for reuse */


struct ngx_http_credits_batch_s {
    ngx_pool_t                        *pool;      /* the batch and its items */
    ngx_http_credits_batch_t          *next;      /* in its bucket */
    ngx_http_credits_batch_t          *queued;    /* to be sent */
    ngx_http_credits_script_t         *script;
    ngx_str_t                          keys[3];   /* balance, holds, ledger */
    ngx_uint_t                         nitems;
    ngx_http_credits_batch_item_t     *items;
    ngx_http_credits_batch_item_t    **last;
};


static ngx_http_credits_batch_t **ngx_http_credits_batch_bucket(
    ngx_str_t *keys);
static size_t ngx_http_credits_batch_strs_size(ngx_str_t *strs, ngx_uint_t n);
static void ngx_http_credits_batch_copy_strs(ngx_str_t *dst, ngx_str_t *src,
    ngx_uint_t n, u_char *p);
static ngx_http_credits_batch_t *ngx_http_credits_batch_open(
    ngx_http_credits_script_t *script, ngx_str_t *keys);
static ngx_pool_t *ngx_http_credits_batch_pool(void);
static void ngx_http_credits_batch_free(ngx_pool_t *pool);
static void ngx_http_credits_batch_send_handler(ngx_event_t *ev);
static void ngx_http_credits_batch_send(ngx_http_credits_batch_t *b);
static void ngx_http_credits_batch_reply(ngx_http_credits_redis_cmd_t *cmd,
    redisReply *reply);
static void ngx_http_credits_batch_finish(ngx_http_credits_batch_t *b,
    redisReply *reply);


static ngx_http_credits_batch_t  *ngx_http_credits_batch_buckets[
                                             NGX_HTTP_CREDITS_BATCH_BUCKETS];
/* in the order they were opened: a stream's growth goes before its settle */
static ngx_http_credits_batch_t  *ngx_http_credits_batch_queue;
static ngx_http_credits_batch_t **ngx_http_credits_batch_tail =
                                                &ngx_http_credits_batch_queue;
static ngx_event_t                ngx_http_credits_batch_event;

/* a batch's pool costs a malloc() and a free(): the last ones are kept */
static ngx_pool_t                *ngx_http_credits_batch_spare[
                                               NGX_HTTP_CREDITS_BATCH_SPARE];
static ngx_uint_t                 ngx_http_credits_batch_nspare;

/* what an item gets when the reply does not have its elements */
static redisReply  ngx_http_credits_batch_bad_reply = {
    REDIS_REPLY_ERROR, 0, sizeof("unexpected reply") - 1,
    "unexpected reply", 0, NULL
};


/*
 * Adds an item to the open batch of the script and project (keys[0] names
 * the project), opening one if needed.  Returns NULL, and never calls the
 * handler, when Redis is not connected or memory is short.
 */

ngx_http_credits_batch_item_t *
ngx_http_credits_batch_add(ngx_http_credits_script_t *script, ngx_str_t *keys,
    ngx_str_t *args, ngx_uint_t nargs,
    ngx_http_credits_batch_handler_pt handler, void *data)
{
    size_t                          size;
    ngx_http_credits_batch_t       *b, **bp;
    ngx_http_credits_batch_item_t  *item;

    if (ngx_http_credits_redis_state() == NGX_HTTP_CREDITS_REDIS_DOWN
        || nargs > NGX_HTTP_CREDITS_BATCH_ARGS)
    {
        return NULL;
    }

    size = sizeof(ngx_http_credits_batch_item_t) + nargs * sizeof(ngx_str_t)
           + ngx_http_credits_batch_strs_size(args, nargs);

    b = ngx_http_credits_batch_open(script, keys);
    if (b == NULL) {
        return NULL;
    }

    item = ngx_palloc(b->pool, size);
    if (item == NULL) {
        return NULL;
    }

    item->next = NULL;
    item->batch = b;
    item->handler = handler;
    item->data = data;
    item->start = ngx_current_msec;
    item->nargs = nargs;
    item->args = (ngx_str_t *) (item + 1);

    ngx_http_credits_batch_copy_strs(item->args, args, nargs,
                                     (u_char *) (item->args + nargs));

    *b->last = item;
    b->last = &item->next;

    if (++b->nitems == NGX_HTTP_CREDITS_BATCH_MAX) {
        /* full: it stays queued, the next item opens another */
        for (bp = ngx_http_credits_batch_bucket(keys); *bp != b;
             bp = &(*bp)->next)
        {
            /* void */
        }

        *bp = b->next;
    }

    return item;
}


static ngx_http_credits_batch_t **
ngx_http_credits_batch_bucket(ngx_str_t *keys)
{
    return &ngx_http_credits_batch_buckets[ngx_http_credits_hash(keys[0].data,
                                                                 keys[0].len)
                                           % NGX_HTTP_CREDITS_BATCH_BUCKETS];
}


static size_t
ngx_http_credits_batch_strs_size(ngx_str_t *strs, ngx_uint_t n)
{
    size_t      size;
    ngx_uint_t  i;

    size = 0;

    for (i = 0; i < n; i++) {
        size += strs[i].len;
    }

    return size;
}


/*
 * Copies the strings into the batch's pool (at p, sized by strs_size()):
 * a request's strings may be gone before its batch is sent.
 */

static void
ngx_http_credits_batch_copy_strs(ngx_str_t *dst, ngx_str_t *src,
    ngx_uint_t n, u_char *p)
{
    ngx_uint_t  i;

    for (i = 0; i < n; i++) {
        dst[i].data = p;
        dst[i].len = src[i].len;

        /* an empty argument (a hold's limits, say) may have no data */
        if (src[i].len) {
            p = ngx_cpymem(p, src[i].data, src[i].len);
        }
    }
}


static ngx_http_credits_batch_t *
ngx_http_credits_batch_open(ngx_http_credits_script_t *script,
    ngx_str_t *keys)
{
    size_t                      size;
    ngx_pool_t                 *pool;
    ngx_http_credits_batch_t   *b, **bucket;

    bucket = ngx_http_credits_batch_bucket(keys);

    for (b = *bucket; b; b = b->next) {
        if (b->script == script
            && b->keys[0].len == keys[0].len
            && ngx_memcmp(b->keys[0].data, keys[0].data, keys[0].len) == 0)
        {
            return b;
        }
    }

    size = sizeof(ngx_http_credits_batch_t)
           + ngx_http_credits_batch_strs_size(keys, 3);

    pool = ngx_http_credits_batch_pool();
    if (pool == NULL) {
        return NULL;
    }

    b = ngx_palloc(pool, size);
    if (b == NULL) {
        ngx_http_credits_batch_free(pool);
        return NULL;
    }

    b->pool = pool;
    b->script = script;
    b->nitems = 0;
    b->items = NULL;
    b->last = &b->items;

    ngx_http_credits_batch_copy_strs(b->keys, keys, 3, (u_char *) (b + 1));

    b->next = *bucket;
    *bucket = b;

    b->queued = NULL;
    *ngx_http_credits_batch_tail = b;
    ngx_http_credits_batch_tail = &b->queued;

    if (!ngx_http_credits_batch_event.posted) {
        ngx_http_credits_batch_event.handler =
                                        ngx_http_credits_batch_send_handler;
        ngx_http_credits_batch_event.log = ngx_cycle->log;
        ngx_post_event(&ngx_http_credits_batch_event, &ngx_posted_events);
    }

    return b;
}


/* one allocation for a batch and its first items, most often all */

static ngx_pool_t *
ngx_http_credits_batch_pool(void)
{
    if (ngx_http_credits_batch_nspare) {
        return ngx_http_credits_batch_spare[--ngx_http_credits_batch_nspare];
    }

    return ngx_create_pool(NGX_HTTP_CREDITS_BATCH_POOL, ngx_cycle->log);
}


static void
ngx_http_credits_batch_free(ngx_pool_t *pool)
{
    if (ngx_http_credits_batch_nspare == NGX_HTTP_CREDITS_BATCH_SPARE) {
        ngx_destroy_pool(pool);
        return;
    }

    ngx_reset_pool(pool);
    ngx_http_credits_batch_spare[ngx_http_credits_batch_nspare++] = pool;
}


/* sends every open batch; also before the worker exits */

void
ngx_http_credits_batch_flush(void)
{
    ngx_http_credits_batch_t  *b, *next;

    if (ngx_http_credits_batch_event.posted) {
        ngx_delete_posted_event(&ngx_http_credits_batch_event);
    }

    /* handlers may open new batches while these are sent: detach first */
    b = ngx_http_credits_batch_queue;
    ngx_http_credits_batch_queue = NULL;
    ngx_http_credits_batch_tail = &ngx_http_credits_batch_queue;
    ngx_memzero(ngx_http_credits_batch_buckets,
                sizeof(ngx_http_credits_batch_buckets));

    while (b) {
        next = b->queued;
        ngx_http_credits_batch_send(b);
        b = next;
    }
}


static void
ngx_http_credits_batch_send_handler(ngx_event_t *ev)
{
    ngx_http_credits_batch_flush();
}


static void
ngx_http_credits_batch_send(ngx_http_credits_batch_t *b)
{
    int                             argc;
    ngx_uint_t                      i;
    ngx_http_credits_batch_item_t  *item;

    static const char  *argv[4 + NGX_HTTP_CREDITS_BATCH_MAX
                              * NGX_HTTP_CREDITS_BATCH_ARGS];
    static size_t       argvlen[4 + NGX_HTTP_CREDITS_BATCH_MAX
                                 * NGX_HTTP_CREDITS_BATCH_ARGS];

    /* numkeys, balance, holds, ledger, then each item's arguments */

    argv[0] = "3";
    argvlen[0] = 1;

    for (i = 0; i < 3; i++) {
        argv[1 + i] = (const char *) b->keys[i].data;
        argvlen[1 + i] = b->keys[i].len;
    }

    argc = 4;

    for (item = b->items; item; item = item->next) {
        for (i = 0; i < item->nargs; i++) {
            argv[argc] = (const char *) item->args[i].data;
            argvlen[argc++] = item->args[i].len;
        }
    }

    /* keys[0] names the project: the router sends it to the project's node */
    if (ngx_http_credits_redis_command(&b->keys[0], b->script, argc, argv,
                                       argvlen, ngx_http_credits_batch_reply,
                                       b)
        != NGX_OK)
    {
        /* the connection went away since the items were added */
        ngx_http_credits_batch_finish(b, NULL);
    }
}


static void
ngx_http_credits_batch_reply(ngx_http_credits_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_http_credits_batch_finish(cmd->data, reply);
}


/* every item's handler runs once, with its part of the reply */

static void
ngx_http_credits_batch_finish(ngx_http_credits_batch_t *b, redisReply *reply)
{
    ngx_uint_t                      i;
    redisReply                      view;
    ngx_http_credits_batch_item_t  *item, *next;

    for (item = b->items, i = 0; item; item = next, i++) {
        next = item->next;
        item->handler(item, ngx_http_credits_batch_element(reply, b->nitems, i,
                                            b->script->reply_width, &view));
    }

    ngx_http_credits_batch_free(b->pool);
}


/*
 * The reply for item i of n, when a script answers "width" elements per
 * item in one flat array (Redis builds a flat array far faster than one
 * array per item): the item's element, or for a width above 1 its
 * elements seen as an array of their own, in *view, valid as long as the
 * reply.  An error reply (or NULL: no connection) is returned as it is:
 * it concerns every item.
 */

redisReply *
ngx_http_credits_batch_element(redisReply *reply, ngx_uint_t n, ngx_uint_t i,
    ngx_uint_t width, redisReply *view)
{
    if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
        return reply;
    }

    if (reply->type != REDIS_REPLY_ARRAY
        || i >= n
        || reply->elements != n * width)
    {
        return &ngx_http_credits_batch_bad_reply;
    }

    if (width == 1) {
        return reply->element[i];
    }

    ngx_memzero(view, sizeof(redisReply));
    view->type = REDIS_REPLY_ARRAY;
    view->elements = width;
    view->element = &reply->element[i * width];

    return view;
}


ngx_str_t *
ngx_http_credits_batch_keys(ngx_http_credits_batch_item_t *item)
{
    return item->batch->keys;
}
