
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Numbers: credits read from configuration, headers and Redis, and written
 * into script arguments and response headers; and the hash of bytes that
 * the module's own tables share.
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


/* "00" to "99": the digits of n % 100 at 2 * (n % 100) */

static const u_char  ngx_http_credits_digit_pairs[] =
    "0001020304050607080910111213141516171819"
    "2021222324252627282930313233343536373839"
    "4041424344454647484950515253545556575859"
    "6061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";


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

    for (v = u; v >= 100; v /= 100) {
        last += 2;
    }

    if (v >= 10) {
        last++;
    }

    p = last;

    /* two digits a step: half the divisions (holds write 13-digit times) */

    while (u >= 10) {
        p -= 2;
        ngx_memcpy(p, &ngx_http_credits_digit_pairs[2 * (u % 100)], 2);
        u /= 100;
    }

    if (u || p == last) {
        *--p = (u_char) ('0' + u);
    }

    return last;
}


/*
 * MurmurHash2 of the bytes, as ngx_murmur_hash2(), whose byte shifts
 * overflow an int for bytes of 128 and more (undefined behaviour, which
 * the fuzzers' sanitizer stops on): here every byte is widened to an
 * unsigned 32-bit word first.  Hashes the token cache and the open
 * batches by key: four bytes a step, where ngx_hash_key() takes one.
 */

uint32_t
ngx_http_credits_hash(u_char *data, size_t len)
{
    uint32_t  h, k;

    h = (uint32_t) len;

    while (len >= 4) {
        k = (uint32_t) data[0];
        k |= (uint32_t) data[1] << 8;
        k |= (uint32_t) data[2] << 16;
        k |= (uint32_t) data[3] << 24;

        k *= 0x5bd1e995;
        k ^= k >> 24;
        k *= 0x5bd1e995;

        h *= 0x5bd1e995;
        h ^= k;

        data += 4;
        len -= 4;
    }

    switch (len) {
    case 3:
        h ^= (uint32_t) data[2] << 16;
        /* fall through */
    case 2:
        h ^= (uint32_t) data[1] << 8;
        /* fall through */
    case 1:
        h ^= (uint32_t) data[0];
        h *= 0x5bd1e995;
    }

    h ^= h >> 13;
    h *= 0x5bd1e995;
    h ^= h >> 15;

    return h;
}
