
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Replies of a node's redisReader built in a pool of the reader's own.
 * hiredis's default functions calloc() every element and free() each
 * again: a batch's reply is an array of up to 128 of them, and the
 * allocator cost more than parsing the reply.  Here an element is a bump
 * of the pool, and freeing the reply resets the pool.
 *
 * The pool is reset once no reply in it is left: a connection frees each
 * reply after its handler, before it reads the next.  A reply must be
 * freed with ngx_http_credits_reply_free(), never freeReplyObject(); it
 * outlives its reader (a handler may close the connection), the pool
 * then going with the last reply.  A reply partly read when the reader is
 * freed or fails is freed by the reader, through the same function.
 */


#include "ngx_http_credits_module.h"


/* a batch of 64 holds, 128 integers, fits the first block */
#define NGX_HTTP_CREDITS_REPLY_POOL    16384

/* blocks a reset pool may keep: a larger reply's pool is made anew */
#define NGX_HTTP_CREDITS_REPLY_BLOCKS  4


typedef struct {
    ngx_pool_t                     *pool;
    ngx_log_t                      *log;
    ngx_uint_t                      replies;   /* in the pool, not freed */
    ngx_uint_t                      orphan;    /* unsigned:1, reader freed */
} ngx_http_credits_reply_arena_t;


/* before a reply's root: where its elements live */
typedef struct {
    ngx_http_credits_reply_arena_t *arena;
} ngx_http_credits_reply_root_t;


static void *ngx_http_credits_reply_string(const redisReadTask *task,
    char *str, size_t len);
static void *ngx_http_credits_reply_array(const redisReadTask *task,
    int elements);
static void *ngx_http_credits_reply_integer(const redisReadTask *task,
    long long value);
static void *ngx_http_credits_reply_nil(const redisReadTask *task);
static redisReply *ngx_http_credits_reply_alloc(const redisReadTask *task,
    int type, size_t extra);


static redisReplyObjectFunctions  ngx_http_credits_reply_functions = {
    ngx_http_credits_reply_string,
    ngx_http_credits_reply_array,
    ngx_http_credits_reply_integer,
    ngx_http_credits_reply_nil,
    ngx_http_credits_reply_free
};


redisReader *
ngx_http_credits_reply_reader(ngx_log_t *log)
{
    redisReader                     *reader;
    ngx_http_credits_reply_arena_t  *arena;

    arena = ngx_alloc(sizeof(ngx_http_credits_reply_arena_t), log);
    if (arena == NULL) {
        return NULL;
    }

    arena->log = log;
    arena->replies = 0;
    arena->orphan = 0;
    arena->pool = ngx_create_pool(NGX_HTTP_CREDITS_REPLY_POOL, log);

    reader = redisReaderCreateWithFunctions(&ngx_http_credits_reply_functions);

    if (arena->pool == NULL || reader == NULL) {
        if (reader) {
            redisReaderFree(reader);
        }

        if (arena->pool) {
            ngx_destroy_pool(arena->pool);
        }

        ngx_free(arena);
        return NULL;
    }

    reader->privdata = arena;

    return reader;
}


void
ngx_http_credits_reply_reader_free(redisReader *reader)
{
    ngx_http_credits_reply_arena_t  *arena;

    arena = reader->privdata;

    /* a reply still being read is freed here */
    redisReaderFree(reader);

    if (arena->replies) {
        /* the last reply handed out takes the pool with it */
        arena->orphan = 1;
        return;
    }

    if (arena->pool) {
        ngx_destroy_pool(arena->pool);
    }

    ngx_free(arena);
}


/* the reply and its elements: the pool is reset once it holds no reply */

void
ngx_http_credits_reply_free(void *reply)
{
    ngx_uint_t                       n;
    ngx_pool_t                      *p;
    ngx_http_credits_reply_root_t   *root;
    ngx_http_credits_reply_arena_t  *arena;

    root = (ngx_http_credits_reply_root_t *) reply - 1;
    arena = root->arena;

    if (--arena->replies) {
        return;
    }

    if (arena->orphan) {
        ngx_destroy_pool(arena->pool);
        ngx_free(arena);
        return;
    }

    n = 0;

    for (p = arena->pool; p; p = p->d.next) {
        n++;
    }

    if (n <= NGX_HTTP_CREDITS_REPLY_BLOCKS) {
        ngx_reset_pool(arena->pool);
        return;
    }

    /* without a pool the next reply fails as out of memory */
    ngx_destroy_pool(arena->pool);
    arena->pool = ngx_create_pool(NGX_HTTP_CREDITS_REPLY_POOL, arena->log);
}


static void *
ngx_http_credits_reply_string(const redisReadTask *task, char *str,
    size_t len)
{
    redisReply  *r;

    r = ngx_http_credits_reply_alloc(task, task->type, len + 1);
    if (r == NULL) {
        return NULL;
    }

    r->str = (char *) (r + 1);
    r->len = len;
    ngx_memcpy(r->str, str, len);
    r->str[len] = '\0';

    return r;
}


static void *
ngx_http_credits_reply_array(const redisReadTask *task, int elements)
{
    size_t       size;
    redisReply  *r;

    size = (elements > 0) ? elements * sizeof(redisReply *) : 0;

    r = ngx_http_credits_reply_alloc(task, REDIS_REPLY_ARRAY, size);
    if (r == NULL) {
        return NULL;
    }

    if (elements > 0) {
        /* the elements fill it as they are read */
        r->element = (redisReply **) (r + 1);
        r->elements = elements;
        ngx_memzero(r->element, size);
    }

    return r;
}


static void *
ngx_http_credits_reply_integer(const redisReadTask *task, long long value)
{
    redisReply  *r;

    r = ngx_http_credits_reply_alloc(task, REDIS_REPLY_INTEGER, 0);
    if (r == NULL) {
        return NULL;
    }

    r->integer = value;

    return r;
}


static void *
ngx_http_credits_reply_nil(const redisReadTask *task)
{
    return ngx_http_credits_reply_alloc(task, REDIS_REPLY_NIL, 0);
}


/*
 * A zeroed redisReply and "extra" bytes after it, linked into its parent
 * as hiredis's own functions do.  The reply's root is preceded by its
 * arena, for ngx_http_credits_reply_free(); only the root task carries
 * the reader's privdata in every hiredis version.
 */

static redisReply *
ngx_http_credits_reply_alloc(const redisReadTask *task, int type,
    size_t extra)
{
    size_t                           size;
    redisReply                      *r, *parent;
    const redisReadTask             *t;
    ngx_http_credits_reply_root_t   *root;
    ngx_http_credits_reply_arena_t  *arena;

    for (t = task; t->parent; t = t->parent) { /* void */ }

    arena = t->privdata;

    if (arena->pool == NULL) {
        return NULL;
    }

    size = sizeof(redisReply) + extra;

    if (task->parent == NULL) {
        root = ngx_palloc(arena->pool,
                          sizeof(ngx_http_credits_reply_root_t) + size);
        if (root == NULL) {
            return NULL;
        }

        root->arena = arena;
        arena->replies++;
        r = (redisReply *) (root + 1);

    } else {
        r = ngx_palloc(arena->pool, size);
        if (r == NULL) {
            return NULL;
        }

        parent = task->parent->obj;
        parent->element[task->idx] = r;
    }

    ngx_memzero(r, sizeof(redisReply));
    r->type = type;

    return r;
}
