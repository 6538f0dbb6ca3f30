/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Any bytes as a cost header or a price: either refused or a
 * non-negative integer that is exactly the decimal digits given.
 */

#include "fuzz_common.h"


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t     i;
    ngx_int_t  n, want;

    fuzz_init();

    n = ngx_http_credits_parse_amount((u_char *) data, size);

    if (n == NGX_ERROR) {
        return 0;
    }

    if (size == 0 || size > 15) {
        __builtin_trap();
    }

    want = 0;

    for (i = 0; i < size; i++) {
        if (data[i] < '0' || data[i] > '9') {
            __builtin_trap();
        }

        want = want * 10 + (data[i] - '0');
    }

    if (n != want || n < 0) {
        __builtin_trap();
    }

    return 0;
}
