
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The JWT gate: keys and algorithms at configuration time, and per request
 * the token's form, its pinned algorithm, its signature (libjwt) and its
 * claims.  libjwt 1.10 verifies with whatever "alg" the token names and
 * checks no claim, so both are checked here before anything is trusted.
 */


#include "ngx_http_credits_module.h"

#include <jwt.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/pem.h>


typedef struct {
    ngx_str_t     name;
    jwt_alg_t     alg;
    int           key_type;     /* EVP_PKEY_*, 0 for an HMAC secret */
    int           key_bits;     /* EC curve size, 0 for any */
} ngx_http_credits_alg_t;


static ngx_http_credits_alg_t  ngx_http_credits_algs[] = {
    { ngx_string("HS256"), JWT_ALG_HS256, 0, 0 },
    { ngx_string("HS384"), JWT_ALG_HS384, 0, 0 },
    { ngx_string("HS512"), JWT_ALG_HS512, 0, 0 },
    { ngx_string("RS256"), JWT_ALG_RS256, EVP_PKEY_RSA, 0 },
    { ngx_string("RS384"), JWT_ALG_RS384, EVP_PKEY_RSA, 0 },
    { ngx_string("RS512"), JWT_ALG_RS512, EVP_PKEY_RSA, 0 },
    { ngx_string("ES256"), JWT_ALG_ES256, EVP_PKEY_EC, 256 },
    { ngx_string("ES384"), JWT_ALG_ES384, EVP_PKEY_EC, 384 },
    { ngx_string("ES512"), JWT_ALG_ES512, EVP_PKEY_EC, 521 },
    { ngx_null_string, JWT_ALG_NONE, 0, 0 }
};


static ngx_int_t ngx_http_credits_jwt_split(ngx_str_t *token,
    ngx_str_t *segments, const char **reason);
static ngx_int_t ngx_http_credits_jwt_algorithm(json_t *header,
    ngx_uint_t algorithms, ngx_http_credits_alg_t **alg, const char **reason);
static ngx_int_t ngx_http_credits_jwt_signature(
    ngx_http_credits_jwt_conf_t *jcf, ngx_str_t *token,
    ngx_http_credits_alg_t *alg, ngx_pool_t *pool);
static ngx_int_t ngx_http_credits_jwt_claims(ngx_http_credits_jwt_conf_t *jcf,
    json_t *claims, time_t now, ngx_pool_t *pool, ngx_str_t *project,
    double *exp, const char **reason);
static ngx_int_t ngx_http_credits_jwt_audience(json_t *aud, ngx_str_t *want);
static ngx_int_t ngx_http_credits_jwt_project(json_t *claim, ngx_pool_t *pool,
    ngx_str_t *project);


char *
ngx_http_credits_jwt_load_key(ngx_conf_t *cf, ngx_http_credits_jwt_conf_t *jcf,
    ngx_str_t *file)
{
    BIO          *bio;
    ssize_t       n;
    ngx_fd_t      fd;
    ngx_str_t     name;
    EVP_PKEY     *pkey;
    ngx_file_info_t  fi;

    name = *file;

    if (ngx_conf_full_name(cf->cycle, &name, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    fd = ngx_open_file(name.data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "credits_jwt_key_file: cannot open \"%V\"", &name);
        return NGX_CONF_ERROR;
    }

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR
        || ngx_file_size(&fi) == 0 || ngx_file_size(&fi) > 65536)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "credits_jwt_key_file: \"%V\" is empty, too large "
                           "or unreadable", &name);
        ngx_close_file(fd);
        return NGX_CONF_ERROR;
    }

    jcf->key.len = ngx_file_size(&fi);
    jcf->key.data = ngx_pnalloc(cf->pool, jcf->key.len + 1);
    if (jcf->key.data == NULL) {
        ngx_close_file(fd);
        return NGX_CONF_ERROR;
    }

    n = ngx_read_fd(fd, jcf->key.data, jcf->key.len);
    ngx_close_file(fd);

    if (n != (ssize_t) jcf->key.len) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "credits_jwt_key_file: cannot read \"%V\"", &name);
        return NGX_CONF_ERROR;
    }

    jcf->key.data[jcf->key.len] = '\0';

    /* a file without a PEM armour is an HMAC secret, taken byte for byte */

    if (ngx_strnstr(jcf->key.data, "-----BEGIN", jcf->key.len) == NULL) {
        jcf->key_type = 0;
        return NGX_CONF_OK;
    }

    bio = BIO_new_mem_buf(jcf->key.data, jcf->key.len);
    if (bio == NULL) {
        return NGX_CONF_ERROR;
    }

    pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
    BIO_free(bio);

    if (pkey == NULL
        || (EVP_PKEY_base_id(pkey) != EVP_PKEY_RSA
            && EVP_PKEY_base_id(pkey) != EVP_PKEY_EC))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "credits_jwt_key_file: \"%V\" is not a usable "
                           "PEM public key (RSA or EC)", &name);
        EVP_PKEY_free(pkey);
        return NGX_CONF_ERROR;
    }

    jcf->key_type = EVP_PKEY_base_id(pkey);
    jcf->key_bits = EVP_PKEY_get_bits(pkey);

    EVP_PKEY_free(pkey);

    return NGX_CONF_OK;
}


