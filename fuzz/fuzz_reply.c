/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Any bytes as what Redis sent: hiredis's own reader makes replies of every
 * shape (errors, nil, integers, nested arrays, wrong types), which go to
 * the hold, settle and prices parsers the module uses.
 */

#include "fuzz_common.h"


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    void         *r;
    ngx_int_t     rc, balance;
    ngx_pool_t   *pool;
    redisReader  *reader;
    redisReply   *reply;

    fuzz_init();

    reader = redisReaderCreate();
    if (reader == NULL) {
        return 0;
    }

    redisReaderFeed(reader, (const char *) data, size);

    while (redisReaderGetReply(reader, &r) == REDIS_OK && r != NULL) {
        reply = r;

        rc = ngx_http_credits_hold_reply(reply, &balance);
        if (rc != NGX_ERROR && balance < 0) {
            __builtin_trap();
        }

        (void) ngx_http_credits_settle_reply(reply);

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
