/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The ledger's older entries moved out of Redis: written to a JSON-lines
 * file and made durable first, then, page by page, their totals added to
 * the project's checkpoint and the entries deleted, in one short script.
 * The audit counts the checkpoint and the entries after its last id, so
 * the invariant still holds from Redis alone.
 */

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "creditsctl.h"


/* a stream id's two numbers: "<ms>-<seq>", each at most 20 digits */
#define ID_PART_MAX    20

/* the start of an archive line: {"id":"<id>","project":"<P>" */
#define LINE_HEAD_MAX  (LEDGER_ID_MAX + 160)


typedef struct {
    const char     *project;
    const char     *path;
    int             fd;
    FILE           *file;
    char            last[LEDGER_ID_MAX];   /* the file's newest id, or "" */
} archive_file_t;


/*
 * One page moves from the ledger into the checkpoint, or nothing does:
 * the new totals are written only if the checkpoint is still the one
 * they were added to (ARGV[1], its last id, "" for none), so a page is
 * never counted twice, whoever else archives.  The answer is {1, number
 * of entries deleted}, or {0, the checkpoint's last id}.
 */
static const char  archive_page_lua[] =
    "local cur = redis.call('HGET', KEYS[1], 'last_id') or ''\n"
    "if cur ~= ARGV[1] then return {0, cur} end\n"
    "redis.call('HSET', KEYS[1], 'charged', ARGV[2], 'topups', ARGV[3],"
    " 'entries', ARGV[4], 'last_id', ARGV[5])\n"
    "return {1, redis.call('XDEL', KEYS[2], unpack(ARGV, 6))}\n";


/* "<ms>-<seq>" into its numbers: 0, else -1 */

static int
stream_id(const char *s, unsigned long long *ms, unsigned long long *seq)
{
    char         *end;
    const char   *dash;

    dash = strchr(s, '-');

    if (dash == NULL || dash == s || dash - s > ID_PART_MAX
        || strlen(dash + 1) == 0 || strlen(dash + 1) > ID_PART_MAX
        || strspn(s, "0123456789") != (size_t) (dash - s)
        || strspn(dash + 1, "0123456789") != strlen(dash + 1))
    {
        return -1;
    }

    errno = 0;
    *ms = strtoull(s, &end, 10);
    *seq = strtoull(dash + 1, &end, 10);

    return errno ? -1 : 0;
}


static int
stream_id_cmp(const char *a, const char *b)
{
    unsigned long long  ams, aseq, bms, bseq;

    if (stream_id(a, &ams, &aseq) || stream_id(b, &bms, &bseq)) {
        die(EXIT_REDIS, "\"%s\" or \"%s\" is not a stream id", a, b);
    }

    if (ams != bms) {
        return ams < bms ? -1 : 1;
    }

    return aseq < bseq ? -1 : (aseq > bseq);
}


/*
 * --before TIME as the first stream id not archived, "(<id>" for XRANGE:
 * a stream id, milliseconds since the epoch, or a UTC date
 * YYYY-MM-DD[THH:MM:SSZ].  A stream id is the time Redis wrote the entry.
 */

static void
parse_before(const char *s, char *end)
{
    size_t              i, len;
    struct tm           tm;
    unsigned long long  ms, seq;
    static const char   date[] = "dddd-dd-ddTdd:dd:ddZ";

    if (stream_id(s, &ms, &seq) == 0) {
        snprintf(end, LEDGER_ID_MAX, "(%llu-%llu", ms, seq);
        return;
    }

    len = strlen(s);

    if (len && strspn(s, "0123456789") == len) {
        snprintf(end, LEDGER_ID_MAX, "(%lld-0",
                 parse_number(s, 0, "time (milliseconds)"));
        return;
    }

    for (i = 0; i < len && i < sizeof(date) - 1; i++) {
        if (date[i] == 'd' ? (s[i] < '0' || s[i] > '9') : s[i] != date[i]) {
            break;
        }
    }

    memset(&tm, 0, sizeof(tm));
    tm.tm_year = atoi(s);
    tm.tm_mon = atoi(s + 5);
    tm.tm_mday = atoi(s + 8);

    if (i == len && len == sizeof(date) - 1) {
        tm.tm_hour = atoi(s + 11);
        tm.tm_min = atoi(s + 14);
        tm.tm_sec = atoi(s + 17);
    }

    if (i != len || (len != 10 && len != sizeof(date) - 1)
        || tm.tm_year < 1970 || tm.tm_mon < 1 || tm.tm_mon > 12
        || tm.tm_mday < 1 || tm.tm_mday > 31 || tm.tm_hour > 23
        || tm.tm_min > 59 || tm.tm_sec > 59)
    {
        die(EXIT_USAGE, "invalid time \"%s\": a stream id, milliseconds since "
            "the epoch, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)", s);
    }

    tm.tm_year -= 1900;
    tm.tm_mon -= 1;

    snprintf(end, LEDGER_ID_MAX, "(%lld-0", (long long) timegm(&tm) * 1000);
}


