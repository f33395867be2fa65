/* The plain stream activator: hold a connection while the service sleeps, then hand it
 * to the kernel (activators/ABI.md, "Streams").
 *
 * It knows no protocol. A new connection wakes the service and is paused at once: the
 * guest reads none of its bytes, the client's kernel and TCP window hold them. Once a
 * backend is ready the stream connects upstream, is resumed and spliced, so every byte
 * goes from the client's socket to the backend's in the kernel. With "wake_on_data": 1
 * a connection wakes the service only when its first bytes arrive (a port scanner's
 * connect wakes nothing): that first read (one chunk, at most 64 KiB) is held in one of
 * HELD_SLOTS buffers, the client is paused, and the bytes go upstream before the
 * splice; with no buffer free the connection is closed (logged). Streams held longer
 * than "hold_timeout_ms" are closed. need is `active` while any stream is open (an open
 * connection to an unknown protocol may be busy) or, with wake_on_data, any has sent
 * bytes; `none` otherwise.
 *
 * It is the reference for the stream host's tests and the "stream" scaffold of the
 * authoring kit; the HTTP/2 and PostgreSQL activators are the protocol-aware ones.
 * Written with the C SDK (activators/sdk/c).
 */
#include "../sdk/c/fabricd.h"

#define MAX_STREAMS 4096
#define HELD_SLOTS 64
#define HELD_CAP (64 * 1024) /* one host read */

enum { HOLDING = 1, CONNECTING, SPLICED };

struct stream {
    u8 state;
    u8 paused;
    u8 woke;     /* counts toward need (wake_on_data: it sent bytes) */
    u8 *held;    /* its first read, from the pool, or 0 */
    u32 held_len;
    u64 opened_ms;
};

FAB_TABLE(streams, struct stream, MAX_STREAMS);
FAB_POOL(held_pool, HELD_CAP, HELD_SLOTS);
static u32 nwoke;
static u32 wake_on_data;
static u32 hold_timeout_ms = 30000;
static u32 full_logged;

static int init(struct fab_json cfg) {
    wake_on_data = fab_cfg_u32(cfg, "wake_on_data", 0);
    hold_timeout_ms = fab_cfg_u32(cfg, "hold_timeout_ms", 30000);
    return 0;
}

static u32 sid_of(struct stream *s) { return fab_table_key(&streams, s); }

static void release_held(struct stream *s) {
    fab_pool_put(&held_pool, s->held);
    s->held = 0;
    s->held_len = 0;
}

static void forget(struct stream *s) {
    release_held(s);
    if (s->woke) nwoke--;
    fab_table_del(&streams, s);
}

static void close_stream(struct stream *s) {
    fab_close(sid_of(s));
    forget(s);
}

static void connect(struct stream *s) {
    s->state = CONNECTING;
    fab_connect(sid_of(s), 0); /* 0: the port's target_port */
}

static void on_open(u32 sid, u32 port) {
    (void)port;
    struct stream *s = fab_table_add(&streams, sid);
    if (!s) { fab_close(sid); return; }
    s->state = HOLDING;
    s->opened_ms = fab_now();
    s->woke = !wake_on_data;
    s->paused = !wake_on_data;
    if (s->woke) nwoke++;
    if (s->paused) fab_pause(sid); /* its bytes wait in the kernel */
    if (fab_backend_ready() && s->woke) connect(s);
}

static void on_data(u32 sid, const u8 *d, u32 n) {
    struct stream *s = fab_table_get(&streams, sid);
    if (!s || s->state == SPLICED) return;
    if (!s->held && !(s->held = fab_pool_get(&held_pool))) {
        if (!full_logged++) fab_log(FAB_WARNING, "stream activator: all hold buffers "
                                    "in use; closing a connection that sent bytes");
        close_stream(s);
        return;
    }
    if (n > HELD_CAP - s->held_len) { /* a read past the pause: not expected of the host */
        fab_log(FAB_WARNING, "stream activator: more bytes than one read; closing");
        close_stream(s);
        return;
    }
    fab_copy(s->held + s->held_len, d, n);
    s->held_len += n;
    if (!s->paused) { s->paused = 1; fab_pause(sid); }
    if (!s->woke) { s->woke = 1; nwoke++; }
    if (fab_backend_ready() && s->state == HOLDING) connect(s);
}

static void on_close(u32 sid) {
    struct stream *s = fab_table_get(&streams, sid);
    if (!s) return;
    if (s->state == SPLICED) { forget(s); return; } /* the pair ended */
    if (s->state == HOLDING && !s->held_len && wake_on_data) { close_stream(s); return; }
    /* Paused, a half-close is not seen before the splice; a reset is: what it sent is
     * moot then, but closing is the host's. Otherwise the splice carries the end on. */
}

static void on_result(u32 sid, int ok) {
    struct stream *s = fab_table_get(&streams, sid);
    if (!s || s->state != CONNECTING) return;
    if (!ok) {
        s->state = HOLDING; /* retried on the next backend_available or tick */
        return;
    }
    if (s->held_len) fab_upstream_send(sid, s->held, s->held_len);
    release_held(s);
    if (s->paused) { fab_resume(sid); s->paused = 0; }
    fab_splice(sid);
    s->state = SPLICED;
}

static void connect_held(void) {
    struct stream *s;
    for (u32 it = 0; (s = fab_table_next(&streams, &it));)
        if (s->state == HOLDING && s->woke) connect(s);
}

static void on_upstream_close(u32 sid) {
    struct stream *s = fab_table_get(&streams, sid);
    if (!s || s->state == SPLICED) return;
    close_stream(s);
}

static void on_tick(u64 now) {
    struct stream *s;
    for (u32 it = 0; (s = fab_table_next(&streams, &it));) {
        if (s->state != HOLDING && s->state != CONNECTING) continue;
        if (s->opened_ms == 0) s->opened_ms = now; /* opened before the first tick */
        if (now - s->opened_ms >= hold_timeout_ms) {
            fab_log(FAB_INFO, "stream activator: held connection timed out");
            close_stream(s);
        }
    }
    if (fab_backend_ready()) connect_held();
}

static void batch_end(void) { fab_need(nwoke ? FAB_NEED_ACTIVE : FAB_NEED_NONE); }

static const struct fab_handlers H = {
    .init = init,
    .stream_open = on_open,
    .stream_data = on_data,
    .stream_close = on_close,
    .upstream_result = on_result,
    .upstream_close = on_upstream_close,
    .backend_available = connect_held,
    .tick = on_tick,
    .batch_end = batch_end,
};
FAB_STREAM_ACTIVATOR(H)
