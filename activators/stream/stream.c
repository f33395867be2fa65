/* The plain stream activator: hold a connection while the service sleeps, then hand it
 * to the kernel (activators/ABI.md, "Streams").
 *
 * It knows no protocol. A new connection (or its first byte, with "wake_on_data": 1)
 * wakes the service; the client's bytes are held, up to "hold_bytes" per stream (then
 * the client is paused: TCP's own window holds the rest; at most 1 KiB here); once a backend is ready the
 * stream connects upstream, sends what it held, and is spliced. Held streams older than
 * "hold_timeout_ms" are closed. need is `active` while any stream is open (an open
 * connection to an unknown protocol may be busy), `none` when there is none.
 *
 * It is the reference for the stream host's tests and the "stream" scaffold of the
 * authoring kit; the HTTP/2 and PostgreSQL activators are the protocol-aware ones.
 */
#include "../common/fab.h"

#define MAX_STREAMS 4096
#define HELD_CAP 1024 /* per stream; past it the client is paused (TCP holds the rest) */

FAB_EXPORT(fab_streams) i32 fab_streams(void) { return 1; }

enum { FREE = 0, HOLDING, CONNECTING, SPLICED };

struct stream {
    u32 id;
    u8 state;
    u8 paused;
    u8 client_done;
    u32 held_len;
    u64 opened_ms;
    u8 held[HELD_CAP];
};

static struct stream streams[MAX_STREAMS];
static u32 nstreams;
static u32 backend_ready;
static u32 wake_on_data;
static u32 hold_timeout_ms = 30000;
static u32 hold_bytes = HELD_CAP;
static u64 now_ms;
static u32 need_told = 0xff;

FAB_EXPORT(fab_init) i32 fab_init(const u8 *cfg, u32 len) {
    wake_on_data = cfg_u32(cfg, len, "wake_on_data", 0);
    hold_timeout_ms = cfg_u32(cfg, len, "hold_timeout_ms", 30000);
    hold_bytes = cfg_u32(cfg, len, "hold_bytes", HELD_CAP);
    if (hold_bytes == 0 || hold_bytes > HELD_CAP) hold_bytes = HELD_CAP;
    return 0;
}

static struct stream *find(u32 id) {
    for (u32 i = 0; i < MAX_STREAMS; i++)
        if (streams[i].state != FREE && streams[i].id == id) return &streams[i];
    return 0;
}

static void act_sid(u32 kind, u32 id) {
    u8 *p = out_action(kind, 4);
    if (p) wr32(p, id);
}

static void act_connect(u32 id) {
    u8 *p = out_action(ACT_UPSTREAM_CONNECT, 6);
    if (!p) return;
    wr32(p, id);
    wr16(p + 4, 0); /* 0: the port's target_port */
}

static void act_send(u32 kind, u32 id, const u8 *data, u32 n) {
    u8 *p = out_action(kind, 4 + n);
    if (!p) return;
    wr32(p, id);
    memcpy(p + 4, data, n);
}

static void forget(struct stream *s) {
    s->state = FREE;
    s->held_len = 0;
    nstreams--;
}

static void on_open(const u8 *p, u32 len) {
    if (len < 6) return;
    u32 id = rd32(p);
    struct stream *s = 0;
    for (u32 i = 0; i < MAX_STREAMS; i++)
        if (streams[i].state == FREE) { s = &streams[i]; break; }
    if (!s) { act_sid(ACT_DOWNSTREAM_CLOSE, id); return; }
    s->id = id;
    s->state = HOLDING;
    s->paused = 0;
    s->client_done = 0;
    s->held_len = 0;
    s->opened_ms = now_ms;
    nstreams++;
    if (backend_ready) {
        s->state = CONNECTING;
        act_connect(id);
    }
}

static void on_data(const u8 *p, u32 len) {
    if (len < 4) return;
    struct stream *s = find(rd32(p));
    if (!s) return;
    const u8 *d = p + 4;
    u32 n = len - 4;
    if (s->state == SPLICED) return;
    if (n > HELD_CAP - s->held_len) {
        /* The host pauses us at hold_bytes, so only a burst past a pause lands here. */
        act_log(LOG_WARNING, "stream activator: held bytes over the cap; closing");
        act_sid(ACT_DOWNSTREAM_CLOSE, s->id);
        forget(s);
        return;
    }
    memcpy(s->held + s->held_len, d, n);
    s->held_len += n;
    if (s->held_len >= hold_bytes && !s->paused) {
        s->paused = 1;
        act_sid(ACT_PAUSE, s->id);
    }
}

