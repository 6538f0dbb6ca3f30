
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The verified-token cache: per worker and per location, so that a token
 * seen again is not verified again (an RSA or EC verify costs far more
 * than the rest of the request).  Entries are keyed by the SHA-256 of the
 * whole token and compared in full, so two tokens never share an entry;
 * an entry is never used at or after the token's "exp"; the least recently
 * used entry makes room when the cache is full.
 */


#include "ngx_http_credits_module.h"

#include <openssl/evp.h>


#define NGX_HTTP_CREDITS_NO_EXP_TTL  60


typedef struct {
    ngx_rbtree_node_t   node;       /* key: the digest's first bytes */
    ngx_queue_t         lru;
    u_char              digest[NGX_HTTP_CREDITS_DIGEST_LEN];
    time_t              expires;
    size_t              project_len;
    u_char              project[NGX_HTTP_CREDITS_PROJECT_MAX];
} ngx_http_credits_jwt_entry_t;


struct ngx_http_credits_jwt_cache_s {
    ngx_rbtree_t                    tree;
    ngx_rbtree_node_t               sentinel;
    ngx_queue_t                     lru;       /* most recent first */
    ngx_queue_t                     free;
    ngx_http_credits_jwt_entry_t    entries[1];
};


static ngx_http_credits_jwt_cache_t *ngx_http_credits_jwt_cache_create(
    ngx_uint_t size);
static ngx_http_credits_jwt_entry_t *ngx_http_credits_jwt_cache_find(
    ngx_http_credits_jwt_cache_t *cache, u_char *digest);
static void ngx_http_credits_jwt_cache_remove(
    ngx_http_credits_jwt_cache_t *cache, ngx_http_credits_jwt_entry_t *e);


/*
 * The SHA-256 of the parts, one after the other: of a token here, of a
 * visitor id (ngx_http_credits_visitors.c).  OpenSSL 3 looks the digest up
 * on every EVP_sha256() call and EVP_Digest() allocates a context per
 * call: the worker keeps one of each.
 */

ngx_int_t
ngx_http_credits_sha256(ngx_str_t *parts, ngx_uint_t n, u_char *digest)
{
    unsigned int         len;
    ngx_uint_t           i;
    static EVP_MD       *sha256;
    static EVP_MD_CTX   *ctx;

    if (ctx == NULL) {
        sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
        ctx = EVP_MD_CTX_new();

        if (sha256 == NULL || ctx == NULL) {
            EVP_MD_free(sha256);
            EVP_MD_CTX_free(ctx);
            sha256 = NULL;
            ctx = NULL;
            return NGX_ERROR;
        }
    }

    if (EVP_DigestInit_ex2(ctx, sha256, NULL) != 1) {
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        if (EVP_DigestUpdate(ctx, parts[i].data, parts[i].len) != 1) {
            return NGX_ERROR;
        }
    }

    if (EVP_DigestFinal_ex(ctx, digest, &len) != 1) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_credits_jwt_cache_get(ngx_http_credits_jwt_conf_t *jcf,
    u_char *digest, time_t now, ngx_pool_t *pool, ngx_str_t *project)
{
    ngx_http_credits_jwt_entry_t  *e;

    if (jcf->cache == NULL) {
        return NGX_DECLINED;
    }

    e = ngx_http_credits_jwt_cache_find(jcf->cache, digest);

    if (e == NULL) {
        return NGX_DECLINED;
    }

    if (now >= e->expires) {
        ngx_http_credits_jwt_cache_remove(jcf->cache, e);
        return NGX_DECLINED;
    }

    project->data = ngx_pnalloc(pool, e->project_len);
    if (project->data == NULL) {
        return NGX_ERROR;
    }

    project->len = e->project_len;
    ngx_memcpy(project->data, e->project, e->project_len);

    ngx_queue_remove(&e->lru);
    ngx_queue_insert_head(&jcf->cache->lru, &e->lru);

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "credits: token cache hit, project \"%V\"", project);

    return NGX_OK;
}


