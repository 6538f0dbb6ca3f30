/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * JSON strings of whatever Redis holds: route names, hold members and
 * ledger fields are bytes that any client may have written.
 */

#include <stdint.h>
#include <string.h>
#include "creditsctl.h"


/* the length of the well-formed UTF-8 sequence at p (RFC 3629), 0 if none */

static size_t
utf8_length(const unsigned char *p, const unsigned char *end)
{
    size_t    n, i;
    uint32_t  c, min;

    if (p[0] < 0x80) {
        return 1;
    }

    if (p[0] >= 0xc2 && p[0] <= 0xdf) {
        n = 2;
        c = p[0] & 0x1f;
        min = 0x80;

    } else if ((p[0] & 0xf0) == 0xe0) {
        n = 3;
        c = p[0] & 0x0f;
        min = 0x800;

    } else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
        n = 4;
        c = p[0] & 0x07;
        min = 0x10000;

    } else {
        return 0;
    }

    if ((size_t) (end - p) < n) {
        return 0;
    }

    for (i = 1; i < n; i++) {
        if ((p[i] & 0xc0) != 0x80) {
            return 0;
        }

        c = (c << 6) | (p[i] & 0x3f);
    }

    /* overlong forms, UTF-16 surrogates and beyond U+10FFFF */
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) {
        return 0;
    }

    return n;
}


/*
 * A JSON string: quotes, backslashes and control bytes escaped, and each
 * byte that is not part of well-formed UTF-8 replaced by U+FFFD, so the
 * document stays valid JSON whatever the bytes were.
 */

void
json_string(FILE *f, const char *s, size_t len)
{
    size_t                n;
    const unsigned char  *p, *end;

    p = (const unsigned char *) s;
    end = p + len;

    fputc('"', f);

    while (p < end) {
        if (*p == '"' || *p == '\\') {
            fprintf(f, "\\%c", *p++);

        } else if (*p < 0x20) {
            fprintf(f, "\\u%04x", *p++);

        } else if ((n = utf8_length(p, end)) != 0) {
            fwrite(p, 1, n, f);
            p += n;

        } else {
            fputs("\\ufffd", f);
            p++;
        }
    }

    fputc('"', f);
}


void
json_cstring(FILE *f, const char *s)
{
    json_string(f, s, strlen(s));
}
