/* {{name}}: a PostgreSQL stream activator written with fabricd's C SDK (fabricd.h) alone:
 * the client's first messages are read by hand.
 *
 * An SSLRequest or GSSENCRequest is answered "N" (no encryption) by the module itself,
 * without waking anything; the StartupMessage that follows wakes the service and is held
 * (with anything after it, at most 8 KiB per connection) until a backend is connected,
 * then sent on and the connection spliced. A client that connects and sends nothing
 * (a port scan, a TCP health check) wakes nothing.
 */
#include "fabricd.h"

#define HOLD 8192
#define SSL_REQUEST 80877103u
#define GSSENC_REQUEST 80877104u

enum { HOLDING = 1, CONNECTING, SPLICED };

struct conn {
    u32 state;
    u32 woke;
    u32 paused;
    u64 opened_ms;
    struct fab_buf buf;
};

FAB_TABLE(conns, struct conn, 1024);
FAB_POOL(blocks, HOLD, 256);
static u32 nwoke;
static u32 hold_timeout_ms = 30000;

static int init(struct fab_json cfg) {
    hold_timeout_ms = fab_cfg_u32(cfg, "hold_timeout_ms", 30000);
    return 0;
}

static void forget(struct conn *c) {
    if (c->woke) nwoke--;
    fab_pool_put(&blocks, c->buf.data);
    fab_table_del(&conns, c);
}

static void drop_conn(u32 sid, struct conn *c) {
    fab_close(sid);
    forget(c);
}

static void connect(u32 sid, struct conn *c) {
    c->state = CONNECTING;
    fab_connect(sid, 0);
}

/* Answer encryption requests at the front of what is held; wake on anything else. */
static void scan(u32 sid, struct conn *c) {
    while (!c->woke && c->buf.len >= 8) {
        u32 len = fab_be32(c->buf.data), code = fab_be32(c->buf.data + 4);
        if (len == 8 && (code == SSL_REQUEST || code == GSSENC_REQUEST)) {
            fab_send(sid, "N", 1);
            fab_count("ssl_refused", 1);
            fab_buf_take(&c->buf, 8);
            continue;
        }
        c->woke = 1; /* a StartupMessage (or a CancelRequest): the backend's to answer */
        nwoke++;
        fab_count("startups_woke", 1);
    }
}

static void on_open(u32 sid, u32 port) {
    (void)port;
    u8 *block = fab_pool_get(&blocks);
    struct conn *c = block ? fab_table_add(&conns, sid) : 0;
    if (!c) {
        fab_pool_put(&blocks, block);
        fab_close(sid);
        fab_count("refused", 1);
        return;
    }
    c->state = HOLDING;
    c->opened_ms = fab_now();
    fab_buf_init(&c->buf, block, HOLD);
}

static void on_data(u32 sid, const u8 *data, u32 len) {
    struct conn *c = fab_table_get(&conns, sid);
    if (!c || c->state == SPLICED) return;
    if (fab_buf_put(&c->buf, data, len) < 0) {
        fab_log(FAB_WARNING, "{{name}}: more than 8 KiB held; closing");
        drop_conn(sid, c);
        return;
    }
    scan(sid, c);
    if (c->woke && !c->paused) {
        fab_pause(sid);
        c->paused = 1;
    }
    if (c->woke && c->state == HOLDING && fab_backend_ready()) connect(sid, c);
}

static void on_result(u32 sid, int ok) {
    struct conn *c = fab_table_get(&conns, sid);
    if (!c || c->state != CONNECTING) return;
    if (!ok) {
        c->state = HOLDING;
        return;
    }
    fab_upstream_send(sid, c->buf.data, c->buf.len);
    fab_pool_put(&blocks, c->buf.data);
    fab_buf_init(&c->buf, 0, 0);
    if (c->paused) fab_resume(sid);
    fab_splice(sid);
    c->state = SPLICED;
}

static void on_close(u32 sid) {
    struct conn *c = fab_table_get(&conns, sid);
    if (!c) return;
    if (c->state == SPLICED || !c->woke) drop_conn(sid, c);
}

static void on_upstream_close(u32 sid) {
    struct conn *c = fab_table_get(&conns, sid);
    if (c && c->state != SPLICED) drop_conn(sid, c);
}

static void on_tick(u64 now) {
    struct conn *c;
    for (u32 it = 0; (c = fab_table_next(&conns, &it));) {
        u32 sid = fab_table_key(&conns, c);
        if (c->state == HOLDING && c->woke && fab_backend_ready()) connect(sid, c);
        else if (c->state != SPLICED && now - c->opened_ms >= hold_timeout_ms) drop_conn(sid, c);
    }
}

static void on_available(void) {
    struct conn *c;
    for (u32 it = 0; (c = fab_table_next(&conns, &it));)
        if (c->state == HOLDING && c->woke) connect(fab_table_key(&conns, c), c);
}

static void batch_end(void) { fab_need(nwoke ? FAB_NEED_ACTIVE : FAB_NEED_NONE); }

static const struct fab_handlers H = {
    .init = init,
    .stream_open = on_open,
    .stream_data = on_data,
    .stream_close = on_close,
    .upstream_result = on_result,
    .upstream_close = on_upstream_close,
    .backend_available = on_available,
    .tick = on_tick,
    .batch_end = batch_end,
};
FAB_STREAM_ACTIVATOR(H)
