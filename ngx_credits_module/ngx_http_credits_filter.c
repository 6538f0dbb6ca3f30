
/*
 * Copyright (C) The ngx_http_credits_module authors
 *
 * The response header filter: notes the final status for the settle (and
 * whether the location in charge made the response, or another stood in
 * for it), reads and removes the upstream's cost header, and tells the
 * client what was held and charged.
 */


#include "ngx_http_credits_module.h"


static ngx_int_t ngx_http_credits_header_filter(ngx_http_request_t *r);
static void ngx_http_credits_read_cost(ngx_http_request_t *r,
    ngx_http_credits_ctx_t *ctx, ngx_str_t *name);
static ngx_int_t ngx_http_credits_add_number(ngx_http_request_t *r,
    char *name, ngx_int_t value);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;


ngx_int_t
ngx_http_credits_filter_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_credits_header_filter;

    return NGX_OK;
}


static ngx_int_t
ngx_http_credits_header_filter(ngx_http_request_t *r)
{
    ngx_http_credits_ctx_t       *ctx;
    ngx_http_credits_loc_conf_t  *lcf;

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_credits_module);
    ctx = ngx_http_credits_get_ctx(r);

    if (ctx == NULL || !ctx->held) {

        /* the cost header is private to the upstream, charged or not */
        if (lcf->enable && lcf->cost_header.len) {
            ngx_http_credits_read_cost(r, NULL, &lcf->cost_header);
        }

        return ngx_http_next_header_filter(r);
    }

    ctx->header_seen = 1;
    ctx->status = r->headers_out.status;

    if (lcf != ctx->lcf && !ctx->accel) {
        /* error_page, or a redirect to a page that is not metered */
        ctx->stand_in = 1;
        return ngx_http_next_header_filter(r);
    }

    if (ctx->lcf->cost_header.len) {
        ngx_http_credits_read_cost(r, ctx, &ctx->lcf->cost_header);
    }

    if (ctx->lcf->cost_event.len
        && ngx_http_credits_stream_start(r, ctx) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ngx_http_credits_add_number(r, "X-Credits-Held", ctx->amount)
        != NGX_OK
        || ngx_http_credits_add_number(r, "X-Credits-Balance", ctx->balance)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ctx->cost_read && ctx->status < 400
        && ngx_http_credits_add_number(r, "X-Credits-Charged", ctx->charged)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


/*
 * Every copy of the header is removed.  One well-formed value sets the
 * charge to min(value, held); anything else (garbage, negative, several
 * copies) is logged and charges what was held, as if no cost was reported.
 */

static void
ngx_http_credits_read_cost(ngx_http_request_t *r, ngx_http_credits_ctx_t *ctx,
    ngx_str_t *name)
{
    ngx_int_t         cost;
    ngx_uint_t        i, found;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    cost = NGX_ERROR;
    found = 0;

    part = &r->headers_out.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash == 0
            || h[i].key.len != name->len
            || ngx_strncasecmp(h[i].key.data, name->data, name->len) != 0)
        {
            continue;
        }

        h[i].hash = 0;

        if (found++ == 0) {
            cost = ngx_http_credits_parse_amount(h[i].value.data,
                                                 h[i].value.len);
        }
    }

    if (ctx == NULL || found == 0) {
        return;
    }

    if (found > 1 || cost == NGX_ERROR) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "credits: project \"%V\" route \"%V\": unusable "
                      "\"%V\" header from the upstream, charging the held %i",
                      &ctx->project, &ctx->route, name, ctx->price);
        return;
    }

    ctx->cost_read = 1;
    ctx->charged = ngx_min(cost, ctx->price);
}


static ngx_int_t
ngx_http_credits_add_number(ngx_http_request_t *r, char *name,
    ngx_int_t value)
{
    ngx_str_t  s;

    s.data = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
    if (s.data == NULL) {
        return NGX_ERROR;
    }

    s.len = ngx_http_credits_write_int(s.data, value) - s.data;

    return ngx_http_credits_add_header(r, name, &s) ? NGX_OK : NGX_ERROR;
}


/* a response header of ours; the strings must outlive the response */

ngx_table_elt_t *
ngx_http_credits_add_header(ngx_http_request_t *r, char *name,
    ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NULL;
    }

    h->hash = 1;
    h->key.data = (u_char *) name;
    h->key.len = ngx_strlen(name);
    h->value = *value;

    return h;
}
