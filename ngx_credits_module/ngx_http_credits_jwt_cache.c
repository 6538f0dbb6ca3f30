
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The verified-token cache: per worker and per location, so that a token
 * seen again is not verified again (an RSA or EC verify costs far more
 * than the rest of the request).  An entry keeps the whole token and is
 * found by a fast hash of it, then compared byte for byte: a token only
 * ever finds its own entry, whatever the hash does.  An entry is never
 * used at or after the token's "exp"; the least recently used entry makes
 * room when the cache is full.
 *
 * A cryptographic digest as the key would cost more than the rest of a
 * charged request's own work; the hash and the compare cost a few dozen
 * instructions, and a collision costs a compare, never a wrong project.
 */


#include "ngx_http_credits_module.h"


#define NGX_HTTP_CREDITS_NO_EXP_TTL     60

/* the bytes of the token's end that are hashed: see the hash below */
#define NGX_HTTP_CREDITS_HASHED_TAIL    32

/* the first buckets; they double as entries come */
#define NGX_HTTP_CREDITS_JWT_BUCKETS    64


typedef struct ngx_http_credits_jwt_entry_s  ngx_http_credits_jwt_entry_t;

/* one allocation: the entry, the token, the project */
struct ngx_http_credits_jwt_entry_s {
    ngx_http_credits_jwt_entry_t   *next;      /* in its bucket */
    ngx_queue_t                     lru;
    uint32_t                        hash;
    time_t                          expires;
    ngx_str_t                       token;
    ngx_str_t                       project;
};


struct ngx_http_credits_jwt_cache_s {
    ngx_http_credits_jwt_entry_t  **buckets;
    ngx_uint_t                      mask;      /* buckets - 1 */
    ngx_uint_t                      count;
    ngx_uint_t                      size;      /* entries at most */
    ngx_queue_t                     lru;       /* most recent first */
};


static uint32_t ngx_http_credits_jwt_cache_hash(ngx_str_t *token);
static ngx_http_credits_jwt_cache_t *ngx_http_credits_jwt_cache_create(
    ngx_uint_t size);
static void ngx_http_credits_jwt_cache_grow(
    ngx_http_credits_jwt_cache_t *cache);
static ngx_http_credits_jwt_entry_t **ngx_http_credits_jwt_cache_find(
    ngx_http_credits_jwt_cache_t *cache, ngx_str_t *token, uint32_t hash);
static void ngx_http_credits_jwt_cache_remove(
    ngx_http_credits_jwt_cache_t *cache, ngx_http_credits_jwt_entry_t **ep);


/*
 * The token's last bytes (and its length): only tokens that passed the
 * verification are ever stored, and their last bytes are their
 * signature's, which no two tokens share and which spread evenly over the
 * buckets; hashing the whole token would cost more for nothing.  A token
 * made to share them finds the same bucket and fails the compare.
 */

static uint32_t
ngx_http_credits_jwt_cache_hash(ngx_str_t *token)
{
    size_t  n;

    n = ngx_min(token->len, NGX_HTTP_CREDITS_HASHED_TAIL);

    return ngx_http_credits_hash(token->data + token->len - n, n)
           ^ (uint32_t) token->len;
}


ngx_int_t
ngx_http_credits_jwt_cache_get(ngx_http_credits_jwt_conf_t *jcf,
    ngx_str_t *token, time_t now, ngx_pool_t *pool, ngx_str_t *project)
{
    ngx_http_credits_jwt_entry_t   *e, **ep;

    if (jcf->cache == NULL) {
        return NGX_DECLINED;
    }

    ep = ngx_http_credits_jwt_cache_find(jcf->cache, token,
                                         ngx_http_credits_jwt_cache_hash(token));
    e = *ep;

    if (e == NULL) {
        return NGX_DECLINED;
    }

    if (now >= e->expires) {
        ngx_http_credits_jwt_cache_remove(jcf->cache, ep);
        return NGX_DECLINED;
    }

    /* the entry may be evicted while the request still needs the project */

    project->data = ngx_pnalloc(pool, e->project.len);
    if (project->data == NULL) {
        return NGX_ERROR;
    }

    project->len = e->project.len;
    ngx_memcpy(project->data, e->project.data, e->project.len);

    ngx_queue_remove(&e->lru);
    ngx_queue_insert_head(&jcf->cache->lru, &e->lru);

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "credits: token cache hit, project \"%V\"", project);

    return NGX_OK;
}


