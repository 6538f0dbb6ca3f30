
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The cost events of a text/event-stream response, parsed as the SSE
 * specification reads a stream: lines end with CR LF, LF or CR; an empty
 * line ends an event; "field: value" (one space after the colon is not
 * part of the value), a line starting with a colon is a comment, several
 * data lines are joined with LF.
 *
 * Bytes arrive in pieces split anywhere.  The bytes of the event being
 * read are kept until its empty line says whether it is a cost event: a
 * cost event is dropped (its data, when a whole number, is the cost so
 * far), any other event is copied out as it came.  An event is of no use
 * to a client before its empty line, so keeping it back delays nothing a
 * client can see.  An event longer than NGX_HTTP_CREDITS_SSE_EVENT_MAX is
 * no cost event: its bytes pass on as they come.
 *
 * No nginx request here: the response filter feeds the bytes, and the
 * fuzzer checks that any split gives the same output and costs.
 */


#include "ngx_http_credits_module.h"


#define NGX_HTTP_CREDITS_SSE_EVENT_MAX  4096


static u_char *ngx_http_credits_sse_eol(u_char *p, u_char *last);
static ngx_inline u_char *ngx_http_credits_sse_byte(
    ngx_http_credits_sse_t *sse, u_char c, u_char *out);
static u_char *ngx_http_credits_sse_span(ngx_http_credits_sse_t *sse,
    u_char *p, u_char *last, u_char *out);
static void ngx_http_credits_sse_line(ngx_http_credits_sse_t *sse,
    u_char *p, u_char *last);
static u_char *ngx_http_credits_sse_end(ngx_http_credits_sse_t *sse,
    u_char *out);


ngx_int_t
ngx_http_credits_sse_init(ngx_http_credits_sse_t *sse, ngx_str_t *name,
    ngx_pool_t *pool)
{
    ngx_memzero(sse, sizeof(ngx_http_credits_sse_t));

    sse->name = *name;
    sse->event = ngx_pnalloc(pool, NGX_HTTP_CREDITS_SSE_EVENT_MAX);
    if (sse->event == NULL) {
        return NGX_ERROR;
    }

    sse->cost = -1;
    sse->empty = 1;     /* at the start of a line */

    return NGX_OK;
}


/*
 * Reads p .. last and writes what the client gets at out, at most
 * (last - p) + what was kept back bytes; returns the end of the output.
 * At the end of the stream ("last_buf"), an event without its empty line
 * is given out as it is.
 */

u_char *
ngx_http_credits_sse_parse(ngx_http_credits_sse_t *sse, u_char *p,
    u_char *last, u_char *out, ngx_uint_t last_buf)
{
    u_char  c, *q;

    while (p < last) {
        c = *p;

        if (c != '\r' && c != '\n') {
            /* the line up to its end (or the buffer's), in one piece */
            q = ngx_http_credits_sse_eol(p + 1, last);

            out = ngx_http_credits_sse_span(sse, p, q, out);
            sse->ended = 0;
            sse->cr = 0;
            sse->empty = 0;
            p = q;
            continue;
        }

        p++;

        if (c == '\n' && sse->cr) {
            /* the LF of a CR LF: the line ended at the CR */
            sse->cr = 0;

            if (sse->ended) {
                /* it goes where the event that the CR ended went */
                if (sse->ended == NGX_HTTP_CREDITS_SSE_KEPT) {
                    *out++ = c;
                }

                sse->ended = 0;
                continue;
            }

            out = ngx_http_credits_sse_byte(sse, c, out);
            sse->line = sse->len;
            continue;
        }

        sse->ended = 0;
        sse->cr = (c == '\r');

        out = ngx_http_credits_sse_byte(sse, c, out);

        if (sse->empty) {
            out = ngx_http_credits_sse_end(sse, out);
            continue;
        }

        if (!sse->passing) {
            ngx_http_credits_sse_line(sse, sse->event + sse->line,
                                      sse->event + sse->len - 1);
        }

        sse->line = sse->len;
        sse->empty = 1;
    }

    if (last_buf && sse->len) {
        out = ngx_cpymem(out, sse->event, sse->len);
        sse->len = 0;
        sse->line = 0;
    }

    return out;
}


