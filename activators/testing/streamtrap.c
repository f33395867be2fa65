/* streamtrap.c - a stream activator that relays bytes itself, then traps.
 *
 * Every connection is connected upstream once a backend is ready; client bytes are
 * sent upstream and backend bytes to the client as they come, never spliced. A client
 * chunk containing "TRAP" executes `unreachable`. The streams it relayed were
 * transparent, so the host must go on as a byte proxy without losing the chunk of the
 * failed call (activators/ABI.md, "Streams").
 *
 * A relay owns the bytes the host gave it: client bytes it cannot send upstream yet (no
 * connection, or no room left in this call's answer) are held, in order, in a block of
 * HOLD bytes, and the client is paused while anything is held, so the host reads no more
 * of it; the hold goes upstream first at the next call that can send (the connect
 * result, a tick: they come every 100 ms while a stream lives), then the client is
 * resumed. After a pause the host delivers at most one more read (64 KiB), so a block
 * of two reads never overflows; if it did (or no block is free) the stream is closed
 * with a warning, never silently shortened. Backend bytes need no hold: the host hands
 * a call at most 64 KiB of stream bytes, far within the answer, and stops reading the
 * backend itself while the client's queue is full.
 */
#include "../common/fab.h"

#define MAXS 64
#define HOLD (128 * 1024) /* two host reads: the one that found no way on, one past the pause */
#define BLOCKS 16
#define SPARE 64 /* answer bytes kept for the control actions after a send */

FAB_EXPORT(fab_streams) i32 fab_streams(void) { return 1; }

struct s {
    u32 id;
    u8 used, up, paused, fin;
    u8 fin_ticks; /* ticks since the client ended with bytes still held */
    u8 *buf;     /* a hold block, or 0 */
    u32 at, n;   /* held bytes: buf[at .. at + n) */
};
static struct s ss[MAXS];
static u8 blocks[BLOCKS][HOLD];
static u8 block_used[BLOCKS];
static u32 ready;
static u32 warned;

FAB_EXPORT(fab_init) i32 fab_init(const u8 *cfg, u32 len) { (void)cfg; (void)len; return 0; }

static struct s *find(u32 id) {
    for (u32 i = 0; i < MAXS; i++) if (ss[i].used && ss[i].id == id) return &ss[i];
    return 0;
}

static int sid_act(u32 kind, u32 id) {
    u8 *p = out_action(kind, 4);
    if (!p) return 0;
    wr32(p, id);
    return 1;
}

/* Payload bytes one more send may carry in this answer (0: none). */
static u32 room(void) {
    u32 left = FAB_OUT_CAP - fab_out_len;
    return left > REC_HDR + 4 + SPARE ? left - REC_HDR - 4 - SPARE : 0;
}

/* Send up to n bytes; returns how many went into the answer. */
static u32 send(u32 kind, u32 id, const u8 *d, u32 n) {
    u32 k = room();
    if (k > n) k = n;
    if (!k) return 0;
    u8 *p = out_action(kind, 4 + k);
    if (!p) return 0;
    wr32(p, id);
    memcpy(p + 4, d, k);
    return k;
}

static void release(struct s *s) {
    if (s->buf) block_used[(u32)(s->buf - blocks[0]) / HOLD] = 0;
    s->buf = 0;
    s->at = s->n = 0;
}

static void forget(struct s *s) {
    release(s);
    s->used = 0;
}

static void close_stream(struct s *s) {
    sid_act(ACT_DOWNSTREAM_CLOSE, s->id);
    forget(s);
}

static void connect(struct s *s) {
    u8 *p = out_action(ACT_UPSTREAM_CONNECT, 6);
    if (!p) return;
    wr32(p, s->id);
    wr16(p + 4, 0);
    s->up = 1;
}

static int has_trap(const u8 *d, u32 n) {
    for (u32 i = 0; i + 4 <= n; i++)
        if (d[i] == 'T' && d[i + 1] == 'R' && d[i + 2] == 'A' && d[i + 3] == 'P') return 1;
    return 0;
}