void
ngx_http_credits_jwt_cache_put(ngx_http_credits_jwt_conf_t *jcf,
    ngx_str_t *token, time_t now, double exp, ngx_str_t *project)
{
    uint32_t                        hash;
    ngx_queue_t                    *q;
    ngx_http_credits_jwt_cache_t   *cache;
    ngx_http_credits_jwt_entry_t   *e, **ep;

    if (jcf->cache_size == 0) {
        return;
    }

    if (jcf->cache == NULL) {
        jcf->cache = ngx_http_credits_jwt_cache_create(jcf->cache_size);
        if (jcf->cache == NULL) {
            return;
        }
    }

    cache = jcf->cache;
    hash = ngx_http_credits_jwt_cache_hash(token);

    if (*ngx_http_credits_jwt_cache_find(cache, token, hash) != NULL) {
        return;
    }

    if (cache->count == cache->size) {
        q = ngx_queue_last(&cache->lru);
        e = ngx_queue_data(q, ngx_http_credits_jwt_entry_t, lru);

        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "credits: token cache full, evicting");

        ngx_http_credits_jwt_cache_remove(cache,
                   ngx_http_credits_jwt_cache_find(cache, &e->token, e->hash));
    }

    e = ngx_alloc(sizeof(ngx_http_credits_jwt_entry_t) + token->len
                  + project->len, ngx_cycle->log);
    if (e == NULL) {
        return;
    }

    e->hash = hash;

    /* never past "exp"; a token without one is re-verified now and then */
    e->expires = (exp > 0) ? (time_t) exp : now + NGX_HTTP_CREDITS_NO_EXP_TTL;

    e->token.len = token->len;
    e->token.data = (u_char *) (e + 1);
    ngx_memcpy(e->token.data, token->data, token->len);

    e->project.len = project->len;
    e->project.data = e->token.data + token->len;
    ngx_memcpy(e->project.data, project->data, project->len);

    ep = &cache->buckets[hash & cache->mask];
    e->next = *ep;
    *ep = e;

    ngx_queue_insert_head(&cache->lru, &e->lru);

    if (++cache->count > cache->mask + 1) {
        ngx_http_credits_jwt_cache_grow(cache);
    }
}


/*
 * Allocated in the worker, on first use, and so are the entries as tokens
 * come: the cache holds at most "size" tokens of at most
 * NGX_HTTP_CREDITS_TOKEN_MAX bytes.  Freed when the worker exits.
 */

static ngx_http_credits_jwt_cache_t *
ngx_http_credits_jwt_cache_create(ngx_uint_t size)
{
    ngx_http_credits_jwt_cache_t  *cache;

    cache = ngx_calloc(sizeof(ngx_http_credits_jwt_cache_t), ngx_cycle->log);
    if (cache == NULL) {
        return NULL;
    }

    cache->buckets = ngx_calloc(NGX_HTTP_CREDITS_JWT_BUCKETS
                                * sizeof(ngx_http_credits_jwt_entry_t *),
                                ngx_cycle->log);
    if (cache->buckets == NULL) {
        ngx_free(cache);
        return NULL;
    }

    cache->mask = NGX_HTTP_CREDITS_JWT_BUCKETS - 1;
    cache->size = size;
    ngx_queue_init(&cache->lru);

    return cache;
}


/*
 * Twice the buckets once there are more entries than buckets: a cache
 * that a few tokens use stays small, a full one has about one entry per
 * bucket.  Without memory for more, the buckets only get longer.
 */

static void
ngx_http_credits_jwt_cache_grow(ngx_http_credits_jwt_cache_t *cache)
{
    ngx_uint_t                      n;
    ngx_queue_t                    *q;
    ngx_http_credits_jwt_entry_t   *e, **buckets, **ep;

    n = (cache->mask + 1) * 2;

    buckets = ngx_calloc(n * sizeof(ngx_http_credits_jwt_entry_t *),
                         ngx_cycle->log);
    if (buckets == NULL) {
        return;
    }

    for (q = ngx_queue_head(&cache->lru);
         q != ngx_queue_sentinel(&cache->lru);
         q = ngx_queue_next(q))
    {
        e = ngx_queue_data(q, ngx_http_credits_jwt_entry_t, lru);
        ep = &buckets[e->hash & (n - 1)];
        e->next = *ep;
        *ep = e;
    }

    ngx_free(cache->buckets);
    cache->buckets = buckets;
    cache->mask = n - 1;
}


/* where the token's entry is linked, or the NULL that ends its bucket */

static ngx_http_credits_jwt_entry_t **
ngx_http_credits_jwt_cache_find(ngx_http_credits_jwt_cache_t *cache,
    ngx_str_t *token, uint32_t hash)
{
    ngx_http_credits_jwt_entry_t  **ep, *e;

    for (ep = &cache->buckets[hash & cache->mask]; *ep; ep = &e->next) {
        e = *ep;

        if (e->hash == hash
            && e->token.len == token->len
            && ngx_memcmp(e->token.data, token->data, token->len) == 0)
        {
            break;
        }
    }

    return ep;
}


static void
ngx_http_credits_jwt_cache_remove(ngx_http_credits_jwt_cache_t *cache,
    ngx_http_credits_jwt_entry_t **ep)
{
    ngx_http_credits_jwt_entry_t  *e;

    e = *ep;
    *ep = e->next;

    ngx_queue_remove(&e->lru);
    ngx_free(e);

    cache->count--;
}
