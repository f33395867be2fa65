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
 */
#include "../common/fab.h"

#define MAX_STREAMS 4096
#define HELD_SLOTS 64
#define HELD_CAP (64 * 1024) /* one host read */

FAB_EXPORT(fab_streams) i32 fab_streams(void) { return 1; }

enum { FREE = 0, HOLDING, CONNECTING, SPLICED };
#define NO_SLOT 0xffff

struct stream {
    u32 id;
    u8 state;
    u8 paused;
    u8 client_done;
    u8 woke; /* counts toward need (wake_on_data: it sent bytes) */
    u16 slot; /* its held bytes, or NO_SLOT */
    u32 held_len;
    u64 opened_ms;
};

static struct stream streams[MAX_STREAMS];
static u8 held[HELD_SLOTS][HELD_CAP];
static u8 slot_used[HELD_SLOTS];
static u32 nstreams, nwoke;
static u32 backend_ready;
static u32 wake_on_data;
static u32 hold_timeout_ms = 30000;
static u64 now_ms;
static u32 need_told = 0xff;
static u32 full_logged;

FAB_EXPORT(fab_init) i32 fab_init(const u8 *cfg, u32 len) {
    wake_on_data = cfg_u32(cfg, len, "wake_on_data", 0);
    hold_timeout_ms = cfg_u32(cfg, len, "hold_timeout_ms", 30000);
    return 0;
}

/* Streams by id: open addressing over the slots (ids are the host's, unique while live). */
static u32 home(u32 id) { return (id * 2654435761u) & (MAX_STREAMS - 1); }

static struct stream *find(u32 id) {
    u32 h = home(id);
    for (u32 k = 0; k < MAX_STREAMS; k++) {
        struct stream *s = &streams[(h + k) & (MAX_STREAMS - 1)];
        if (s->state != FREE && s->id == id) return s;
        if (s->state == FREE && s->id == 0) return 0; /* never used: the chain ends */
    }
    return 0;
}

static struct stream *slot_for(u32 id) {
    u32 h = home(id);
    for (u32 k = 0; k < MAX_STREAMS; k++) {
        struct stream *s = &streams[(h + k) & (MAX_STREAMS - 1)];
        if (s->state == FREE) return s;
    }
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

static void act_send(u32 id, const u8 *data, u32 n) {
    u8 *p = out_action(ACT_UPSTREAM_SEND, 4 + n);
    if (!p) return;
    wr32(p, id);
    memcpy(p + 4, data, n);
}

static void release_slot(struct stream *s) {
    if (s->slot != NO_SLOT) slot_used[s->slot] = 0;
    s->slot = NO_SLOT;
    s->held_len = 0;
}

static void forget(struct stream *s) {
    release_slot(s);
    if (s->woke) nwoke--;
    s->state = FREE; /* the id stays: a tombstone keeps later chains findable */
    nstreams--;
}

static void close_stream(struct stream *s) {
    act_sid(ACT_DOWNSTREAM_CLOSE, s->id);
    forget(s);
}

static void connect(struct stream *s) {
    s->state = CONNECTING;
    act_connect(s->id);
}

static void on_open(const u8 *p, u32 len) {
    if (len < 6) return;
    u32 id = rd32(p);
    struct stream *s = slot_for(id);
    if (!s) { act_sid(ACT_DOWNSTREAM_CLOSE, id); return; }
    s->id = id;
    s->state = HOLDING;
    s->client_done = 0;
    s->slot = NO_SLOT;
    s->held_len = 0;
    s->opened_ms = now_ms;
    s->woke = !wake_on_data;
    s->paused = !wake_on_data;
    nstreams++;
    if (s->woke) nwoke++;
    if (s->paused) act_sid(ACT_PAUSE, id); /* its bytes wait in the kernel */
    if (backend_ready && s->woke) connect(s);
}

static void on_data(const u8 *p, u32 len) {
    if (len < 4) return;
    struct stream *s = find(rd32(p));
    if (!s || s->state == SPLICED) return;
    const u8 *d = p + 4;
    u32 n = len - 4;
    if (s->slot == NO_SLOT) {
        for (u32 i = 0; i < HELD_SLOTS; i++)
            if (!slot_used[i]) { slot_used[i] = 1; s->slot = (u16)i; break; }
        if (s->slot == NO_SLOT) {
            if (!full_logged++) act_log(LOG_WARNING, "stream activator: all hold buffers "
                                        "in use; closing a connection that sent bytes");
            close_stream(s);
            return;
        }
    }
    if (n > HELD_CAP - s->held_len) { /* a read past the pause: not expected of the host */
        act_log(LOG_WARNING, "stream activator: more bytes than one read; closing");
        close_stream(s);
        return;
    }
    memcpy(held[s->slot] + s->held_len, d, n);
    s->held_len += n;
    if (!s->paused) { s->paused = 1; act_sid(ACT_PAUSE, s->id); }
    if (!s->woke) { s->woke = 1; nwoke++; }
    if (backend_ready && s->state == HOLDING) connect(s);
}

static void on_close(const u8 *p, u32 len) {
    if (len < 4) return;
    struct stream *s = find(rd32(p));
    if (!s) return;
    if (s->state == SPLICED) { forget(s); return; } /* the pair ended */
    if (s->state == HOLDING && !s->held_len && wake_on_data) { close_stream(s); return; }
    /* Paused, a half-close is not seen before the splice; a reset is: what it sent is
     * moot then, but closing is the host's. Otherwise the splice carries the end on. */
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
    if (s->held_len) act_send(s->id, held[s->slot], s->held_len);
    release_slot(s);
    if (s->paused) { act_sid(ACT_RESUME, s->id); s->paused = 0; }
    act_sid(ACT_SPLICE, s->id);
    s->state = SPLICED;
}

static void connect_held(void) {
    for (u32 i = 0; i < MAX_STREAMS; i++) {
        struct stream *s = &streams[i];
        if (s->state == HOLDING && s->woke) connect(s);
    }
}

static void on_upstream_close(const u8 *p, u32 len) {
    if (len < 4) return;
    struct stream *s = find(rd32(p));
    if (!s || s->state == SPLICED) return;
    close_stream(s);
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
            close_stream(s);
        }
    }
    if (backend_ready) connect_held();
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
    u32 need = nwoke ? NEED_ACTIVE : NEED_NONE;
    if (need != need_told) {
        need_told = need;
        act_need(need);
    }
    return out_end();
}