/*
 * The checkpoint as HMGET answers CHECKPOINT_FIELDS.  A missing hash is
 * nothing archived; totals without a last id, or values that are not
 * whole numbers, leave the books unreadable.
 */

void
checkpoint_parse(options_t *o, redisReply *r, const char *project,
    checkpoint_t *cp)
{
    size_t              i;
    long long          *n[3];
    redisReply         *v;
    unsigned long long  ms, seq;

    n[0] = &cp->charged;
    n[1] = &cp->topups;
    n[2] = &cp->entries;

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 4) {
        die(EXIT_REDIS, "unexpected reply to HMGET of the checkpoint");
    }

    for (i = 0; i < 3; i++) {
        *n[i] = stored_number(r->element[i], key(o, project, "checkpoint"));
    }

    v = r->element[3];
    cp->last[0] = '\0';

    if (v->type == REDIS_REPLY_STRING && v->len < LEDGER_ID_MAX - 1
        && stream_id(v->str, &ms, &seq) == 0)
    {
        memcpy(cp->last, v->str, v->len + 1);

    } else if (v->type != REDIS_REPLY_NIL
               || cp->charged || cp->topups || cp->entries)
    {
        die(EXIT_REDIS, "%s has no valid last_id",
            key(o, project, "checkpoint"));
    }
}


void
checkpoint_read(options_t *o, const char *project, checkpoint_t *cp)
{
    redisReply  *r;

    r = run(o, "HMGET %s charged topups entries last_id",
            key(o, project, "checkpoint"));
    checkpoint_parse(o, r, project, cp);
    freeReplyObject(r);
}


/*
 * The ledger's first id not counted by the checkpoint, for XRANGE: its
 * last id excluded ("(id", a last id is shorter than LEDGER_ID_MAX - 1),
 * or "-" when nothing was archived.
 */

void
checkpoint_after(const checkpoint_t *cp, char *start)
{
    if (cp->last[0] == '\0') {
        strcpy(start, "-");
        return;
    }

    start[0] = '(';
    strcpy(start + 1, cp->last);
}


/*
 * The offset of the last '\n' before "before" (a file offset), or -1.
 */

static off_t
last_newline(archive_file_t *a, off_t before)
{
    char     buf[4096];
    off_t    at;
    ssize_t  n;

    while (before > 0) {
        at = before > (off_t) sizeof(buf) ? before - (off_t) sizeof(buf) : 0;
        n = pread(a->fd, buf, before - at, at);

        if (n != before - at) {
            die(EXIT_REDIS, "cannot read %s: %s", a->path,
                n < 0 ? strerror(errno) : "short read");
        }

        while (n-- > 0) {
            if (buf[n] == '\n') {
                return at + n;
            }
        }

        before = at;
    }

    return -1;
}


/*
 * After a crash, the file may end with entries whose page was not yet
 * deleted from Redis (they are not written again: a.last), and with a
 * line cut short (cut off: its page was not deleted either).
 */

