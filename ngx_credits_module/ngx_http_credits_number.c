
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Numbers: credits read from configuration, headers and Redis, and written
 * into script arguments and response headers.
 */


#include "ngx_http_credits_module.h"


/* a non-negative integer of at most 15 digits (credits never get near) */

ngx_int_t
ngx_http_credits_parse_amount(u_char *p, size_t len)
{
    if (len == 0 || len > 15) {
        return NGX_ERROR;
    }

    return ngx_atoi(p, len);
}


/*
 * n in decimal, at most NGX_INT_T_LEN bytes.  A request writes a dozen
 * numbers, most of one or two digits (the lengths in a command to Redis):
 * ngx_sprintf() would parse its format string for each, and digits
 * written into a buffer would need a copy.  Here the end is found first
 * and the digits go where they belong.
 */

u_char *
ngx_http_credits_write_int(u_char *p, ngx_int_t n)
{
    u_char      *last;
    ngx_uint_t   u, v;

    u = (ngx_uint_t) n;

    if (n < 0) {
        *p++ = '-';
        u = -u;
    }

    last = p + 1;

    for (v = u; v >= 10; v /= 10) {
        last++;
    }

    p = last;

    do {
        *--p = (u_char) ('0' + u % 10);
        u /= 10;
    } while (u);

    return last;
}
