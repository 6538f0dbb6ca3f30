
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * How a worker reaches Redis, as configured: credits_redis's addresses
 * and parameters, credits_redis_ssl_*, and names.  A name is resolved
 * through nginx's resolver at every connect when "resolver" is set at the
 * http level (a failover that moves the name is followed); otherwise once,
 * here, at configuration time, as nginx does for proxy_pass.
 */


#include "ngx_http_credits_module.h"


static char *ngx_http_credits_redis_param(ngx_conf_t *cf,
    ngx_http_credits_redis_conf_t *rc, ngx_str_t *value);
static char *ngx_http_credits_redis_parse_addr(ngx_conf_t *cf,
    ngx_str_t *url, ngx_http_credits_redis_addr_t *addr);
static ngx_int_t ngx_http_credits_redis_resolve(ngx_conf_t *cf,
    ngx_http_credits_redis_addr_t *addr);
#if (NGX_SSL)
static ngx_int_t ngx_http_credits_redis_ssl(ngx_conf_t *cf,
    ngx_http_credits_redis_conf_t *rc);
#endif


void
ngx_http_credits_redis_create_conf(ngx_http_credits_redis_conf_t *rc)
{
    /*
     * set by ngx_pcalloc():
     *
     *     rc->addrs = NULL;
     *     rc->user = { 0, NULL };
     *     rc->password = { 0, NULL };
     *     rc->sentinel = { 0, NULL };
     *     rc->ssl_name = { 0, NULL };
     *     rc->ssl_trusted_certificate = { 0, NULL };
     *     rc->ssl_certificate = { 0, NULL };
     *     rc->ssl_certificate_key = { 0, NULL };
     *     rc->resolver = NULL;
     */

    rc->db = NGX_CONF_UNSET;
    rc->timeout = NGX_CONF_UNSET_MSEC;
    rc->ssl_verify = NGX_CONF_UNSET;
    rc->ssl_verify_depth = NGX_CONF_UNSET_UINT;
}