static void
archive_file_recover(archive_file_t *a)
{
    char     head[LINE_HEAD_MAX], want[LINE_HEAD_MAX];
    off_t    size, nl, start;
    ssize_t  n;
    size_t   len, id_len;

    a->last[0] = '\0';

    size = lseek(a->fd, 0, SEEK_END);
    if (size <= 0) {
        return;
    }

    nl = last_newline(a, size);

    if (nl >= 0) {
        start = last_newline(a, nl) + 1;
        n = pread(a->fd, head, sizeof(head) - 1, start);
        head[n > 0 ? n : 0] = '\0';

        /* {"id":"<id>","project":"<P>" as archive_entry() writes it */
        id_len = strncmp(head, "{\"id\":\"", 7) ? 0
                 : strspn(head + 7, "0123456789-");
        len = snprintf(want, sizeof(want), "\",\"project\":\"%s\"",
                       a->project);

        if (id_len == 0 || id_len >= LEDGER_ID_MAX
            || strncmp(head + 7 + id_len, want, len) != 0
            || (head[7 + id_len + len] != ','
                && head[7 + id_len + len] != '}'))
        {
            die(EXIT_USAGE, "%s does not end with an archived entry of "
                "project %s: give another --out", a->path, a->project);
        }

        memcpy(a->last, head + 7, id_len);
        a->last[id_len] = '\0';
    }

    if (nl != size - 1) {
        fprintf(stderr, "creditsctl: %s ends with a line cut short (an "
                "archive that stopped): removed, its entries are still in "
                "Redis\n", a->path);

        if (ftruncate(a->fd, nl + 1) != 0) {
            die(EXIT_REDIS, "cannot truncate %s: %s", a->path,
                strerror(errno));
        }
    }
}


static void
archive_file_open(archive_file_t *a)
{
    int    dir;
    char  *copy;

    a->fd = open(a->path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0600);

    if (a->fd < 0) {
        die(EXIT_USAGE, "cannot open %s: %s", a->path, strerror(errno));
    }

    archive_file_recover(a);

    a->file = fdopen(a->fd, "a");
    if (a->file == NULL) {
        die(EXIT_REDIS, "out of memory");
    }

    /* a new file's name must survive a crash as its lines do */
    copy = strdup(a->path);
    dir = copy ? open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;

    if (dir < 0 || fsync(dir) != 0) {
        die(EXIT_REDIS, "cannot sync the directory of %s", a->path);
    }

    close(dir);
    free(copy);
}


/* one line: {"id":..., "project":..., then every field as stored} */

static void
archive_entry(archive_file_t *a, redisReply *e)
{
    size_t       i;
    redisReply  *f;

    fprintf(a->file, "{\"id\":\"%s\",\"project\":\"%s\"", e->element[0]->str,
            a->project);

    f = e->element[1];

    for (i = 0; i + 1 < f->elements; i += 2) {
        fputc(',', a->file);
        json_string(a->file, f->element[i]->str, f->element[i]->len);
        fputc(':', a->file);
        json_string(a->file, f->element[i + 1]->str, f->element[i + 1]->len);
    }

    fputs("}\n", a->file);
}


/* the page's entries on disk before anything leaves Redis */

static void
archive_page_write(archive_file_t *a, redisReply *page)
{
    size_t  i;

    for (i = 0; i < page->elements; i++) {
        if (a->last[0] == '\0'
            || stream_id_cmp(page->element[i]->element[0]->str, a->last) > 0)
        {
            archive_entry(a, page->element[i]);
        }
    }

    if (fflush(a->file) != 0 || fsync(a->fd) != 0) {
        die(EXIT_REDIS, "cannot write %s: %s (nothing of this page was "
            "removed from Redis)", a->path, strerror(errno));
    }
}


/*
 * The page's totals into the checkpoint and its entries out of the
 * ledger, in one script whose time grows with the page only.
 */

