/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * creditsctl's connection to one Redis node (or sentinel): a socket of
 * our own, TCP or unix, with TLS through OpenSSL when --tls is given, and
 * of hiredis only its protocol code (commands formatted by the caller,
 * replies parsed by a redisReader).  Debian's hiredis 0.14 has no TLS,
 * and one code path for plain and TLS connections keeps them alike.
 * A command-line tool may block: every connect, read and write waits
 * at most CONN_TIMEOUT seconds.
 */

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include "creditsctl.h"


#define CONN_TIMEOUT  2


struct conn_s {
    const char   *what;      /* "redis" or "sentinel", for messages */
    const char   *addr;
    int           fd;
    SSL          *ssl;
    int           verify;    /* the certificate is checked: --cacert */
    int           asked;     /* for a client certificate, without --cert */
    redisReader  *reader;
};


/* a socket connected within CONN_TIMEOUT, then blocking with timeouts */

static int
connect_socket(const struct sockaddr *sa, socklen_t len)
{
    int             fd, err;
    socklen_t       errlen;
    struct pollfd   pfd;
    struct timeval  tv = { CONN_TIMEOUT, 0 };

    fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd == -1) {
        return -1;
    }

    if (connect(fd, sa, len) == -1) {
        if (errno != EINPROGRESS) {
            goto failed;
        }

        pfd.fd = fd;
        pfd.events = POLLOUT;

        err = poll(&pfd, 1, CONN_TIMEOUT * 1000);
        if (err <= 0) {
            errno = err ? errno : ETIMEDOUT;
            goto failed;
        }

        errlen = sizeof(err);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &errlen) == -1) {
            goto failed;
        }

        if (err) {
            errno = err;
            goto failed;
        }
    }

    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) == -1
        || setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == -1
        || setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) == -1)
    {
        goto failed;
    }

    if (sa->sa_family != AF_UNIX) {
        err = 1;
        (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &err, sizeof(err));
    }

    return fd;

failed:

    err = errno;
    close(fd);
    errno = err;
    return -1;
}


/* "unix:/path" or "host:port" (every address the name has, in turn) */

static const char *
connect_addr(conn_t *c, char *host, size_t size)
{
    int                 rc;
    const char         *colon;
    struct addrinfo     hints, *res, *ai;
    struct sockaddr_un  sun;

    if (strncmp(c->addr, "unix:", 5) == 0) {
        memset(&sun, 0, sizeof(sun));
        sun.sun_family = AF_UNIX;

        if (strlen(c->addr + 5) >= sizeof(sun.sun_path)) {
            die(EXIT_USAGE, "invalid address \"%s\": path too long", c->addr);
        }

        strcpy(sun.sun_path, c->addr + 5);
        host[0] = '\0';

        c->fd = connect_socket((struct sockaddr *) &sun, sizeof(sun));

        return c->fd == -1 ? strerror(errno) : NULL;
    }

    colon = strrchr(c->addr, ':');
    if (colon == NULL || colon == c->addr
        || (size_t) (colon - c->addr) >= size)
    {
        die(EXIT_USAGE, "invalid address \"%s\": host:port or unix:/path",
            c->addr);
    }

    memcpy(host, c->addr, colon - c->addr);
    host[colon - c->addr] = '\0';
    (void) parse_number(colon + 1, 1, "port");

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;

    rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc != 0) {
        return gai_strerror(rc);
    }

    for (ai = res; ai; ai = ai->ai_next) {
        c->fd = connect_socket(ai->ai_addr, ai->ai_addrlen);
        if (c->fd != -1) {
            break;
        }

        rc = errno;
    }

    freeaddrinfo(res);

    return c->fd == -1 ? strerror(rc) : NULL;
}


static const char *
openssl_error(void)
{
    const char     *s;
    unsigned long   e;

    /* the first error queued is the cause, the later ones its callers */
    e = ERR_peek_error();
    s = ERR_SYSTEM_ERROR(e) ? strerror(ERR_GET_REASON(e))
                            : ERR_reason_error_string(e);
    ERR_clear_error();

    return s ? s : "unknown OpenSSL error";
}