char *
ngx_http_credits_jwt_parse_algorithms(ngx_conf_t *cf,
    ngx_http_credits_jwt_conf_t *jcf, ngx_str_t *names, ngx_uint_t n)
{
    ngx_uint_t               i;
    ngx_http_credits_alg_t  *a;

    for (i = 0; i < n; i++) {

        if (names[i].len == 4
            && ngx_strncasecmp(names[i].data, (u_char *) "none", 4) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "credits_jwt_algorithms: \"%V\" is never "
                               "accepted", &names[i]);
            return NGX_CONF_ERROR;
        }

        for (a = ngx_http_credits_algs; a->name.len; a++) {
            if (a->name.len == names[i].len
                && ngx_strncmp(a->name.data, names[i].data, a->name.len) == 0)
            {
                break;
            }
        }

        if (a->name.len == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "credits_jwt_algorithms: unknown algorithm "
                               "\"%V\"", &names[i]);
            return NGX_CONF_ERROR;
        }

        jcf->algorithms |= (ngx_uint_t) 1 << a->alg;
    }

    return NGX_CONF_OK;
}


/* every accepted algorithm must fit the key: an HS* token must never be
 * checked against a public key's bytes used as an HMAC secret */

char *
ngx_http_credits_jwt_check_conf(ngx_conf_t *cf, ngx_http_credits_jwt_conf_t *jcf)
{
    ngx_http_credits_alg_t  *a;

    if (jcf->key.data == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"credits on\" requires \"credits_jwt_key_file\"");
        return NGX_CONF_ERROR;
    }

    if (jcf->algorithms == 0) {
        jcf->algorithms = (ngx_uint_t) 1 << JWT_ALG_HS256;
    }

    for (a = ngx_http_credits_algs; a->name.len; a++) {

        if (!(jcf->algorithms & ((ngx_uint_t) 1 << a->alg))) {
            continue;
        }

        if (a->key_type != (int) jcf->key_type
            || (a->key_bits && a->key_bits != (int) jcf->key_bits))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "credits_jwt_algorithms: %V does not fit the "
                               "key in \"credits_jwt_key_file\" (%s)",
                               &a->name,
                               jcf->key_type == 0 ? "an HMAC secret"
                               : jcf->key_type == EVP_PKEY_RSA ? "an RSA key"
                               : "an EC key of another curve");
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


/* a token seen before and still before its "exp" skips the verification */

ngx_int_t
ngx_http_credits_jwt_check(ngx_http_credits_jwt_conf_t *jcf, ngx_str_t *token,
    time_t now, ngx_pool_t *pool, ngx_str_t *project, const char **reason)
{
    double     exp;
    ngx_int_t  rc;

    if (jcf->cache_size == 0
        || token->len == 0 || token->len > NGX_HTTP_CREDITS_TOKEN_MAX)
    {
        return ngx_http_credits_jwt_verify(jcf, token, now, pool, project,
                                           &exp, reason);
    }

    rc = ngx_http_credits_jwt_cache_get(jcf, token, now, pool, project);
    if (rc != NGX_DECLINED) {
        return rc;
    }

    rc = ngx_http_credits_jwt_verify(jcf, token, now, pool, project, &exp,
                                     reason);

    if (rc == NGX_OK) {
        ngx_http_credits_jwt_cache_put(jcf, token, now, exp, project);
    }

    return rc;
}


