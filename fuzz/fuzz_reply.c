/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Any bytes as what Redis sent: hiredis's own reader makes replies of every
 * shape (errors, nil, integers, nested arrays, wrong types), which go to
 * the batch splitter and the hold, settle and prices parsers the module
 * uses.
 */

#include "fuzz_common.h"


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
    void         *r;
    ngx_int_t     rc, balance;
    ngx_pool_t   *pool;
    redisReader  *reader;
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
    if (reader == NULL) {
        return 0;
    }

    redisReaderFeed(reader, (const char *) data, size);

    while (redisReaderGetReply(reader, &r) == REDIS_OK && r != NULL) {
        reply = r;

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

        freeReplyObject(reply);
    }

    redisReaderFree(reader);

    return 0;
}