/*
 * Called when the server asks for a client certificate and none was
 * given: a TLS 1.3 server refuses it only after the handshake, so the
 * error that follows (a reset) is explained with this.
 */

static int
client_cert_asked(SSL *ssl, X509 **x509, EVP_PKEY **pkey)
{
    conn_t  *c;

    (void) x509;
    (void) pkey;

    c = SSL_get_app_data(ssl);
    c->asked = 1;

    return 0;
}


/* one context for every connection of the run, from the --tls options */

static SSL_CTX *
tls_context(options_t *o)
{
    static SSL_CTX  *ctx;

    if (ctx) {
        return ctx;
    }

    ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) {
        die(EXIT_REDIS, "TLS: %s", openssl_error());
    }

    if (o->cacert) {
        if (SSL_CTX_load_verify_locations(ctx, o->cacert, NULL) != 1) {
            die(EXIT_USAGE, "cannot load --cacert %s: %s", o->cacert,
                openssl_error());
        }

        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    }

    if (o->cert) {
        if (SSL_CTX_use_certificate_chain_file(ctx, o->cert) != 1) {
            die(EXIT_USAGE, "cannot load --cert %s: %s", o->cert,
                openssl_error());
        }

        if (SSL_CTX_use_PrivateKey_file(ctx, o->key, SSL_FILETYPE_PEM) != 1
            || SSL_CTX_check_private_key(ctx) != 1)
        {
            die(EXIT_USAGE, "cannot load --key %s: %s", o->key,
                openssl_error());
        }

    } else {
        SSL_CTX_set_client_cert_cb(ctx, client_cert_asked);
    }

    return ctx;
}


/* why an SSL call that returned rc failed */

static const char *
tls_reason(conn_t *c, int rc)
{
    static char  buf[256];
    long         v;

    v = c->verify ? SSL_get_verify_result(c->ssl) : X509_V_OK;

    if (v != X509_V_OK) {
        snprintf(buf, sizeof(buf), "certificate verify error: %s",
                 X509_verify_cert_error_string(v));
        return buf;
    }

    switch (SSL_get_error(c->ssl, rc)) {

    case SSL_ERROR_SSL:
        return openssl_error();

    case SSL_ERROR_ZERO_RETURN:
        return "connection closed by the server";

    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        return "timed out";

    default:
        if (ERR_peek_error()) {
            return openssl_error();
        }

        return errno == EAGAIN ? "timed out"
               : errno ? strerror(errno) : "connection closed by the server";
    }
}


static const char *
tls_error(conn_t *c, int rc)
{
    static char  buf[512];

    snprintf(buf, sizeof(buf), "%s%s", tls_reason(c, rc),
             c->asked ? " (the server asked for a client certificate: "
                        "--cert and --key)" : "");

    return buf;
}


/*
 * The name sent as SNI and verified (--sni, else the host connected to):
 * an address literal is not sent (RFC 6066) and is verified as an IP.
 */

static const char *
tls_handshake(options_t *o, conn_t *c, const char *host)
{
    int            rc;
    const char    *name;
    static char    buf[600];
    unsigned char  ip[sizeof(struct in6_addr)];

    name = o->sni ? o->sni : host;
    c->verify = (o->cacert != NULL);

    c->ssl = SSL_new(tls_context(o));
    if (c->ssl == NULL || SSL_set_fd(c->ssl, c->fd) != 1) {
        die(EXIT_REDIS, "TLS: %s", openssl_error());
    }

    SSL_set_app_data(c->ssl, c);

    if (inet_pton(AF_INET, name, ip) == 1 || inet_pton(AF_INET6, name, ip) == 1)
    {
        rc = !o->cacert
             || X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), name);

    } else {
        rc = SSL_set_tlsext_host_name(c->ssl, name)
             && (!o->cacert || SSL_set1_host(c->ssl, name));
    }

    if (rc != 1) {
        die(EXIT_REDIS, "TLS: name \"%s\": %s", name, openssl_error());
    }

    ERR_clear_error();
    errno = 0;

    rc = SSL_connect(c->ssl);
    if (rc == 1) {
        return NULL;
    }

    snprintf(buf, sizeof(buf), "TLS handshake failed: %s", tls_error(c, rc));

    return buf;
}