ngx_int_t
ngx_http_credits_jwt_verify(ngx_http_credits_jwt_conf_t *jcf,
    ngx_str_t *token, time_t now, ngx_pool_t *pool, ngx_str_t *project,
    double *exp, const char **reason)
{
    json_t                  *json;
    ngx_int_t                rc;
    ngx_str_t                segments[3];
    ngx_http_credits_alg_t  *alg;

    if (token->len == 0) {
        *reason = "no token";
        return NGX_DECLINED;
    }

    if (token->len > NGX_HTTP_CREDITS_TOKEN_MAX) {
        *reason = "token longer than 8 KB";
        return NGX_DECLINED;
    }

    if (ngx_http_credits_jwt_split(token, segments, reason) != NGX_OK) {
        return NGX_DECLINED;
    }

    rc = ngx_http_credits_jwt_decode_json(&segments[0], pool, &json);
    if (rc != NGX_OK) {
        *reason = "malformed token header";
        return rc;
    }

    rc = ngx_http_credits_jwt_algorithm(json, jcf->algorithms, &alg, reason);
    json_decref(json);

    if (rc != NGX_OK) {
        return rc;
    }

    rc = ngx_http_credits_jwt_decode_json(&segments[1], pool, &json);
    if (rc != NGX_OK) {
        *reason = "malformed token claims";
        return rc;
    }

    /* nothing of the claims is trusted before the signature is */

    rc = ngx_http_credits_jwt_signature(jcf, token, alg, pool);

    if (rc == NGX_OK) {
        rc = ngx_http_credits_jwt_claims(jcf, json, now, pool, project, exp,
                                         reason);

    } else {
        *reason = "bad signature";
    }

    json_decref(json);

    return rc;
}


/*
 * Three segments of base64url without padding (RFC 7515), every byte
 * checked in the one pass that finds the dots: nginx's decoder stops at
 * "=" and libjwt takes "+" and "/" for "-" and "_", so a token spelled
 * another way than its signer's would otherwise pass.  Only a token that
 * passed here is ever cached.
 */

static ngx_int_t
ngx_http_credits_jwt_split(ngx_str_t *token, ngx_str_t *segments,
    const char **reason)
{
    u_char      c, *p, *last;
    ngx_uint_t  n;

    static const char  *malformed[] = {
        "malformed token header: base64url expected",
        "malformed token claims: base64url expected",
        "malformed token signature: base64url expected"
    };

    n = 0;
    segments[0].data = token->data;
    last = token->data + token->len;

    for (p = token->data; p < last; p++) {
        c = *p;

        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
            || (c >= '0' && c <= '9') || c == '-' || c == '_')
        {
            continue;
        }

        if (c != '.') {
            *reason = malformed[n];
            return NGX_DECLINED;
        }

        if (n == 2) {
            break;
        }

        segments[n].len = p - segments[n].data;
        segments[++n].data = p + 1;
    }

    if (n != 2 || p != last || p == segments[2].data) {
        *reason = "malformed token: three non-empty segments expected";
        return NGX_DECLINED;
    }

    segments[2].len = last - segments[2].data;

    return NGX_OK;
}


/* base64url without padding, then a JSON object without duplicate keys
 * (a duplicate could say one thing to us and another to the signer) */

