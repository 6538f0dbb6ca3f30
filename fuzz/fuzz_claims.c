/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Any bytes as the claims of a correctly signed HS256 token, so that the
 * claim checks (exp, nbf, iss, aud, the project id) are reached past the
 * signature.  A project id accepted must be [A-Za-z0-9._-]{1,128}.
 */

#include "fuzz_common.h"
#include <jwt.h>
#include <openssl/hmac.h>

#define FUZZ_SECRET  "fuzz-secret"


static u_char *
b64url(ngx_pool_t *pool, u_char *p, const u_char *data, size_t len)
{
    ngx_str_t  src, dst;

    src.data = (u_char *) data;
    src.len = len;
    dst.data = p;

    ngx_encode_base64url(&dst, &src);

    return p + dst.len;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                              *p, md[EVP_MAX_MD_SIZE];
    size_t                               i;
    double                               exp;
    unsigned int                         mdlen;
    const char                          *reason;
    ngx_int_t                            rc;
    ngx_str_t                            token, project;
    ngx_pool_t                          *pool;
    static ngx_http_credits_jwt_conf_t   jcf;
    static const u_char                  header[] = "{\"alg\":\"HS256\"}";

    fuzz_init();

    if (size > NGX_HTTP_CREDITS_TOKEN_MAX) {
        return 0;
    }

    if (jcf.key.data == NULL) {
        ngx_str_set(&jcf.key, FUZZ_SECRET);
        jcf.algorithms = 1 << JWT_ALG_HS256;
        ngx_str_set(&jcf.issuer, "iss");
        ngx_str_set(&jcf.audience, "aud");
        ngx_str_set(&jcf.project_claim, "sub");
        jcf.leeway = 5;
    }

    pool = ngx_create_pool(4096, &fuzz_log);
    if (pool == NULL) {
        return 0;
    }

    token.data = ngx_pnalloc(pool, 2 * size + 256);
    if (token.data == NULL) {
        ngx_destroy_pool(pool);
        return 0;
    }

    p = b64url(pool, token.data, header, sizeof(header) - 1);
    *p++ = '.';
    p = b64url(pool, p, data, size);

    HMAC(EVP_sha256(), FUZZ_SECRET, sizeof(FUZZ_SECRET) - 1, token.data,
         p - token.data, md, &mdlen);

    *p++ = '.';
    p = b64url(pool, p, md, mdlen);
    token.len = p - token.data;

    rc = ngx_http_credits_jwt_verify(&jcf, &token, 1700000000, pool, &project,
                                     &exp, &reason);

    if (rc == NGX_OK) {
        if (project.len == 0 || project.len > NGX_HTTP_CREDITS_PROJECT_MAX) {
            __builtin_trap();
        }

        for (i = 0; i < project.len; i++) {
            if (!isalnum(project.data[i]) && project.data[i] != '.'
                && project.data[i] != '_' && project.data[i] != '-')
            {
                __builtin_trap();
            }
        }
    }

    ngx_destroy_pool(pool);

    return 0;
}
