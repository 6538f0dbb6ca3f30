/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Any bytes as a cost header or a price: either refused or a
 * non-negative integer that is exactly the decimal digits given.  And
 * the first bytes as an integer: written in decimal as libc's printf()
 * writes it (ngx_http_credits_write_int takes two digits a step).
 */

#include "fuzz_common.h"


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char     written[NGX_INT_T_LEN], *end;
    char       printed[32];
    size_t     i;
    ngx_int_t  n, want;

    fuzz_init();

    /* as many bytes as the input has, up to 8: small numbers too */
    n = 0;
    ngx_memcpy(&n, data, ngx_min(size, sizeof(ngx_int_t)));

    end = ngx_http_credits_write_int(written, n);

    if (end - written != snprintf(printed, sizeof(printed), "%lld",
                                  (long long) n)
        || ngx_memcmp(written, printed, end - written) != 0)
    {
        __builtin_trap();
    }

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
