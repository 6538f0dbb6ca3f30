
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * SipHash-2-4 with its 128-bit output (Aumasson and Bernstein): the keyed
 * hash a visitor is counted under.  A pseudorandom function of a secret
 * key, made for short inputs that clients choose: nobody without the key
 * can tell which value a hash stands for, or make two values share one.
 * It costs a few hundred instructions for a cookie, where the SHA-256 it
 * replaced cost OpenSSL 3 about 3 200 (its lookups and context around a
 * digest of one block).  fuzz/fuzz_visitor.c compares it with OpenSSL's.
 */


#include "ngx_http_credits_module.h"


typedef struct {
    uint64_t    v0, v1, v2, v3;
    uint64_t    tail;          /* the bytes of a block not yet full */
    size_t      len;           /* every byte so far */
} ngx_http_credits_sip_t;


static void ngx_http_credits_sip_block(ngx_http_credits_sip_t *s, uint64_t m);
static void ngx_http_credits_sip_rounds(ngx_http_credits_sip_t *s,
    ngx_uint_t n);
static uint64_t ngx_http_credits_sip_read(const u_char *p);
static void ngx_http_credits_sip_write(u_char *p, uint64_t v);


#define ngx_http_credits_rotl(x, b)  (((x) << (b)) | ((x) >> (64 - (b))))


/* SipHash-2-4-128 of the parts one after the other, keyed by 16 bytes */

void
ngx_http_credits_siphash(const u_char *key, ngx_str_t *parts, ngx_uint_t n,
    u_char *out)
{
    u_char                  *p, *last;
    uint64_t                 k0, k1;
    ngx_uint_t               i;
    ngx_http_credits_sip_t   s;

    k0 = ngx_http_credits_sip_read(key);
    k1 = ngx_http_credits_sip_read(key + 8);

    s.v0 = k0 ^ 0x736f6d6570736575ULL;
    s.v1 = k1 ^ 0x646f72616e646f6dULL ^ 0xee;    /* 0xee: 128-bit output */
    s.v2 = k0 ^ 0x6c7967656e657261ULL;
    s.v3 = k1 ^ 0x7465646279746573ULL;
    s.tail = 0;
    s.len = 0;

    for (i = 0; i < n; i++) {
        p = parts[i].data;
        last = p + parts[i].len;

        /* whole blocks straight from the part, once no block is begun */

        while (p < last) {
            if (s.len % 8 == 0 && last - p >= 8) {
                ngx_http_credits_sip_block(&s, ngx_http_credits_sip_read(p));
                p += 8;
                s.len += 8;
                continue;
            }

            s.tail |= (uint64_t) *p++ << (8 * (s.len % 8));

            if (++s.len % 8 == 0) {
                ngx_http_credits_sip_block(&s, s.tail);
                s.tail = 0;
            }
        }
    }

    /* the last block: what is left, and the length's low byte */

    ngx_http_credits_sip_block(&s, s.tail | (uint64_t) s.len << 56);

    s.v2 ^= 0xee;
    ngx_http_credits_sip_rounds(&s, 4);
    ngx_http_credits_sip_write(out, s.v0 ^ s.v1 ^ s.v2 ^ s.v3);

    s.v1 ^= 0xdd;
    ngx_http_credits_sip_rounds(&s, 4);
    ngx_http_credits_sip_write(out + 8, s.v0 ^ s.v1 ^ s.v2 ^ s.v3);
}


static void
ngx_http_credits_sip_block(ngx_http_credits_sip_t *s, uint64_t m)
{
    s->v3 ^= m;
    ngx_http_credits_sip_rounds(s, 2);
    s->v0 ^= m;
}


static void
ngx_http_credits_sip_rounds(ngx_http_credits_sip_t *s, ngx_uint_t n)
{
    while (n--) {
        s->v0 += s->v1;
        s->v1 = ngx_http_credits_rotl(s->v1, 13);
        s->v1 ^= s->v0;
        s->v0 = ngx_http_credits_rotl(s->v0, 32);

        s->v2 += s->v3;
        s->v3 = ngx_http_credits_rotl(s->v3, 16);
        s->v3 ^= s->v2;

        s->v0 += s->v3;
        s->v3 = ngx_http_credits_rotl(s->v3, 21);
        s->v3 ^= s->v0;

        s->v2 += s->v1;
        s->v1 = ngx_http_credits_rotl(s->v1, 17);
        s->v1 ^= s->v2;
        s->v2 = ngx_http_credits_rotl(s->v2, 32);
    }
}


/* little-endian, whatever the host */

static uint64_t
ngx_http_credits_sip_read(const u_char *p)
{
    ngx_uint_t  i;
    uint64_t    v;

    v = 0;

    for (i = 0; i < 8; i++) {
        v |= (uint64_t) p[i] << (8 * i);
    }

    return v;
}


static void
ngx_http_credits_sip_write(u_char *p, uint64_t v)
{
    ngx_uint_t  i;

    for (i = 0; i < 8; i++) {
        p[i] = (u_char) (v >> (8 * i));
    }
}