conn_t *
conn_open(options_t *o, const char *what, const char *addr)
{
    char         host[256];
    conn_t      *c;
    const char  *err;

    /* a server gone while we write must be an error, not a signal */
    signal(SIGPIPE, SIG_IGN);

    c = calloc(1, sizeof(conn_t));
    if (c == NULL) {
        die(EXIT_REDIS, "out of memory");
    }

    c->what = what;
    c->addr = addr;
    c->fd = -1;

    err = connect_addr(c, host, sizeof(host));

    if (err == NULL && o->tls) {
        err = tls_handshake(o, c, host);
    }

    if (err) {
        die(EXIT_REDIS, "cannot connect to %s %s: %s", what, addr, err);
    }

    c->reader = redisReaderCreate();
    if (c->reader == NULL) {
        die(EXIT_REDIS, "out of memory");
    }

    return c;
}


void
conn_close(conn_t *c)
{
    if (c->ssl) {
        SSL_free(c->ssl);
    }

    close(c->fd);
    redisReaderFree(c->reader);
    free(c);
}


/* a read or a write that returned n failed: say why, and end */

static void __attribute__((noreturn))
io_failed(conn_t *c, ssize_t n)
{
    if (c->ssl) {
        die(EXIT_REDIS, "%s %s: TLS: %s", c->what, c->addr, tls_error(c, n));
    }

    die(EXIT_REDIS, "%s %s: %s", c->what, c->addr,
        n == 0 ? "connection closed by the server"
        : errno == EAGAIN ? "timed out" : strerror(errno));
}


static void
conn_send(conn_t *c, const char *buf, size_t len)
{
    ssize_t  n;

    while (len) {
        ERR_clear_error();
        errno = 0;

        n = c->ssl ? SSL_write(c->ssl, buf, len > INT32_MAX ? INT32_MAX : len)
                   : write(c->fd, buf, len);

        if (n <= 0) {
            io_failed(c, n);
        }

        buf += n;
        len -= n;
    }
}


static void
conn_recv(conn_t *c)
{
    char     buf[16384];
    ssize_t  n;

    ERR_clear_error();
    errno = 0;

    n = c->ssl ? SSL_read(c->ssl, buf, sizeof(buf))
               : read(c->fd, buf, sizeof(buf));

    if (n <= 0) {
        io_failed(c, n);
    }

    if (redisReaderFeed(c->reader, buf, n) != REDIS_OK) {
        die(EXIT_REDIS, "out of memory");
    }
}


/* a formatted command's reply, an error reply included */

redisReply *
conn_request(conn_t *c, const char *cmd, size_t len)
{
    void  *r;

    conn_send(c, cmd, len);

    for ( ;; ) {
        if (redisReaderGetReply(c->reader, &r) != REDIS_OK) {
            die(EXIT_REDIS, "%s %s: %s", c->what, c->addr, c->reader->errstr);
        }

        if (r) {
            return r;
        }

        conn_recv(c);
    }
}


/* a command of the connection's set-up (AUTH, ROLE...): errors end it */

redisReply *
conn_command(conn_t *c, const char *what, const char *fmt, ...)
{
    int          len;
    char        *cmd;
    va_list      ap;
    redisReply  *r;

    va_start(ap, fmt);
    len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);

    if (len < 0) {
        die(EXIT_REDIS, "out of memory");
    }

    r = conn_request(c, cmd, len);
    free(cmd);

    if (r->type == REDIS_REPLY_ERROR) {
        die(EXIT_REDIS, "%s %s: %s failed: %s", c->what, c->addr, what,
            r->str);
    }

    return r;
}