char *
ngx_http_credits_redis_init_conf(ngx_conf_t *cf,
    ngx_http_credits_redis_conf_t *rc)
{
    ngx_str_t                       local = ngx_string("127.0.0.1:6379");
    ngx_http_credits_redis_addr_t  *addr;

    if (rc->addrs == NULL) {
        rc->addrs = ngx_array_create(cf->pool, 1,
                                     sizeof(ngx_http_credits_redis_addr_t));
        if (rc->addrs == NULL) {
            return NGX_CONF_ERROR;
        }

        addr = ngx_array_push(rc->addrs);
        if (addr == NULL) {
            return NGX_CONF_ERROR;
        }

        if (ngx_http_credits_redis_parse_addr(cf, &local, addr)
            != NGX_CONF_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    ngx_conf_init_value(rc->db, 0);
    ngx_conf_init_msec_value(rc->timeout, 1000);
    ngx_conf_init_value(rc->ssl_verify, 0);
    ngx_conf_init_uint_value(rc->ssl_verify_depth, 1);

    return NGX_CONF_OK;
}


/*
 * credits_redis ADDR... [user=S] [password=S] [db=N] [timeout=T] [ssl]
 *     [sentinel=NAME] [sentinel_user=S] [sentinel_password=S]
 */

char *
ngx_http_credits_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_credits_main_conf_t *cmcf = conf;

    ngx_str_t                      *value;
    ngx_uint_t                      i;
    ngx_http_credits_redis_addr_t  *addr;
    ngx_http_credits_redis_conf_t  *rc;

    rc = &cmcf->redis;

    if (rc->addrs) {
        return "is duplicate";
    }

    rc->addrs = ngx_array_create(cf->pool, 2,
                                 sizeof(ngx_http_credits_redis_addr_t));
    if (rc->addrs == NULL) {
        return NGX_CONF_ERROR;
    }

    value = cf->args->elts;

    /* addresses and parameters in any order: a parameter is a known word */

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strlchr(value[i].data, value[i].data + value[i].len, '=')
            || ngx_strcmp(value[i].data, "ssl") == 0)
        {
            if (ngx_http_credits_redis_param(cf, rc, &value[i])
                != NGX_CONF_OK)
            {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        addr = ngx_array_push(rc->addrs);
        if (addr == NULL) {
            return NGX_CONF_ERROR;
        }

        if (ngx_http_credits_redis_parse_addr(cf, &value[i], addr)
            != NGX_CONF_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    if (rc->addrs->nelts == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"credits_redis\" needs an address");
        return NGX_CONF_ERROR;
    }

    if ((rc->sentinel_user.len || rc->sentinel_password.len)
        && rc->sentinel.len == 0)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sentinel_user\" and \"sentinel_password\" "
                           "need \"sentinel=\"");
        return NGX_CONF_ERROR;
    }

    if (rc->user.len && rc->password.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"user=\" needs \"password=\"");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_credits_redis_param(ngx_conf_t *cf,
    ngx_http_credits_redis_conf_t *rc, ngx_str_t *value)
{
    ngx_str_t   s, *str;
    ngx_uint_t  i;

    static struct {
        ngx_str_t   name;
        size_t      offset;
    }  strings[] = {
        { ngx_string("user="),
          offsetof(ngx_http_credits_redis_conf_t, user) },
        { ngx_string("password="),
          offsetof(ngx_http_credits_redis_conf_t, password) },
        { ngx_string("sentinel="),
          offsetof(ngx_http_credits_redis_conf_t, sentinel) },
        { ngx_string("sentinel_user="),
          offsetof(ngx_http_credits_redis_conf_t, sentinel_user) },
        { ngx_string("sentinel_password="),
          offsetof(ngx_http_credits_redis_conf_t, sentinel_password) }
    };

    if (ngx_strcmp(value->data, "ssl") == 0) {
#if (NGX_SSL)
        rc->ssl_on = 1;
        return NGX_CONF_OK;
#else
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"ssl\" needs nginx built with OpenSSL");
        return NGX_CONF_ERROR;
#endif
    }

    for (i = 0; i < sizeof(strings) / sizeof(strings[0]); i++) {
        if (value->len > strings[i].name.len
            && ngx_strncmp(value->data, strings[i].name.data,
                           strings[i].name.len) == 0)
        {
            str = (ngx_str_t *) ((char *) rc + strings[i].offset);
            str->data = value->data + strings[i].name.len;
            str->len = value->len - strings[i].name.len;
            return NGX_CONF_OK;
        }
    }

    if (ngx_strncmp(value->data, "db=", 3) == 0) {
        rc->db = ngx_atoi(value->data + 3, value->len - 3);

        if (rc->db != NGX_ERROR) {
            return NGX_CONF_OK;
        }

    } else if (ngx_strncmp(value->data, "timeout=", 8) == 0) {
        s.data = value->data + 8;
        s.len = value->len - 8;

        rc->timeout = ngx_parse_time(&s, 0);

        if (rc->timeout != (ngx_msec_t) NGX_ERROR && rc->timeout != 0) {
            return NGX_CONF_OK;
        }
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", value);

    return NGX_CONF_ERROR;
}


/* "host:port" (a name or a numeric address) or "unix:/path", as written */

static char *
ngx_http_credits_redis_parse_addr(ngx_conf_t *cf, ngx_str_t *url,
    ngx_http_credits_redis_addr_t *addr)
{
    ngx_url_t  u;

    ngx_memzero(&u, sizeof(ngx_url_t));

    u.url = *url;
    u.default_port = 6379;
    u.no_resolve = 1;

    if (ngx_parse_url(cf->pool, &u) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid redis address \"%V\": %s",
                           &u.url, u.err ? u.err : "unknown error");
        return NGX_CONF_ERROR;
    }

    ngx_memzero(addr, sizeof(ngx_http_credits_redis_addr_t));

    addr->name = *url;

    /* null-terminated: the resolver and the logs take it as it is */
    addr->host.len = u.host.len;
    addr->host.data = ngx_pnalloc(cf->pool, u.host.len + 1);
    if (addr->host.data == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_cpystrn(addr->host.data, u.host.data, u.host.len + 1);

#if (NGX_HAVE_UNIX_DOMAIN)
    if (u.family == AF_UNIX) {
        addr->unix_socket = 1;
        return NGX_CONF_OK;
    }
#endif

    addr->port = u.port;

    return NGX_CONF_OK;
}


/*
 * After the http block is read: the resolver (if any) is known, and the
 * TLS context can be made.  Names are looked up now unless a resolver
 * will do it in the workers.
 */

ngx_int_t
ngx_http_credits_redis_postconf(ngx_conf_t *cf,
    ngx_http_credits_redis_conf_t *rc)
{
    ngx_uint_t                      i;
    ngx_http_core_loc_conf_t       *clcf;
    ngx_http_credits_redis_addr_t  *addr;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    /* core's merge gives every level a resolver, one without servers
     * when "resolver" is not set */
    if (clcf->resolver && clcf->resolver->connections.nelts) {
        rc->resolver = clcf->resolver;

        /* unset at the http level unless given there: nginx's default */
        rc->resolver_timeout = (clcf->resolver_timeout == NGX_CONF_UNSET_MSEC)
                               ? 30000 : clcf->resolver_timeout;
    }

    addr = rc->addrs->elts;

    if (rc->resolver == NULL) {
        for (i = 0; i < rc->addrs->nelts; i++) {
            if (ngx_http_credits_redis_resolve(cf, &addr[i]) != NGX_OK) {
                return NGX_ERROR;
            }
        }
    }

#if (NGX_SSL)
    if (rc->ssl_on) {
        if (rc->ssl_name.len == 0) {
            rc->ssl_name = addr[0].unix_socket ? (ngx_str_t) ngx_null_string
                                               : addr[0].host;
        }

        return ngx_http_credits_redis_ssl(cf, rc);
    }
#endif

    if (rc->ssl_certificate.len || rc->ssl_trusted_certificate.len
        || rc->ssl_verify == 1)
    {
        ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                           "credits_redis_ssl_* settings have no effect "
                           "without \"ssl\" in \"credits_redis\"");
    }

    return NGX_OK;
}


