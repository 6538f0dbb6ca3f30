/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The visitors' keyed hash against OpenSSL's SipHash-2-4 (128-bit output):
 * the input's first 16 bytes are the key, the next two say where the rest
 * is cut into three parts (the module hashes project, NUL and value as
 * parts), and every cut must give OpenSSL's hash of the whole.  The
 * reference's first test vector is checked once, before any input.
 */

#include "fuzz_common.h"

#include <openssl/core_names.h>
#include <openssl/evp.h>


static void
fuzz_openssl_siphash(const uint8_t *key, const uint8_t *data, size_t size,
    u_char *out)
{
    size_t        len, outlen;
    OSSL_PARAM    params[2];
    EVP_MAC_CTX  *ctx;

    static EVP_MAC  *mac;

    if (mac == NULL) {
        mac = EVP_MAC_fetch(NULL, "SIPHASH", NULL);
    }

    len = 16;
    params[0] = OSSL_PARAM_construct_size_t(OSSL_MAC_PARAM_SIZE, &len);
    params[1] = OSSL_PARAM_construct_end();

    ctx = mac ? EVP_MAC_CTX_new(mac) : NULL;

    if (ctx == NULL
        || EVP_MAC_init(ctx, key, 16, params) != 1
        || EVP_MAC_update(ctx, data, size) != 1
        || EVP_MAC_final(ctx, out, &outlen, 16) != 1
        || outlen != 16)
    {
        __builtin_trap();
    }

    EVP_MAC_CTX_free(ctx);
}


/* SipHash-2-4-128, key 00..0f, empty message: the reference's vector */

static void
fuzz_known_answer(void)
{
    u_char      key[16], out[16];
    ngx_uint_t  i;

    static u_char  want[16] = {
        0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6,
        0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55, 0x02, 0x93
    };

    for (i = 0; i < 16; i++) {
        key[i] = (u_char) i;
    }

    ngx_http_credits_siphash(key, NULL, 0, out);

    if (ngx_memcmp(out, want, 16) != 0) {
        __builtin_trap();
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char      ours[16], theirs[16];
    size_t      cut1, cut2;
    ngx_str_t   parts[3];

    static int  checked;

    if (!checked) {
        fuzz_known_answer();
        checked = 1;
    }

    if (size < 18) {
        return 0;
    }

    fuzz_openssl_siphash(data, data + 18, size - 18, theirs);

    cut1 = data[16] % (size - 17);
    cut2 = cut1 + data[17] % (size - 17 - cut1);

    parts[0].data = (u_char *) data + 18;
    parts[0].len = cut1;
    parts[1].data = (u_char *) data + 18 + cut1;
    parts[1].len = cut2 - cut1;
    parts[2].data = (u_char *) data + 18 + cut2;
    parts[2].len = size - 18 - cut2;

    ngx_http_credits_siphash(data, parts, 3, ours);

    if (ngx_memcmp(ours, theirs, 16) != 0) {
        __builtin_trap();
    }

    return 0;
}
