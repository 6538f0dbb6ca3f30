/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * What every fuzzer needs of nginx before our code can run: page size,
 * time, and a cycle whose log writes to /dev/null.
 */

#ifndef _FUZZ_COMMON_H_INCLUDED_
#define _FUZZ_COMMON_H_INCLUDED_

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_credits_module.h"


static ngx_log_t        fuzz_log;
static ngx_open_file_t  fuzz_log_file;
static ngx_cycle_t      fuzz_cycle;


static void
fuzz_init(void)
{
    static int  done;

    if (done) {
        return;
    }

    done = 1;

    ngx_pagesize = getpagesize();
    ngx_cacheline_size = 64;
    for (ngx_pagesize_shift = 0; (1 << ngx_pagesize_shift) < ngx_pagesize;
         ngx_pagesize_shift++) { /* void */ }

    ngx_time_init();
    ngx_use_stderr = 0;

    fuzz_log_file.fd = open("/dev/null", O_WRONLY);
    fuzz_log.file = &fuzz_log_file;
    fuzz_log.log_level = NGX_LOG_DEBUG;   /* every log line is formatted */

    fuzz_cycle.log = &fuzz_log;
    ngx_cycle = &fuzz_cycle;
}

#endif