static void on_close(const u8 *p, u32 len) {
    if (len < 4) return;
    struct stream *s = find(rd32(p));
    if (!s) return;
    if (s->state == SPLICED || (s->state == HOLDING && !s->held_len)) {
        /* spliced: the pair ended; holding nothing: the client gave up before a backend */
        if (s->state == HOLDING) act_sid(ACT_DOWNSTREAM_CLOSE, s->id);
        forget(s);
        return;
    }
    /* A half-close after a request (nc -N, shutdown(SHUT_WR)): what it sent still goes
     * upstream, and the answer back; the splice carries the end on. */
    s->client_done = 1;
}

static void on_result(const u8 *p, u32 len) {
    if (len < 5) return;
    struct stream *s = find(rd32(p));
    if (!s || s->state != CONNECTING) return;
    if (!p[4]) {
        s->state = HOLDING; /* retried on the next backend_available or tick */
        return;
    }
    if (s->held_len) act_send(ACT_UPSTREAM_SEND, s->id, s->held, s->held_len);
    s->held_len = 0;
    if (s->paused) { act_sid(ACT_RESUME, s->id); s->paused = 0; }
    act_sid(ACT_SPLICE, s->id);
    s->state = SPLICED;
}

static void connect_held(void) {
    for (u32 i = 0; i < MAX_STREAMS; i++) {
        struct stream *s = &streams[i];
        if (s->state != HOLDING) continue;
        if (wake_on_data && !s->held_len && !s->client_done) continue;
        s->state = CONNECTING;
        act_connect(s->id);
    }
}

static void on_upstream_close(const u8 *p, u32 len) {
    if (len < 4) return;
    struct stream *s = find(rd32(p));
    if (!s || s->state == SPLICED) return;
    act_sid(ACT_DOWNSTREAM_CLOSE, s->id);
    forget(s);
}

static void on_tick(const u8 *p, u32 len) {
    if (len < 8) return;
    now_ms = rd64(p);
    for (u32 i = 0; i < MAX_STREAMS; i++) {
        struct stream *s = &streams[i];
        if (s->state != HOLDING && s->state != CONNECTING) continue;
        if (s->opened_ms == 0) s->opened_ms = now_ms; /* opened before the first tick */
        if (now_ms - s->opened_ms >= hold_timeout_ms) {
            act_log(LOG_INFO, "stream activator: held connection timed out");
            act_sid(ACT_DOWNSTREAM_CLOSE, s->id);
            forget(s);
        }
    }
    if (backend_ready) connect_held();
}

static void tell_need(void) {
    u32 need = nstreams ? NEED_ACTIVE : NEED_NONE;
    if (wake_on_data) need = NEED_NONE;
    for (u32 i = 0; wake_on_data && i < MAX_STREAMS && need == NEED_NONE; i++) {
        struct stream *s = &streams[i];
        if (s->state == FREE) continue;
        if (!wake_on_data || s->held_len || s->state != HOLDING || s->client_done)
            need = NEED_ACTIVE;
    }
    if (need != need_told) {
        need_told = need;
        act_need(need);
    }
}

FAB_EXPORT(fab_process) i64 fab_process(const u8 *ev, u32 len) {
    out_begin();
    if (len < 2) return out_end();
    u32 count = rd16(ev);
    u32 off = 2;
    for (u32 i = 0; i < count; i++) {
        if (len - off < REC_HDR) break;
        u32 kind = ev[off];
        u32 plen = rd32(ev + off + 4);
        off += REC_HDR;
        if (plen > len - off) break;
        const u8 *pl = ev + off;
        off += plen;
        switch (kind) {
        case EV_STREAM_OPEN: on_open(pl, plen); break;
        case EV_STREAM_DATA: on_data(pl, plen); break;
        case EV_STREAM_CLOSE: on_close(pl, plen); break;
        case EV_UPSTREAM_CONNECT_RESULT: on_result(pl, plen); break;
        case EV_UPSTREAM_CLOSE: on_upstream_close(pl, plen); break;
        case EV_BACKEND_AVAILABLE: backend_ready = 1; connect_held(); break;
        case EV_BACKEND_UNAVAILABLE: backend_ready = 0; break;
        case EV_TICK: on_tick(pl, plen); break;
        default: break;
        }
    }
    tell_need();
    return out_end();
}