ngx_int_t
ngx_http_credits_jwt_decode_json(ngx_str_t *segment, ngx_pool_t *pool,
    json_t **json)
{
    ngx_str_t     decoded;
    json_error_t  err;

    decoded.data = ngx_pnalloc(pool, ngx_base64_decoded_length(segment->len));
    if (decoded.data == NULL) {
        return NGX_ERROR;
    }

    if (segment->len == 0
        || ngx_decode_base64url(&decoded, segment) != NGX_OK)
    {
        return NGX_DECLINED;
    }

    *json = json_loadb((char *) decoded.data, decoded.len,
                       JSON_REJECT_DUPLICATES, &err);

    if (*json == NULL) {
        return NGX_DECLINED;
    }

    if (!json_is_object(*json)) {
        json_decref(*json);
        return NGX_DECLINED;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_credits_jwt_algorithm(json_t *header, ngx_uint_t algorithms,
    ngx_http_credits_alg_t **alg, const char **reason)
{
    size_t                   len;
    const char              *name;
    ngx_http_credits_alg_t  *a;

    name = json_string_value(json_object_get(header, "alg"));

    if (name == NULL) {
        *reason = "token header has no \"alg\"";
        return NGX_DECLINED;
    }

    /* "crit" names extensions we would have to understand: we do not */

    if (json_object_get(header, "crit") != NULL) {
        *reason = "token header has \"crit\"";
        return NGX_DECLINED;
    }

    len = ngx_strlen(name);

    for (a = ngx_http_credits_algs; a->name.len; a++) {
        if (a->name.len == len
            && ngx_strncmp(a->name.data, name, len) == 0
            && (algorithms & ((ngx_uint_t) 1 << a->alg)))
        {
            *alg = a;
            return NGX_OK;
        }
    }

    *reason = "alg not accepted";
    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_credits_jwt_signature(ngx_http_credits_jwt_conf_t *jcf,
    ngx_str_t *token, ngx_http_credits_alg_t *alg, ngx_pool_t *pool)
{
    int        rc;
    jwt_t     *jwt;
    u_char    *copy;
    jwt_alg_t  signed_with;

    copy = ngx_pnalloc(pool, token->len + 1);
    if (copy == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(copy, token->data, token->len);
    copy[token->len] = '\0';

    jwt = NULL;
    rc = jwt_decode(&jwt, (char *) copy, jcf->key.data, jcf->key.len);

    if (rc != 0 || jwt == NULL) {
        return NGX_DECLINED;
    }

    signed_with = jwt_get_alg(jwt);
    jwt_free(jwt);

    return signed_with == alg->alg ? NGX_OK : NGX_DECLINED;
}


static ngx_int_t
ngx_http_credits_jwt_claims(ngx_http_credits_jwt_conf_t *jcf, json_t *claims,
    time_t now, ngx_pool_t *pool, ngx_str_t *project, double *exp,
    const char **reason)
{
    json_t      *v;
    const char  *s;

    *exp = 0;

    v = json_object_get(claims, "exp");

    if (v != NULL) {
        if (!json_is_number(v)) {
            *reason = "\"exp\" is not a number";
            return NGX_DECLINED;
        }

        *exp = json_number_value(v);

        if ((double) now >= *exp + (double) jcf->leeway) {
            *reason = "token expired";
            return NGX_DECLINED;
        }
    }

    v = json_object_get(claims, "nbf");

    if (v != NULL) {
        if (!json_is_number(v)) {
            *reason = "\"nbf\" is not a number";
            return NGX_DECLINED;
        }

        if ((double) now + (double) jcf->leeway < json_number_value(v)) {
            *reason = "token not yet valid";
            return NGX_DECLINED;
        }
    }

    if (jcf->issuer.len) {
        v = json_object_get(claims, "iss");
        s = json_string_value(v);

        if (s == NULL
            || json_string_length(v) != jcf->issuer.len
            || ngx_strncmp(s, jcf->issuer.data, jcf->issuer.len) != 0)
        {
            *reason = "wrong issuer";
            return NGX_DECLINED;
        }
    }

    if (jcf->audience.len
        && ngx_http_credits_jwt_audience(json_object_get(claims, "aud"),
                                         &jcf->audience)
           != NGX_OK)
    {
        *reason = "wrong audience";
        return NGX_DECLINED;
    }

    v = json_object_get(claims, (char *) jcf->project_claim.data);

    switch (ngx_http_credits_jwt_project(v, pool, project)) {

    case NGX_OK:
        return NGX_OK;

    case NGX_ERROR:
        return NGX_ERROR;

    default:
        *reason = (v == NULL || json_is_null(v)) ? "no project claim"
                                                 : "invalid project id";
        return NGX_DECLINED;
    }
}


static ngx_int_t
ngx_http_credits_jwt_audience(json_t *aud, ngx_str_t *want)
{
    size_t       i;
    const char  *s;

    if (json_is_array(aud)) {
        for (i = 0; i < json_array_size(aud); i++) {
            if (ngx_http_credits_jwt_audience(json_array_get(aud, i), want)
                == NGX_OK)
            {
                return NGX_OK;
            }
        }

        return NGX_DECLINED;
    }

    s = json_string_value(aud);

    if (s != NULL
        && json_string_length(aud) == want->len
        && ngx_strncmp(s, want->data, want->len) == 0)
    {
        return NGX_OK;
    }

    return NGX_DECLINED;
}


/* the project id becomes part of Redis keys: [A-Za-z0-9._-]{1,128} only */

static ngx_int_t
ngx_http_credits_jwt_project(json_t *claim, ngx_pool_t *pool,
    ngx_str_t *project)
{
    u_char       c;
    size_t       i, len;
    const char  *s;

    s = json_string_value(claim);
    if (s == NULL) {
        return NGX_DECLINED;
    }

    /* json_string_length() counts past an embedded NUL; strlen() does not */
    len = json_string_length(claim);

    if (len == 0 || len > NGX_HTTP_CREDITS_PROJECT_MAX) {
        return NGX_DECLINED;
    }

    for (i = 0; i < len; i++) {
        c = s[i];

        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
            || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-')
        {
            continue;
        }

        return NGX_DECLINED;
    }

    project->data = ngx_pnalloc(pool, len);
    if (project->data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(project->data, s, len);
    project->len = len;

    return NGX_OK;
}
