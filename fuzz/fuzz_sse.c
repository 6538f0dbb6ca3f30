/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Any bytes as an event stream, read in one piece, in pieces of a size
 * the input chooses and a byte at a time (never a whole event in one
 * piece: the byte-wise reading only): the client's bytes and the costs
 * found are the same however the stream is split, never more bytes come
 * out than went in, and a stream without the cost event's name comes out
 * unchanged.  The first byte also picks the name: names with bytes that
 * repeat test the search for the name.
 */

#include "fuzz_common.h"


static ngx_str_t  fuzz_names[] = {
    ngx_string("credits"),
    ngx_string("c"),
    ngx_string("cc"),
    ngx_string("abab")
};


static size_t
fuzz_parse(ngx_pool_t *pool, ngx_str_t *name, u_char *p, size_t size,
    size_t piece, u_char *out, ngx_http_credits_sse_t *sse)
{
    u_char  *o, *last;
    size_t   n;

    ngx_http_credits_sse_init(sse, name, pool);

    o = out;
    last = p + size;

    do {
        n = ngx_min(piece, (size_t) (last - p));
        o = ngx_http_credits_sse_parse(sse, p, p + n, o, p + n == last);
        if (o == NULL) {
            __builtin_trap();
        }

        p += n;
    } while (p < last);

    return o - out;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                  *one, *many, *bytes;
    size_t                   n1, n2, n3, piece;
    ngx_str_t               *name;
    ngx_pool_t              *pool;
    ngx_http_credits_sse_t   a, b, c;

    fuzz_init();

    if (size < 1) {
        return 0;
    }

    piece = 1 + data[0] % 13;
    name = &fuzz_names[data[0] / 13 % 4];
    data++;
    size--;

    pool = ngx_create_pool(4096, ngx_cycle->log);
    one = malloc(size + 1);
    many = malloc(size + 1);
    bytes = malloc(size + 1);

    if (pool == NULL || one == NULL || many == NULL || bytes == NULL) {
        __builtin_trap();
    }

    n1 = fuzz_parse(pool, name, (u_char *) data, size, size ? size : 1, one,
                    &a);
    n2 = fuzz_parse(pool, name, (u_char *) data, size, piece, many, &b);
    n3 = fuzz_parse(pool, name, (u_char *) data, size, 1, bytes, &c);

    if (n1 > size || n1 != n2 || ngx_memcmp(one, many, n1) != 0
        || a.cost != b.cost || a.costs != b.costs || a.bad != b.bad
        || n1 != n3 || ngx_memcmp(one, bytes, n1) != 0
        || a.cost != c.cost || a.costs != c.costs || a.bad != c.bad)
    {
        __builtin_trap();
    }

    if (ngx_strlcasestrn((u_char *) data, (u_char *) data + size,
                         name->data, name->len - 1) == NULL
        && (n1 != size || ngx_memcmp(one, data, size) != 0))
    {
        __builtin_trap();
    }

    free(one);
    free(many);
    free(bytes);
    ngx_destroy_pool(pool);

    return 0;
}
