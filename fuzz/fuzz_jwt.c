/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * Any bytes as a token, through the whole check: form, header, pinned
 * algorithm, libjwt's signature check, claims, and the token cache.
 */

#include "fuzz_common.h"
#include <jwt.h>


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char                          *reason;
    double                               exp;
    ngx_str_t                            token, project;
    ngx_pool_t                          *pool;
    static ngx_http_credits_jwt_conf_t   jcf;

    fuzz_init();

    if (jcf.key.data == NULL) {
        ngx_str_set(&jcf.key, "fuzz-secret");
        jcf.algorithms = (1 << JWT_ALG_HS256) | (1 << JWT_ALG_HS384)
                         | (1 << JWT_ALG_HS512);
        ngx_str_set(&jcf.issuer, "https://issuer.example");
        ngx_str_set(&jcf.audience, "gateway");
        ngx_str_set(&jcf.project_claim, "sub");
        jcf.leeway = 30;
        jcf.cache_size = 4;
    }

    pool = ngx_create_pool(4096, &fuzz_log);
    if (pool == NULL) {
        return 0;
    }

    token.data = ngx_pnalloc(pool, size);
    if (token.data == NULL) {
        ngx_destroy_pool(pool);
        return 0;
    }

    ngx_memcpy(token.data, data, size);
    token.len = size;

    (void) ngx_http_credits_jwt_verify(&jcf, &token, 1700000000, pool,
                                       &project, &exp, &reason);
    (void) ngx_http_credits_jwt_check(&jcf, &token, 1700000000, pool,
                                      &project, &reason);

    ngx_destroy_pool(pool);

    return 0;
}
