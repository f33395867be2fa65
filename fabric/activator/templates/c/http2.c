/* {{name}}: an HTTP/2 (cleartext, prior knowledge) stream activator written with fabricd's
 * C SDK (fabricd.h) alone: frames are read by hand (9-byte headers after the 24-byte
 * client preface).
 *
 * A connection wakes the service only when it sends a request (a HEADERS frame): clients
 * that open a connection and only send SETTINGS or PING (connection pools, keep-alive
 * checks) wake nothing. What the client sent is held (at most 16 KiB per connection, in
 * one of 256 pool blocks; beyond that the client is paused) and goes to the backend
 * first once it is connected, then the connection is spliced. Every byte upstream is the
 * client's, in order, so if this module ever fails the fabric can still proxy it.
 */
#include "fabricd.h"

#define HOLD 16384
#define PREFACE "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#define PREFACE_LEN 24
#define FRAME_HEADERS 0x1

enum { HOLDING = 1, CONNECTING, SPLICED };

struct conn {
    u32 state;
    u32 woke;    /* a request was seen */
    u32 scanned; /* bytes of buf already parsed as frames */
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

/* Look at the frames held so far: wake on the first HEADERS (or on anything that is not
 * HTTP/2: the backend decides what to make of it). */
static void scan(struct conn *c) {
    const u8 *d = c->buf.data;
    u32 n = c->buf.len;
    if (c->scanned == 0) {
        u32 k = fab_min(n, PREFACE_LEN);
        if (!fab_memeq(d, PREFACE, k)) { c->woke = 1; nwoke++; return; }
        if (n < PREFACE_LEN) return;
        c->scanned = PREFACE_LEN;
    }
    while (!c->woke && n - c->scanned >= 9) {
        const u8 *f = d + c->scanned;
        if (f[3] == FRAME_HEADERS) { c->woke = 1; nwoke++; fab_count("requests_woke", 1); return; }
        u32 len = fab_be24(f);
        if (len > n - c->scanned - 9) return; /* the rest of this frame is still coming */
        c->scanned += 9 + len;
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
        fab_log(FAB_WARNING, "{{name}}: more than 16 KiB held; closing");
        drop_conn(sid, c);
        return;
    }
    if (!c->woke) scan(c);
    if (c->woke && !c->paused) {
        fab_pause(sid); /* the rest waits in the client's kernel */
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
    if (c->state == SPLICED || !c->woke) drop_conn(sid, c); /* ended, or never asked */
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