static void
archive_page_move(options_t *o, const char *project, redisReply *page,
    checkpoint_t *cp)
{
    char            num[3][24];
    size_t          i, argc, *lens;
    const char    **argv;
    redisReply     *r, *id;
    checkpoint_t    next;
    ledger_sums_t   sums;

    next = *cp;
    sums.charged = 0;
    sums.topups = 0;

    for (i = 0; i < page->elements; i++) {
        ledger_sum_entry(o, page->element[i], &sums);
    }

    sum_add(&next.charged, sums.charged);
    sum_add(&next.topups, sums.topups);
    sum_add(&next.entries, (long long) page->elements);

    id = page->element[page->elements - 1]->element[0];
    memcpy(next.last, id->str, id->len + 1);

    snprintf(num[0], sizeof(num[0]), "%lld", next.charged);
    snprintf(num[1], sizeof(num[1]), "%lld", next.topups);
    snprintf(num[2], sizeof(num[2]), "%lld", next.entries);

    argc = 10 + page->elements;
    argv = calloc(argc, sizeof(char *));
    lens = calloc(argc, sizeof(size_t));

    if (argv == NULL || lens == NULL) {
        die(EXIT_REDIS, "out of memory");
    }

    argv[0] = "EVAL";
    argv[1] = archive_page_lua;
    argv[2] = "2";
    argv[3] = strdup(key(o, project, "checkpoint"));
    argv[4] = strdup(key(o, project, "ledger"));
    argv[5] = cp->last;
    argv[6] = num[0];
    argv[7] = num[1];
    argv[8] = num[2];
    argv[9] = next.last;

    for (i = 0; i < page->elements; i++) {
        argv[10 + i] = page->element[i]->element[0]->str;
    }

    for (i = 0; i < argc; i++) {
        if (argv[i] == NULL) {
            die(EXIT_REDIS, "out of memory");
        }

        lens[i] = strlen(argv[i]);
    }

    r = run_argv(o, (int) argc, argv, lens);

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2
        || r->element[0]->type != REDIS_REPLY_INTEGER)
    {
        die(EXIT_REDIS, "unexpected reply to the archive's script");
    }

    if (r->element[0]->integer == 0) {
        die(EXIT_REDIS, "the checkpoint of %s moved during the archive (to "
            "%s): another archive of it is running", project,
            r->element[1]->type == REDIS_REPLY_STRING ? r->element[1]->str
                                                      : "?");
    }

    /* the entries were in the ledger when read: their totals count */
    if (r->element[1]->type != REDIS_REPLY_INTEGER
        || r->element[1]->integer != (long long) page->elements)
    {
        fprintf(stderr, "creditsctl: some entries up to %s were removed from "
                "the ledger by someone else during the archive\n", next.last);
    }

    *cp = next;

    freeReplyObject(r);
    free((void *) argv[3]);
    free((void *) argv[4]);
    free(argv);
    free(lens);
}


int
cmd_archive(options_t *o, int argc, char **argv)
{
    int             done;
    char            start[LEDGER_ID_MAX], end[LEDGER_ID_MAX];
    const char     *p;
    redisReply     *page;
    checkpoint_t    cp, before;
    archive_file_t  a;

    if (argc != 5 || strcmp(argv[1], "--before") != 0
        || strcmp(argv[3], "--out") != 0)
    {
        die(EXIT_USAGE, "usage: creditsctl archive P --before TIME --out FILE");
    }

    p = check_project(argv[0]);
    parse_before(argv[2], end);

    memset(&a, 0, sizeof(a));
    a.project = p;
    a.path = argv[4];
    archive_file_open(&a);

    /* what the checkpoint counts is archived already */
    checkpoint_read(o, p, &cp);
    before = cp;

    checkpoint_after(&cp, start);

    do {
        page = ledger_page(o, key(o, p, "ledger"), start, end);
        done = page->elements < LEDGER_PAGE;

        if (page->elements) {
            archive_page_write(&a, page);
            archive_page_move(o, p, page, &cp);
        }

        freeReplyObject(page);

    } while (!done);

    fclose(a.file);

    if (o->json) {
        printf("{\"project\":\"%s\",\"archived\":%lld,\"charged\":%lld,"
               "\"topups\":%lld,\"file\":", p, cp.entries - before.entries,
               cp.charged - before.charged, cp.topups - before.topups);
        json_cstring(stdout, a.path);
        printf(",\"checkpoint\":{\"entries\":%lld,\"charged\":%lld,"
               "\"topups\":%lld,\"last_id\":", cp.entries, cp.charged,
               cp.topups);

        if (cp.last[0]) {
            printf("\"%s\"}}\n", cp.last);
        } else {
            printf("null}}\n");
        }

    } else {
        printf("archived %lld entries (charged %lld, topups %lld) to %s\n",
               cp.entries - before.entries, cp.charged - before.charged,
               cp.topups - before.topups, a.path);

        if (cp.last[0]) {
            printf("checkpoint: %lld entries up to %s (charged %lld, topups "
                   "%lld)\n", cp.entries, cp.last, cp.charged, cp.topups);
        }
    }

    return 0;
}