/* Keep n client bytes after what is held; 0 when they do not fit (the stream is closed). */
static int hold(struct s *s, const u8 *d, u32 n) {
    if (!s->buf) {
        for (u32 b = 0; b < BLOCKS && !s->buf; b++)
            if (!block_used[b]) { block_used[b] = 1; s->buf = blocks[b]; }
    }
    if (!s->buf || n > HOLD - s->n) {
        if (!warned++) act_log(LOG_WARNING, "streamtrap: more client bytes than it can hold; closing");
        close_stream(s);
        return 0;
    }
    if (n > HOLD - s->at - s->n) { /* move what is held to the block's start */
        for (u32 i = 0; i < s->n; i++) s->buf[i] = s->buf[s->at + i];
        s->at = 0;
    }
    memcpy(s->buf + s->at + s->n, d, n);
    s->n += n;
    return 1;
}

/* Send what is held as far as the answer has room; then the client may go on, or end. */
static void flush(struct s *s) {
    if (s->up == 2 && s->n) {
        u32 k = send(ACT_UPSTREAM_SEND, s->id, s->buf + s->at, s->n);
        s->at += k;
        s->n -= k;
        if (!s->n) release(s);
    }
    if (s->n) {
        if (!s->paused && sid_act(ACT_PAUSE, s->id)) s->paused = 1;
        return;
    }
    if (s->fin) { close_stream(s); return; } /* the client ended: all it sent went up */
    if (s->paused && sid_act(ACT_RESUME, s->id)) s->paused = 0;
}

static void client_bytes(struct s *s, const u8 *d, u32 n) {
    if (s->up == 2) flush(s);
    u32 k = s->up == 2 && !s->n ? send(ACT_UPSTREAM_SEND, s->id, d, n) : 0;
    if (k < n && !hold(s, d + k, n - k)) return;
    flush(s); /* pauses while anything is held */
}

FAB_EXPORT(fab_process) i64 fab_process(const u8 *ev, u32 len) {
    out_begin();
    u32 count = len >= 2 ? rd16(ev) : 0;
    u32 off = 2;
    for (u32 i = 0; i < count && len - off >= REC_HDR; i++) {
        u32 kind = ev[off], plen = rd32(ev + off + 4);
        const u8 *p = ev + off + REC_HDR;
        off += REC_HDR + plen;
        if (off > len) break;
        struct s *s = plen >= 4 ? find(rd32(p)) : 0;
        switch (kind) {
        case EV_STREAM_OPEN:
            for (u32 k = 0; k < MAXS; k++)
                if (!ss[k].used) { s = &ss[k]; break; }
            if (!s) { sid_act(ACT_DOWNSTREAM_CLOSE, rd32(p)); break; }
            s->used = 1; s->id = rd32(p); s->up = 0; s->paused = 0; s->fin = s->fin_ticks = 0;
            s->buf = 0; s->at = s->n = 0;
            act_need(NEED_ACTIVE);
            if (ready) connect(s);
            break;
        case EV_STREAM_DATA:
            if (!s) break;
            if (has_trap(p + 4, plen - 4)) __builtin_trap();
            client_bytes(s, p + 4, plen - 4);
            break;
        case EV_UPSTREAM_CONNECT_RESULT:
            if (!s) break;
            s->up = plen >= 5 && p[4] ? 2 : 0; /* a failed one is tried again at a tick */
            flush(s);
            break;
        case EV_UPSTREAM_DATA:
            if (s && send(ACT_DOWNSTREAM_SEND, s->id, p + 4, plen - 4) < plen - 4) {
                if (!warned++) act_log(LOG_WARNING, "streamtrap: answer full; closing");
                close_stream(s);
            }
            break;
        case EV_STREAM_CLOSE:
            if (!s) break;
            s->fin = 1;
            flush(s); /* closes now, or once what is held went upstream */
            break;
        case EV_UPSTREAM_CLOSE:
            if (s) close_stream(s);
            break;
        case EV_BACKEND_AVAILABLE:
            ready = 1;
            for (u32 k = 0; k < MAXS; k++) if (ss[k].used && !ss[k].up) connect(&ss[k]);
            break;
        case EV_BACKEND_UNAVAILABLE: ready = 0; break;
        case EV_TICK:
            for (u32 k = 0; k < MAXS; k++) {
                struct s *t = &ss[k];
                if (!t->used) continue;
                /* an ended client's held bytes wait 5 s for a connection (a reset one's
                 * never get it: the host let the stream go) */
                if (t->fin && ++t->fin_ticks > 50) { close_stream(t); continue; }
                if (ready && !t->up) connect(t);
                flush(t);
            }
            break;
        default: break;
        }
    }
    return out_end();
}
