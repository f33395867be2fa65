/* streamtrap.c - a stream activator that relays bytes itself, then traps.
 *
 * Every connection is connected upstream once a backend is ready; client bytes are
 * sent upstream and backend bytes to the client as they come (held until connected,
 * up to 4 KiB), never spliced. A client chunk containing "TRAP" executes `unreachable`.
 * The streams it relayed were transparent, so the host must go on as a byte proxy
 * without losing the chunk of the failed call (activators/ABI.md, "Streams").
 */
#include "../common/fab.h"

#define MAXS 64
#define HOLD 4096

FAB_EXPORT(fab_streams) i32 fab_streams(void) { return 1; }

struct s { u32 id; u8 used, up; u32 n; u8 buf[HOLD]; };
static struct s ss[MAXS];
static u32 ready;

FAB_EXPORT(fab_init) i32 fab_init(const u8 *cfg, u32 len) { (void)cfg; (void)len; return 0; }

static struct s *find(u32 id) {
    for (u32 i = 0; i < MAXS; i++) if (ss[i].used && ss[i].id == id) return &ss[i];
    return 0;
}

static void sid_act(u32 kind, u32 id) { u8 *p = out_action(kind, 4); if (p) wr32(p, id); }

static void send(u32 kind, u32 id, const u8 *d, u32 n) {
    u8 *p = out_action(kind, 4 + n);
    if (!p) return;
    wr32(p, id);
    memcpy(p + 4, d, n);
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
            s->used = 1; s->id = rd32(p); s->up = 0; s->n = 0;
            act_need(NEED_ACTIVE);
            if (ready) connect(s);
            break;
        case EV_STREAM_DATA:
            if (!s) break;
            if (has_trap(p + 4, plen - 4)) __builtin_trap();
            if (s->up == 2) send(ACT_UPSTREAM_SEND, s->id, p + 4, plen - 4);
            else if (plen - 4 <= HOLD - s->n) { memcpy(s->buf + s->n, p + 4, plen - 4); s->n += plen - 4; }
            break;
        case EV_UPSTREAM_CONNECT_RESULT:
            if (!s) break;
            if (plen >= 5 && p[4]) {
                s->up = 2;
                if (s->n) send(ACT_UPSTREAM_SEND, s->id, s->buf, s->n);
                s->n = 0;
            } else s->up = 0;
            break;
        case EV_UPSTREAM_DATA:
            if (s) send(ACT_DOWNSTREAM_SEND, s->id, p + 4, plen - 4);
            break;
        case EV_STREAM_CLOSE:
        case EV_UPSTREAM_CLOSE:
            if (s) { sid_act(ACT_DOWNSTREAM_CLOSE, s->id); s->used = 0; }
            break;
        case EV_BACKEND_AVAILABLE:
            ready = 1;
            for (u32 k = 0; k < MAXS; k++) if (ss[k].used && !ss[k].up) connect(&ss[k]);
            break;
        case EV_BACKEND_UNAVAILABLE: ready = 0; break;
        default: break;
        }
    }
    return out_end();
}
