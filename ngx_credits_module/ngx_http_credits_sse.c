
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
 * Most events arrive whole, with LF line ends: those are read where they
 * are and given out a run of events at a time (ngx_http_credits_sse_events).
 * Only an event with a line "event: NAME" can be a cost event: events
 * before the next such line are not read at all (a search for NAME finds
 * it), the others a memchr() per line.  The byte-wise reading above takes
 * what is left: an event split between buffers, CRs, overlong events.
 *
 * No nginx request here: the response filter feeds the bytes, and the
 * fuzzer checks that any split gives the same output and costs.
 */


#include "ngx_http_credits_module.h"

#if (defined __SSE2__)
#include <emmintrin.h>
#endif


#define NGX_HTTP_CREDITS_SSE_EVENT_MAX  4096


static u_char *ngx_http_credits_sse_events(ngx_http_credits_sse_t *sse,
    u_char *p, u_char *last, u_char **out);
static u_char *ngx_http_credits_sse_skip(ngx_http_credits_sse_t *sse,
    u_char *p, u_char *last);
static u_char *ngx_http_credits_sse_find(ngx_http_credits_sse_t *sse,
    u_char *p, u_char *last);
static u_char *ngx_http_credits_sse_event_start(u_char *p, u_char *x);
static u_char *ngx_http_credits_sse_eol(u_char *p, u_char *last);
static ngx_inline u_char *ngx_http_credits_sse_byte(
    ngx_http_credits_sse_t *sse, u_char c, u_char *out);
static u_char *ngx_http_credits_sse_span(ngx_http_credits_sse_t *sse,
    u_char *p, u_char *last, u_char *out);
static void ngx_http_credits_sse_line(ngx_http_credits_sse_t *sse,
    u_char *event, u_char *p, u_char *last);
static ngx_inline u_char *ngx_http_credits_sse_value(u_char *colon,
    u_char *last);
static u_char *ngx_http_credits_sse_end(ngx_http_credits_sse_t *sse,
    u_char *out);
static void ngx_http_credits_sse_cost(ngx_http_credits_sse_t *sse,
    u_char *event);


/*
 * The event buffer comes from the pool only when an event must be kept
 * back (split between reads, CRs, overlong): whole events are read where
 * they are.
 */

void
ngx_http_credits_sse_init(ngx_http_credits_sse_t *sse, ngx_str_t *name,
    ngx_pool_t *pool)
{
    ngx_memzero(sse, sizeof(ngx_http_credits_sse_t));

    sse->name = *name;
    sse->pool = pool;
    sse->cost = -1;
    sse->empty = 1;     /* at the start of a line */
}


/*
 * Reads p .. last and writes what the client gets at out, at most
 * (last - p) + what was kept back bytes; returns the end of the output.
 * At the end of the stream ("last_buf"), an event without its empty line
 * is given out as it is.  NULL: no memory for an event kept back.
 */

