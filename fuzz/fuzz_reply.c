/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Any bytes as what Redis sent: hiredis's own reader makes replies of every
 * shape (errors, nil, integers, nested arrays, wrong types), which go to
 * the batch splitter and the hold, settle and prices parsers the module
 * uses.  The same bytes, fed in pieces, go to a reader whose replies live
 * in a pool (ngx_http_credits_reply.c): each of its replies must equal
 * hiredis's own, and it must stop where hiredis stops.  For inputs of an
 * odd size its first reply is kept while the others are read and freed,
 * and past the reader's end (as when a handler closes the connection): it
 * must stay intact.
 */

#include "fuzz_common.h"


/* the same tree: types, values, strings (NUL-terminated), elements */
static int
fuzz_same(redisReply *a, redisReply *b)
{
    size_t  i;

    if (a->type != b->type || a->integer != b->integer || a->len != b->len
        || a->elements != b->elements || (a->str == NULL) != (b->str == NULL))
    {
        return 0;
    }

    if (a->str && (memcmp(a->str, b->str, a->len) != 0
                   || b->str[b->len] != '\0'))
    {
        return 0;
    }

    for (i = 0; i < a->elements; i++) {
        if (!fuzz_same(a->element[i], b->element[i])) {
            return 0;
        }
    }

    return 1;
}


/* the next reply of the pooled reader, fed a few bytes at a time */
static int
fuzz_next(redisReader *reader, const uint8_t *data, size_t size, size_t *fed,
    void **r)
{
    size_t  n;

    for ( ;; ) {
        if (redisReaderGetReply(reader, r) != REDIS_OK) {
            return REDIS_ERR;
        }

        if (*r != NULL || *fed == size) {
            return REDIS_OK;
        }

        n = 1 + (*fed * 7 + size) % 13;
        n = (n < size - *fed) ? n : size - *fed;

        redisReaderFeed(reader, (const char *) data + *fed, n);
        *fed += n;
    }
}


static int
fuzz_huge_length(const uint8_t *data, size_t size)
{
    size_t  i;
    long    n;

    for (i = 0; i < size; i++) {
        if (data[i] != '*' && data[i] != '$') {
            continue;
        }

        for (n = 0; i + 1 < size && data[i + 1] >= '0' && data[i + 1] <= '9';
             i++)
        {
            n = n * 10 + (data[i + 1] - '0');

            if (n > 65536) {
                return 1;
            }
        }
    }

    return 0;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int           rc1, rc2;
    void         *r, *o, *first, *first_pooled;
    size_t        fed;
    ngx_int_t     rc, balance;
    ngx_pool_t   *pool;
    redisReader  *reader, *pooled;
    redisReply   *reply, *item, view;
    ngx_uint_t    n, i;

    fuzz_init();

    /*
     * hiredis 0.14 allocates whatever length the server announces
     * ("*555555555"): it trusts Redis, and so does the module.  Such
     * lengths are hiredis's business, not our parsers': skip them.
     */
    if (fuzz_huge_length(data, size)) {
        return 0;
    }

    reader = redisReaderCreate();
    pooled = ngx_http_credits_reply_reader(&fuzz_log);
    if (reader == NULL || pooled == NULL) {
        __builtin_trap();
    }

    redisReaderFeed(reader, (const char *) data, size);
    fed = 0;
    first = NULL;
    first_pooled = NULL;

    while ((rc1 = redisReaderGetReply(reader, &r)) == REDIS_OK && r != NULL) {

        if (fuzz_next(pooled, data, size, &fed, &o) != REDIS_OK
            || o == NULL || !fuzz_same(r, o))
        {
            __builtin_trap();
        }

        /* odd sizes only: even ones see the pool reset after each reply */
        if (first == NULL && (size & 1)) {
            first = r;
            first_pooled = o;

        } else {
            freeReplyObject(r);
        }

        /* the module parses the pooled replies */
        reply = o;

        /* a batch's reply split for 1 to 3 items, each part parsed the way
         * a hold (two elements each) and a settle (one) parse theirs */
        for (n = 1; n <= 3; n++) {
            for (i = 0; i < n; i++) {
                item = ngx_http_credits_batch_element(reply, n, i, 2, &view);

                /* a balance may be negative (a chargeback): a 402 says so */
                rc = ngx_http_credits_hold_reply(item, &balance);
                if (rc != NGX_ERROR
                    && (item->type != REDIS_REPLY_ARRAY
                        || item->elements != 2
                        || item->element[1]->integer != balance))
                {
                    __builtin_trap();
                }

                item = ngx_http_credits_batch_element(reply, n, i, 1, &view);

                (void) ngx_http_credits_settle_reply(item);
            }
        }

        pool = ngx_create_pool(1024, &fuzz_log);
        if (pool) {
            (void) ngx_http_credits_prices_parse(reply, pool);
            ngx_destroy_pool(pool);
        }

        if (reply != first_pooled) {
            ngx_http_credits_reply_free(reply);
        }
    }

    /* both fail, or both wait for more bytes */
    rc2 = fuzz_next(pooled, data, size, &fed, &o);

    if (rc1 != rc2 || (rc2 == REDIS_OK && o != NULL)) {
        __builtin_trap();
    }

    redisReaderFree(reader);

    /* a reply it was still reading goes with it, the first one stays */
    ngx_http_credits_reply_reader_free(pooled);

    if (first) {
        if (!fuzz_same(first, first_pooled)) {
            __builtin_trap();
        }

        freeReplyObject(first);
        ngx_http_credits_reply_free(first_pooled);
    }

    return 0;
}