/*
 * Where a line ends: the first CR or LF, or "last".  Two memchr() passes
 * (vectorized in libc) instead of a test per byte: a stream's lines are
 * long and nearly all end with LF alone.
 */

static u_char *
ngx_http_credits_sse_eol(u_char *p, u_char *last)
{
    u_char  *lf, *cr;

    lf = memchr(p, '\n', last - p);

    if (lf == NULL) {
        lf = last;
    }

    cr = memchr(p, '\r', lf - p);

    return cr ? cr : lf;
}


/* a line end's byte, as a span of one */

static ngx_inline u_char *
ngx_http_credits_sse_byte(ngx_http_credits_sse_t *sse, u_char c, u_char *out)
{
    if (!sse->passing && sse->len < NGX_HTTP_CREDITS_SSE_EVENT_MAX) {
        sse->event[sse->len++] = c;
        return out;
    }

    return ngx_http_credits_sse_span(sse, &c, &c + 1, out);
}


/* bytes of the event being read, kept back unless the event passes */

static u_char *
ngx_http_credits_sse_span(ngx_http_credits_sse_t *sse, u_char *p,
    u_char *last, u_char *out)
{
    size_t  n;

    if (!sse->passing) {
        n = ngx_min((size_t) (last - p),
                    NGX_HTTP_CREDITS_SSE_EVENT_MAX - sse->len);

        ngx_memcpy(sse->event + sse->len, p, n);
        sse->len += n;
        p += n;

        if (p == last) {
            return out;
        }

        /* too long for a cost event: it passes as it comes */
        out = ngx_cpymem(out, sse->event, sse->len);
        sse->len = 0;
        sse->line = 0;
        sse->passing = 1;
    }

    return ngx_cpymem(out, p, last - p);
}


/* one field line of the event being read, without its line end */

static void
ngx_http_credits_sse_line(ngx_http_credits_sse_t *sse, u_char *p,
    u_char *last)
{
    u_char  *colon, *value;

    if (p == last || *p == ':') {
        return;
    }

    colon = ngx_strlchr(p, last, ':');
    value = colon ? colon + 1 : last;

    if (value < last && *value == ' ') {
        value++;
    }

    if (colon == NULL) {
        colon = last;
    }

    if (colon - p == 5 && ngx_memcmp(p, "event", 5) == 0) {
        sse->is_cost = ((size_t) (last - value) == sse->name.len
                        && ngx_memcmp(value, sse->name.data,
                                      sse->name.len) == 0);
        return;
    }

    /* read when the event ends, and only if it is a cost event */
    if (colon - p == 4 && ngx_memcmp(p, "data", 4) == 0
        && sse->data_lines++ == 0)
    {
        sse->data = value - sse->event;
        sse->data_len = last - value;
    }
}


/* the empty line: a cost event is dropped, any other given out */

static u_char *
ngx_http_credits_sse_end(ngx_http_credits_sse_t *sse, u_char *out)
{
    ngx_int_t  n;

    sse->ended = NGX_HTTP_CREDITS_SSE_KEPT;

    if (sse->passing) {
        sse->passing = 0;

    } else if (sse->is_cost) {
        sse->ended = NGX_HTTP_CREDITS_SSE_DROPPED;

        /* several data lines join with LF: never a whole number */
        n = (sse->data_lines == 1)
            ? ngx_http_credits_parse_amount(sse->event + sse->data,
                                            sse->data_len)
            : NGX_ERROR;

        if (n != NGX_ERROR) {
            sse->cost = n;
            sse->costs++;

        } else {
            sse->bad++;
        }

    } else {
        out = ngx_cpymem(out, sse->event, sse->len);
    }

    sse->len = 0;
    sse->line = 0;
    sse->empty = 1;
    sse->is_cost = 0;
    sse->data_lines = 0;

    return out;
}