/* a name becomes its first address, numeric, in place */

static ngx_int_t
ngx_http_credits_redis_resolve(ngx_conf_t *cf,
    ngx_http_credits_redis_addr_t *addr)
{
    u_char     *p;
    ngx_url_t   u;

    if (addr->unix_socket
        || ngx_inet_addr(addr->host.data, addr->host.len) != INADDR_NONE)
    {
        return NGX_OK;
    }

#if (NGX_HAVE_INET6)
    {
    u_char  in6[16];

    if (ngx_inet6_addr(addr->host.data, addr->host.len, in6) == NGX_OK) {
        return NGX_OK;
    }
    }
#endif

    ngx_memzero(&u, sizeof(ngx_url_t));

    u.url = addr->name;
    u.default_port = 6379;

    if (ngx_parse_url(cf->pool, &u) != NGX_OK || u.naddrs == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "cannot resolve redis address \"%V\"%s%s",
                           &addr->name, u.err ? ": " : "",
                           u.err ? u.err : "");
        return NGX_ERROR;
    }

    p = ngx_pnalloc(cf->pool, NGX_SOCKADDR_STRLEN + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    addr->host.len = ngx_sock_ntop(u.addrs[0].sockaddr, u.addrs[0].socklen,
                                   p, NGX_SOCKADDR_STRLEN, 0);
    p[addr->host.len] = '\0';
    addr->host.data = p;

    return NGX_OK;
}


#if (NGX_SSL)

/* the TLS context, as ngx_http_proxy_module makes its proxy_ssl one */

static ngx_int_t
ngx_http_credits_redis_ssl(ngx_conf_t *cf, ngx_http_credits_redis_conf_t *rc)
{
    ngx_str_t            ciphers = ngx_string("DEFAULT");
    ngx_pool_cleanup_t  *cln;

    rc->ssl = ngx_pcalloc(cf->pool, sizeof(ngx_ssl_t));
    if (rc->ssl == NULL) {
        return NGX_ERROR;
    }

    rc->ssl->log = cf->log;

    if (ngx_ssl_create(rc->ssl, NGX_SSL_TLSv1_2|NGX_SSL_TLSv1_3, NULL)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        ngx_ssl_cleanup_ctx(rc->ssl);
        return NGX_ERROR;
    }

    cln->handler = ngx_ssl_cleanup_ctx;
    cln->data = rc->ssl;

    /* commands are appended while a write waits: the buffer may move */
    SSL_CTX_set_mode(rc->ssl->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE
                                   |SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);

    /*
     * nginx releases a connection's TLS buffers whenever they are empty,
     * which saves memory on many idle clients; a worker has a few busy
     * Redis connections, and would allocate them again at every read
     */
    SSL_CTX_clear_mode(rc->ssl->ctx, SSL_MODE_RELEASE_BUFFERS);

    if (ngx_ssl_ciphers(cf, rc->ssl, &ciphers, 0) != NGX_OK) {
        return NGX_ERROR;
    }

    if (rc->ssl_certificate.len) {
        if (rc->ssl_certificate_key.len == 0) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "no \"credits_redis_ssl_certificate_key\" is "
                          "defined for certificate \"%V\"",
                          &rc->ssl_certificate);
            return NGX_ERROR;
        }

        if (ngx_ssl_certificate(cf, rc->ssl, &rc->ssl_certificate,
                                &rc->ssl_certificate_key, NULL)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    if (rc->ssl_verify) {
        if (rc->ssl_trusted_certificate.len == 0) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "no \"credits_redis_ssl_trusted_certificate\" is "
                          "defined for the \"credits_redis_ssl_verify\" "
                          "directive");
            return NGX_ERROR;
        }

        if (ngx_ssl_trusted_certificate(cf, rc->ssl,
                                        &rc->ssl_trusted_certificate,
                                        rc->ssl_verify_depth)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    /* SNI takes a DNS name only, never an address */
    rc->ssl_sni = rc->ssl_name.len
                  && ngx_inet_addr(rc->ssl_name.data, rc->ssl_name.len)
                     == INADDR_NONE
                  && ngx_strlchr(rc->ssl_name.data,
                                 rc->ssl_name.data + rc->ssl_name.len, ':')
                     == NULL;

    return NGX_OK;
}

#endif