void
ngx_http_credits_jwt_cache_put(ngx_http_credits_jwt_conf_t *jcf,
    u_char *digest, time_t now, double exp, ngx_str_t *project)
{
    ngx_queue_t                   *q;
    ngx_http_credits_jwt_cache_t  *cache;
    ngx_http_credits_jwt_entry_t  *e;

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

    if (ngx_http_credits_jwt_cache_find(cache, digest) != NULL) {
        return;
    }

    if (ngx_queue_empty(&cache->free)) {
        q = ngx_queue_last(&cache->lru);
        e = ngx_queue_data(q, ngx_http_credits_jwt_entry_t, lru);

        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "credits: token cache full, evicting");

        ngx_http_credits_jwt_cache_remove(cache, e);
    }

    q = ngx_queue_head(&cache->free);
    ngx_queue_remove(q);
    e = ngx_queue_data(q, ngx_http_credits_jwt_entry_t, lru);

    ngx_memcpy(e->digest, digest, NGX_HTTP_CREDITS_DIGEST_LEN);
    ngx_memcpy(&e->node.key, digest, sizeof(ngx_rbtree_key_t));

    /* never past "exp"; a token without one is re-verified now and then */
    e->expires = (exp > 0) ? (time_t) exp : now + NGX_HTTP_CREDITS_NO_EXP_TTL;

    e->project_len = project->len;
    ngx_memcpy(e->project, project->data, project->len);

    ngx_rbtree_insert(&cache->tree, &e->node);
    ngx_queue_insert_head(&cache->lru, &e->lru);
}


static ngx_http_credits_jwt_cache_t *
ngx_http_credits_jwt_cache_create(ngx_uint_t size)
{
    ngx_uint_t                     i;
    ngx_http_credits_jwt_cache_t  *cache;

    /* allocated in the worker, on first use; freed when the worker exits */
    cache = ngx_calloc(sizeof(ngx_http_credits_jwt_cache_t)
                       + (size - 1) * sizeof(ngx_http_credits_jwt_entry_t),
                       ngx_cycle->log);
    if (cache == NULL) {
        return NULL;
    }

    ngx_rbtree_init(&cache->tree, &cache->sentinel, ngx_rbtree_insert_value);
    ngx_queue_init(&cache->lru);
    ngx_queue_init(&cache->free);

    for (i = 0; i < size; i++) {
        ngx_queue_insert_tail(&cache->free, &cache->entries[i].lru);
    }

    return cache;
}


static ngx_http_credits_jwt_entry_t *
ngx_http_credits_jwt_cache_find(ngx_http_credits_jwt_cache_t *cache,
    u_char *digest)
{
    ngx_rbtree_key_t               key;
    ngx_rbtree_node_t             *node, *sentinel;
    ngx_http_credits_jwt_entry_t  *e;

    ngx_memcpy(&key, digest, sizeof(ngx_rbtree_key_t));

    node = cache->tree.root;
    sentinel = cache->tree.sentinel;

    while (node != sentinel) {

        if (key != node->key) {
            node = (key < node->key) ? node->left : node->right;
            continue;
        }

        e = (ngx_http_credits_jwt_entry_t *) node;

        if (ngx_memcmp(e->digest, digest, NGX_HTTP_CREDITS_DIGEST_LEN) == 0) {
            return e;
        }

        /*
         * Same first bytes, another token (a 2^-64 chance): look right,
         * where equal keys are inserted.  Should a rotation have moved the
         * twin elsewhere, the cost is one more verification, never a
         * wrong hit.
         */
        node = node->right;
    }

    return NULL;
}


static void
ngx_http_credits_jwt_cache_remove(ngx_http_credits_jwt_cache_t *cache,
    ngx_http_credits_jwt_entry_t *e)
{
    ngx_rbtree_delete(&cache->tree, &e->node);
    ngx_queue_remove(&e->lru);
    ngx_queue_insert_head(&cache->free, &e->lru);
}