u_char *
ngx_http_credits_sse_parse(ngx_http_credits_sse_t *sse, u_char *p,
    u_char *last, u_char *out, ngx_uint_t last_buf)
{
    u_char  c, *q, *cr;

    cr = NULL;          /* the next CR: not looked for yet */

    while (p < last) {

        if (sse->len == 0 && sse->empty && !sse->cr && !sse->passing) {
            /* at an event's start: whole events up to the next CR */
            if (cr == NULL || cr < p) {
                cr = memchr(p, '\r', last - p);
                cr = cr ? cr : last;
            }

            p = ngx_http_credits_sse_events(sse, p, cr, &out);

            if (p == last) {
                break;
            }
        }

        if (sse->event == NULL) {
            sse->event = ngx_pnalloc(sse->pool,
                                     NGX_HTTP_CREDITS_SSE_EVENT_MAX);
            if (sse->event == NULL) {
                return NULL;
            }
        }

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
            ngx_http_credits_sse_line(sse, sse->event,
                                      sse->event + sse->line,
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
 * Whole events in p .. last, where no CR is: each line found by one
 * memchr(), nothing copied but what the client gets, once per run of
 * events between cost events.  Returns where it stopped: the start of an
 * event that does not end before "last", or "last".
 */

static u_char *
ngx_http_credits_sse_events(ngx_http_credits_sse_t *sse, u_char *p,
    u_char *last, u_char **out)
{
    u_char  *start, *given, *line, *lf, *skip;

    given = p;
    start = p;
    skip = p;

    while (p < last) {

        if (p >= skip) {
            /* the events before the next one that may be a cost event */
            p = ngx_http_credits_sse_skip(sse, p, last);
            start = p;
            skip = p + 1;

            if (p == last) {
                break;
            }
        }

        for (line = p; /* void */ ; line = lf + 1) {
            lf = memchr(line, '\n', last - line);

            if (lf == NULL) {
                goto partial;
            }

            if (lf == line) {
                break;                      /* the empty line */
            }

            ngx_http_credits_sse_line(sse, start, line, lf);
        }

        p = lf + 1;

        if (sse->is_cost && p - start <= NGX_HTTP_CREDITS_SSE_EVENT_MAX) {
            *out = ngx_cpymem(*out, given, start - given);
            given = p;

            ngx_http_credits_sse_cost(sse, start);
        }

        sse->is_cost = 0;
        sse->data_lines = 0;
        start = p;
    }

partial:

    sse->is_cost = 0;
    sse->data_lines = 0;

    *out = ngx_cpymem(*out, given, start - given);

    return start;
}


/*
 * Where the first event in p .. last (whole events from p, no CR) that
 * has a line "event:NAME" or "event: NAME" starts; with no such line,
 * where the last whole event ends.  The events before it are no cost
 * events: they pass unread.
 */

static u_char *
ngx_http_credits_sse_skip(ngx_http_credits_sse_t *sse, u_char *p,
    u_char *last)
{
    u_char  *name;
    size_t   field, before, len;

    len = sse->name.len;

    for (name = p; /* void */ ; name++) {
        name = ngx_http_credits_sse_find(sse, name, last);

        if (name == NULL) {
            return ngx_http_credits_sse_event_start(p, last);
        }

        /* the name is the whole value of an "event" field */

        if (name + len == last || name[len] != '\n') {
            continue;
        }

        before = name - p;
        field = sizeof("event:") - 1;

        if (before > field && name[-1] == ' ') {
            field++;
        }

        if (before >= field
            && ngx_memcmp(name - field, "event:", sizeof("event:") - 1) == 0
            && (before == field || *(name - field - 1) == '\n'))
        {
            return ngx_http_credits_sse_event_start(p, name - field);
        }
    }
}


/*
 * Where the name is first found in p .. last, or NULL.  The places where
 * both the name's first and last bytes are, 16 at a time, where SSE2 is
 * (every x86-64): about a tenth of the time of a Horspool search, whose
 * next step waits on the byte loaded in the last, in fewer instructions;
 * elsewhere memchr() of the first byte.
 */

static u_char *
ngx_http_credits_sse_find(ngx_http_credits_sse_t *sse, u_char *p,
    u_char *last)
{
    u_char     *s;
    size_t      n;
#if (defined __SSE2__)
    __m128i     first, end, a, z;
    ngx_uint_t  at, i;
#endif

    n = sse->name.len;

    if ((size_t) (last - p) < n) {
        return NULL;
    }

    s = p;

#if (defined __SSE2__)

    first = _mm_set1_epi8((char) sse->name.data[0]);
    end = _mm_set1_epi8((char) sse->name.data[n - 1]);

    for ( /* void */ ; (size_t) (last - s) >= n - 1 + 16; s += 16) {
        a = _mm_cmpeq_epi8(first, _mm_loadu_si128((__m128i *) s));
        z = _mm_cmpeq_epi8(end, _mm_loadu_si128((__m128i *) (s + n - 1)));

        for (at = _mm_movemask_epi8(_mm_and_si128(a, z));
             at;
             at &= at - 1)
        {
            i = __builtin_ctz(at);

            if (ngx_memcmp(s + i, sse->name.data, n) == 0) {
                return s + i;
            }
        }
    }

#endif

    for ( /* void */ ; (size_t) (last - s) >= n; s++) {
        s = memchr(s, sse->name.data[0], last - s - n + 1);

        if (s == NULL) {
            return NULL;
        }

        if (ngx_memcmp(s, sse->name.data, n) == 0) {
            return s;
        }
    }

    return NULL;
}


/*
 * The start of the event that x is in: after the last empty line before
 * it, or p (an event's start).
 */

static u_char *
ngx_http_credits_sse_event_start(u_char *p, u_char *x)
{
    u_char  *lf;

    while (x > p) {
        lf = memrchr(p, '\n', x - p);

        if (lf == NULL) {
            break;
        }

        if (lf == p || lf[-1] == '\n') {
            return lf + 1;
        }

        x = lf;
    }

    return p;
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


/*
 * One field line of an event that starts at "event", without its line
 * end: the data's place is kept from the event's start.
 */

static void
ngx_http_credits_sse_line(ngx_http_credits_sse_t *sse, u_char *event,
    u_char *p, u_char *last)
{
    u_char     *value;
    size_t      n;
    ngx_str_t  *name;

    /*
     * Only the fields "event" and "data" matter: each is its name followed
     * by a colon or by the line's end (a field with no value): compared
     * where the line starts, with no search for the colon.
     */

    n = last - p;

    if (n >= 5 && ngx_memcmp(p, "event", 5) == 0
        && (n == 5 || p[5] == ':'))
    {
        value = ngx_http_credits_sse_value(p + 5, last);

        name = &sse->name;

        /* the first byte first: most events are not cost events */
        sse->is_cost = ((size_t) (last - value) == name->len
                        && (value == last || *value == name->data[0])
                        && ngx_memcmp(value, name->data, name->len) == 0);
        return;
    }

    /* read when the event ends, and only if it is a cost event */
    if (n >= 4 && ngx_memcmp(p, "data", 4) == 0
        && (n == 4 || p[4] == ':') && sse->data_lines++ == 0)
    {
        value = ngx_http_credits_sse_value(p + 4, last);

        sse->data = value - event;
        sse->data_len = last - value;
    }
}


/* a field's value: after its colon and one space, if any */

static ngx_inline u_char *
ngx_http_credits_sse_value(u_char *colon, u_char *last)
{
    if (colon == last) {
        return last;
    }

    colon++;

    return (colon < last && *colon == ' ') ? colon + 1 : colon;
}


/* the empty line: a cost event is dropped, any other given out */

static u_char *
ngx_http_credits_sse_end(ngx_http_credits_sse_t *sse, u_char *out)
{
    sse->ended = NGX_HTTP_CREDITS_SSE_KEPT;

    if (sse->passing) {
        sse->passing = 0;

    } else if (sse->is_cost) {
        sse->ended = NGX_HTTP_CREDITS_SSE_DROPPED;
        ngx_http_credits_sse_cost(sse, sse->event);

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


/* a cost event that starts at "event": its data, if a whole number */

static void
ngx_http_credits_sse_cost(ngx_http_credits_sse_t *sse, u_char *event)
{
    ngx_int_t  n;

    /* several data lines join with LF: never a whole number */
    n = (sse->data_lines == 1)
        ? ngx_http_credits_parse_amount(event + sse->data, sse->data_len)
        : NGX_ERROR;

    if (n != NGX_ERROR) {
        sse->cost = n;
        sse->costs++;

    } else {
        sse->bad++;
    }
}
