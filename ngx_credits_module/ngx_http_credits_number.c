
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
 * n in decimal, at most NGX_INT_T_LEN bytes.  A request writes several
 * numbers (script arguments, response headers); ngx_sprintf() would parse
 * its format string for each.
 */

u_char *
ngx_http_credits_write_int(u_char *p, ngx_int_t n)
{
    u_char      digits[NGX_INT_T_LEN], *d;
    ngx_uint_t  u;

    u = (ngx_uint_t) n;

    if (n < 0) {
        *p++ = '-';
        u = -u;
    }

    d = digits + NGX_INT_T_LEN;

    do {
        *--d = (u_char) ('0' + u % 10);
        u /= 10;
    } while (u);

    return ngx_cpymem(p, d, digits + NGX_INT_T_LEN - d);
}
