/* postgres_raw.c - the PostgreSQL stream activator as it was before the C SDK: the same
 * logic as postgres/postgres.c against the raw ABI (common/fab.h), kept to measure what
 * the SDK costs (tests/bench/sdk_postgres.py) and to check that both answer every event
 * batch alike (tests/unit/test_pg_sdk.py). Not shipped.
 *
 * (The original comment follows.) postgres.c - the PostgreSQL stream activator.
 *
 * Owns the client side of every PostgreSQL connection to the service port so that a
 * database can sleep under open, idle sessions:
 *   - SSLRequest / GSSENCRequest are answered 'N' (or, with "ssl": "passthrough", the
 *     request is forwarded to a woken backend and the pair spliced: TLS end to end);
 *     PG 17 direct TLS (first byte 0x16) is always passed through that way;
 *   - the StartupMessage is held while a backend wakes, then relayed untouched
 *     (protocol 3.0 and 3.2 alike; the authentication exchange is relayed too);
 *   - a CancelRequest is forwarded when a backend is up, the connection closed otherwise;
 *   - on an established session whose last ReadyForQuery said 'I' and with nothing in
 *     flight, keep-alive queries (SELECT 1, ';', the empty query; simple and extended
 *     protocol) are answered locally with the bytes a real PostgreSQL 15 sends;
 *   - need is "active" while any session has a query in flight, is inside a
 *     transaction, or waits for a backend, and "none" otherwise;
 *   - a real query while no backend is up is held (bounded; the client is paused at the
 *     bound) and relayed in order once one is; when the hold runs out the client gets
 *     ErrorResponse 57P03 (FATAL before the session is established, ERROR plus
 *     ReadyForQuery inside one).
 * Framing is checked in both directions; malformed client input gets ErrorResponse
 * 08P01 and a close, a backend stream that does not parse is spliced (a plain relay).
 *
 * Config (JSON, all optional): ssl ("passthrough" or anything else = answer 'N'),
 * hold_timeout_ms (30000), hold_bytes (all held bytes of the port, <= 6 MiB),
 * stream_hold_bytes (one stream's held bytes before it is paused, 65536),
 * max_message_bytes (largest client message, 1 GiB - 1 like PostgreSQL),
 * local_keepalive (1 answers keep-alives locally, 0 relays them; default 1),
 * need_debounce (1: "none" is reported at the next tick, not at once; default 1).
 */
#define FAB_OUT_CAP (1000u * 1024u)
#include "../common/fab.h"

/* Built with -mbulk-memory (activators/build.py): copies are one memory.copy, not
 * fab.h's byte loop; bulk memory is standard WebAssembly and on in the host's engine. */
#define memcpy(d, s, n) __builtin_memcpy((d), (s), (n))
#define memset(d, c, n) __builtin_memset((d), (c), (n))

#define MAX_STREAMS 4096
#define NSLOTS 8192 /* power of two, > MAX_STREAMS */
#define CHUNK 4096
#define MAX_CHUNKS 1536 /* 6 MiB of held bytes at most */
#define CAND_MAX 8192   /* a keep-alive candidate group is at most this many bytes */
#define CAND_MSGS 16    /* ... and this many messages */
#define MAX_STMTS 4     /* locally known prepared statements per session */
#define NAME_CAP 64     /* statement names up to 63 bytes are tracked */
#define STARTUP_MAX 10000
#define NIL 0xffffffffu
#define RETRY_MS 1000

#define CODE_CANCEL 80877102u
#define CODE_SSL 80877103u
#define CODE_GSSENC 80877104u

enum { PH_FREE, PH_INIT, PH_WAIT_STARTUP, PH_STARTUP, PH_SESSION, PH_PASSTHRU, PH_CANCEL,
       PH_SPLICED };
enum { R_FORWARD = 1, R_HOLD, R_CAND, R_DISCARD, R_LOCAL };
enum { K_NONE = 0, K_SELECT1 = 1, K_EMPTY = 2 };

struct buf {
    u32 head, tail; /* chunk indices, NIL when empty */
    u32 off;        /* read offset in head */
    u32 fill;       /* bytes used in tail */
    u32 len;
};

struct stmt {
    u8 kind, mat, nlen;
    u8 name[NAME_CAP];
};

struct stream {
    u32 id;
    u8 phase, status, connected, inflight, paused, busy, work, holding;
    u8 ssl_seen, gss_seen, unsynced, swallow, discard_sync, mat_pending, mat_unnamed;
    u8 mat_mask, hold_quiescent, t0_set, unnamed_kind, nstmt, cand_msgs, bbroken;
    u32 pending;
    u64 t0, connect_at;
    struct buf hold, cand;
    /* client parser */
    u8 hdr[5], hdr_have, route, type;
    u32 body_left;
    /* backend parser */
    u8 bhdr[5], bhave, btype, bdrop, bz;
    u32 bleft;
    struct stmt stmts[MAX_STMTS];
};

static struct stream streams[MAX_STREAMS];
static u32 slots[NSLOTS]; /* stream index + 1, 0 empty, NIL tombstone */
static u32 free_streams[MAX_STREAMS];
static u32 nfree_streams;

static u8 *chunk_mem[MAX_CHUNKS];
static u32 chunk_next[MAX_CHUNKS];
static u32 chunk_free = NIL;
static u32 nchunks_made, nchunks_used, max_chunks = MAX_CHUNKS;

static int ssl_passthrough;
static int local_keepalive = 1;
static u32 hold_timeout_ms = 30000;
static u32 stream_hold_bytes = 65536;
static u32 max_message_bytes = 0x3fffffffu;
static int backend_up;
static u64 now_ms;
static int ticked;
static u32 nbusy, nwork, nholding;
static u32 last_need = 0xff;
static int need_debounce = 1; /* report "none" at a tick, not after every query */
static int ticked_now;
static u32 budget; /* actions this call may still write (ABI: 4 per event + 16) */

/* Counters of the port (ABI "count" actions), summed over a call and sent at its end. */
enum { C_KEEPALIVES, C_WAKE_STARTUP, C_WAKE_QUERY, C_WAKE_TLS, C_HOLD_TIMEOUTS,
       C_PROTOCOL_ERRORS, C_CANCELS_FORWARDED, C_CANCELS_CLOSED, C_STATEMENTS_RECREATED, NCOUNT };
static const char *const count_names[NCOUNT] = {
    "keepalives_answered", "wake_startup", "wake_query", "wake_tls", "hold_timeouts",
    "protocol_errors", "cancels_forwarded", "cancels_closed", "statements_recreated"};
static u32 counts[NCOUNT];

static u8 scratch[CAND_MAX + 16];
static u8 resp[8192];
static u32 resp_len;

/* ---------------------------------------------------------------- small helpers */

static u32 be32(const u8 *p) {
    return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | (u32)p[3];
}
static void put32(u8 *p, u32 v) {
    p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v;
}
static u32 slen(const char *s) { u32 n = 0; while (s[n]) n++; return n; }
static u32 minu(u32 a, u32 b) { return a < b ? a : b; }

/* ---------------------------------------------------------------- chunked buffers */

static u32 chunk_get(void) {
    if (chunk_free != NIL) {
        u32 c = chunk_free;
        chunk_free = chunk_next[c];
        nchunks_used++;
        return c;
    }
    if (nchunks_made >= max_chunks) return NIL;
    u8 *m = (u8 *)fab_alloc(CHUNK);
    if (!m) return NIL;
    chunk_mem[nchunks_made] = m;
    nchunks_used++;
    return nchunks_made++;
}

static void chunk_put(u32 c) {
    chunk_next[c] = chunk_free;
    chunk_free = c;
    nchunks_used--;
}

static void buf_init(struct buf *b) { b->head = b->tail = NIL; b->off = b->fill = b->len = 0; }

static int buf_append(struct buf *b, const u8 *p, u32 n) {
    while (n) {
        if (b->tail == NIL || b->fill == CHUNK) {
            u32 c = chunk_get();
            if (c == NIL) return -1;
            chunk_next[c] = NIL;
            if (b->tail == NIL) { b->head = c; b->off = 0; } else chunk_next[b->tail] = c;
            b->tail = c;
            b->fill = 0;
        }
        u32 k = minu(n, CHUNK - b->fill);
        memcpy(chunk_mem[b->tail] + b->fill, p, k);
        b->fill += k;
        b->len += k;
        p += k;
        n -= k;
    }
    return 0;
}

static void buf_copy(const struct buf *b, u32 off, u8 *dst, u32 n) {
    u32 c = b->head, pos = b->off + off;
    while (pos >= CHUNK) { c = chunk_next[c]; pos -= CHUNK; }
    while (n) {
        u32 k = minu(n, CHUNK - pos);
        memcpy(dst, chunk_mem[c] + pos, k);
        dst += k;
        n -= k;
        pos = 0;
        c = chunk_next[c];
    }
}

static void buf_consume(struct buf *b, u32 n) {
    if (n >= b->len) {
        for (u32 c = b->head; c != NIL;) { u32 nx = chunk_next[c]; chunk_put(c); c = nx; }
        buf_init(b);
        return;
    }
    b->len -= n;
    b->off += n;
    while (b->off >= CHUNK) {
        u32 nx = chunk_next[b->head];
        chunk_put(b->head);
        b->head = nx;
        b->off -= CHUNK;
    }
}

/* ---------------------------------------------------------------- actions */

static u32 last_rec = NIL; /* offset of the last action record in fab_out */

static u8 *act(u32 kind, u32 plen) {
    if (!budget) { fab_out_full = 1; return 0; }
    u32 at = fab_out_len;
    u8 *p = out_action(kind, plen);
    if (!p) return 0;
    budget--;
    last_rec = at;
    return p;
}

static void act_sid(u32 kind, u32 sid) {
    u8 *p = act(kind, 4);
    if (p) wr32(p, sid);
}

/* Bytes to one side of a stream, appended to the previous action when that was the
 * same send to the same stream (one send per stream and side per answer, ABI.md). */
static void send_bytes(u32 kind, u32 sid, const u8 *d, u32 n) {
    if (!n) return;
    if (last_rec != NIL && fab_out[last_rec] == kind && rd32(fab_out + last_rec + REC_HDR) == sid
        && FAB_OUT_CAP - fab_out_len >= n) {
        memcpy(fab_out + fab_out_len, d, n);
        fab_out_len += n;
        wr32(fab_out + last_rec + 4, rd32(fab_out + last_rec + 4) + n);
        return;
    }
    u8 *p = act(kind, 4 + n);
    if (!p) return;
    wr32(p, sid);
    memcpy(p + 4, d, n);
}

static void send_up(struct stream *s, const u8 *d, u32 n) { send_bytes(ACT_UPSTREAM_SEND, s->id, d, n); }
static void send_down(struct stream *s, const u8 *d, u32 n) { send_bytes(ACT_DOWNSTREAM_SEND, s->id, d, n); }

static void logf2(u32 level, const char *a, const char *b) {
    u32 na = slen(a), nb = b ? slen(b) : 0;
    u8 *p = act(ACT_LOG, 1 + na + nb);
    if (!p) return;
    p[0] = (u8)level;
    memcpy(p + 1, a, na);
    if (nb) memcpy(p + 1 + na, b, nb);
}

/* ---------------------------------------------------------------- protocol messages */

static u32 msg_error(u8 *p, const char *sev, const char *code, const char *text) {
    u32 n = 5;
    p[0] = 'E';
    const char *f[4] = {sev, sev, code, text};
    const char t[4] = {'S', 'V', 'C', 'M'};
    for (int i = 0; i < 4; i++) {
        u32 l = slen(f[i]);
        p[n++] = (u8)t[i];
        memcpy(p + n, f[i], l);
        n += l;
        p[n++] = 0;
    }
    p[n++] = 0;
    put32(p + 1, n - 1);
    return n;
}

static u32 msg_rfq(u8 *p, u8 status) {
    p[0] = 'Z'; put32(p + 1, 5); p[5] = status;
    return 6;
}

static u32 msg_empty(u8 *p, u8 type) { p[0] = type; put32(p + 1, 4); return 5; }

/* RowDescription of `SELECT 1`: one column "?column?", table 0, attnum 0, int4 (oid 23,
 * len 4), typmod -1, the given format. */
static u32 msg_rowdesc(u8 *p, u32 fmt) {
    static const u8 body[] = {0, 1, '?', 'c', 'o', 'l', 'u', 'm', 'n', '?', 0,
                              0, 0, 0, 0, 0, 0, 0, 0, 0, 23, 0, 4, 0xff, 0xff, 0xff, 0xff};
    p[0] = 'T';
    put32(p + 1, 4 + sizeof body + 2);
    memcpy(p + 5, body, sizeof body);
    p[5 + sizeof body] = 0;
    p[6 + sizeof body] = (u8)fmt;
    return 7 + sizeof body;
}

static u32 msg_datarow(u8 *p, u32 fmt) {
    p[0] = 'D';
    p[5] = 0; p[6] = 1;
    if (fmt) { put32(p + 7, 4); put32(p + 11, 1); put32(p + 1, 14); return 15; }
    put32(p + 7, 1); p[11] = '1'; put32(p + 1, 11);
    return 12;
}

static u32 msg_select1_done(u8 *p) {
    static const char tag[] = "SELECT 1";
    p[0] = 'C';
    put32(p + 1, 4 + sizeof tag);
    memcpy(p + 5, tag, sizeof tag);
    return 5 + sizeof tag;
}

static u32 msg_paramdesc0(u8 *p) { p[0] = 't'; put32(p + 1, 6); p[5] = 0; p[6] = 0; return 7; }

static void resp_add(u32 n) { resp_len += n; }
static int resp_room(void) { return resp_len + 128 <= sizeof resp; }

/* ---------------------------------------------------------------- streams */

static u32 slot_of(u32 id) { return (id * 2654435761u) & (NSLOTS - 1); }

static struct stream *find(u32 id) {
    for (u32 i = slot_of(id), k = 0; k < NSLOTS; i = (i + 1) & (NSLOTS - 1), k++) {
        u32 v = slots[i];
        if (v == 0) return 0;
        if (v != NIL && streams[v - 1].id == id) return &streams[v - 1];
    }
    return 0;
}

static void update(struct stream *s);

static struct stream *stream_new(u32 id) {
    if (!nfree_streams) return 0;
    u32 idx = free_streams[--nfree_streams];
    struct stream *s = &streams[idx];
    memset(s, 0, sizeof *s);
    s->id = id;
    s->phase = PH_INIT;
    s->status = 'I';
    buf_init(&s->hold);
    buf_init(&s->cand);
    for (u32 i = slot_of(id);; i = (i + 1) & (NSLOTS - 1)) {
        if (slots[i] == 0 || slots[i] == NIL) { slots[i] = idx + 1; break; }
    }
    return s;
}

static void stream_free(struct stream *s) {
    u32 idx = (u32)(s - streams);
    for (u32 i = slot_of(s->id), k = 0; k < NSLOTS; i = (i + 1) & (NSLOTS - 1), k++) {
        if (slots[i] == idx + 1) { slots[i] = NIL; break; }
        if (slots[i] == 0) break;
    }
    buf_consume(&s->hold, s->hold.len);
    buf_consume(&s->cand, s->cand.len);
    s->phase = PH_FREE;
    update(s);
    free_streams[nfree_streams++] = idx;
}

static int quiescent(const struct stream *s) {
    return s->phase == PH_SESSION && !s->pending && !s->unsynced && s->status == 'I'
           && !s->swallow && !s->hold.len && !s->discard_sync;
}

/* Recompute the stream's flags and the port-wide counters they feed. */
static void update(struct stream *s) {
    u8 busy = 0, work = 0, holding = 0;
    switch (s->phase) {
    case PH_WAIT_STARTUP:
    case PH_PASSTHRU:
        busy = 1; work = 1; holding = 1;
        break;
    case PH_STARTUP:
        busy = 1;
        break;
    case PH_SESSION:
        busy = s->pending || s->unsynced || s->status != 'I' || s->swallow || s->hold.len;
        work = s->hold.len != 0;
        holding = work;
        break;
    default:
        break;
    }
    if (s->paused && s->phase != PH_FREE) work = 1; /* resumed once its buffers drain */
    nbusy += (u32)busy - (u32)s->busy;
    nwork += (u32)work - (u32)s->work;
    nholding += (u32)holding - (u32)s->holding;
    if (holding && !s->holding) s->t0_set = 0;
    s->busy = busy;
    s->work = work;
    s->holding = holding;
}

static void close_stream(struct stream *s) {
    if (s->connected) act_sid(ACT_UPSTREAM_CLOSE, s->id);
    act_sid(ACT_DOWNSTREAM_CLOSE, s->id);
    stream_free(s);
}

static void fatal(struct stream *s, const char *code, const char *text) {
    u8 m[256];
    if (code[0] == '0' && code[1] == '8') counts[C_PROTOCOL_ERRORS]++;
    send_down(s, m, msg_error(m, "FATAL", code, text));
    logf2(LOG_WARNING, "postgres activator: closing a client connection: ", text);
    close_stream(s);
}

static void try_connect(struct stream *s) {
    if (s->inflight || s->connected) return;
    u8 *p = act(ACT_UPSTREAM_CONNECT, 6);
    if (!p) return;
    wr32(p, s->id);
    wr16(p + 4, 0);
    s->inflight = 1;
    s->connect_at = now_ms;
}

static void pause_if_full(struct stream *s) {
    u32 n = s->hold.len + s->cand.len;
    if (!s->paused && (n >= stream_hold_bytes || nchunks_used * 4 >= max_chunks * 3)) {
        act_sid(ACT_PAUSE, s->id);
        s->paused = 1;
        update(s);
    }
}

static int hold_bytes_in(struct stream *s, const u8 *p, u32 n) {
    if (!s->hold.len && s->phase == PH_SESSION && !backend_up) counts[C_WAKE_QUERY]++;
    if (buf_append(&s->hold, p, n) < 0) {
        fatal(s, "53200", "out of memory holding the connection's bytes");
        return -1;
    }
    pause_if_full(s);
    return 0;
}

/* ---------------------------------------------------------------- keep-alive matching */

static int is_ws(u8 c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
static u8 lower(u8 c) { return c >= 'A' && c <= 'Z' ? (u8)(c + 32) : c; }

/* ws* ["select" ws+ "1" ws*] [";" ws*] end  ->  K_SELECT1, K_EMPTY or K_NONE */
static u32 classify(const u8 *q, u32 n) {
    u32 i = 0, kind = K_EMPTY;
    while (i < n && is_ws(q[i])) i++;
    if (i + 6 <= n && lower(q[i]) == 's') {
        static const char kw[] = "select";
        for (u32 k = 0; k < 6; k++) if (lower(q[i + k]) != (u8)kw[k]) return K_NONE;
        i += 6;
        u32 w = i;
        while (i < n && is_ws(q[i])) i++;
        if (i == w || i >= n || q[i] != '1') return K_NONE;
        i++;
        while (i < n && is_ws(q[i])) i++;
        kind = K_SELECT1;
    }
    if (i < n && q[i] == ';') {
        i++;
        while (i < n && is_ws(q[i])) i++;
    }
    return i == n ? kind : K_NONE;
}

static int contains_ci(const u8 *q, u32 n, const char *w) {
    u32 l = slen(w);
    for (u32 i = 0; i + l <= n; i++) {
        u32 k = 0;
        while (k < l && lower(q[i + k]) == (u8)w[k]) k++;
        if (k == l) return 1;
    }
    return 0;
}

/* A NUL-terminated string at p (before end): its length, or -1. */
static i32 cstr(const u8 *p, const u8 *end) {
    for (const u8 *q = p; q < end; q++) if (!*q) return (i32)(q - p);
    return -1;
}

static int memeq(const u8 *a, const u8 *b, u32 n) {
    for (u32 i = 0; i < n; i++) if (a[i] != b[i]) return 0;
    return 1;
}

static int name_eq(const struct stmt *t, const u8 *name, u32 n) {
    if (t->nlen != n) return 0;
    for (u32 i = 0; i < n; i++) if (t->name[i] != name[i]) return 0;
    return 1;
}

/* ---------------------------------------------------------------- candidate groups */

struct portal { const u8 *name; u32 nlen; u8 kind, fmt, done; };

static struct stmt gstmts[MAX_STMTS];
static u32 gnstmt;
static u8 gunnamed;

static i32 gfind(const u8 *name, u32 n) {
    for (u32 i = 0; i < gnstmt; i++) if (name_eq(&gstmts[i], name, n)) return (i32)i;
    return -1;
}

/* Evaluate the buffered group (one simple Query, or extended messages up to a Sync).
 * Returns 1 when every message can be answered locally; with final, also writes the
 * answers to resp and commits the session's statement table. */
static int group_eval(struct stream *s, int final) {
    u32 n = s->cand.len;
    if (n > CAND_MAX) return 0;
    buf_copy(&s->cand, 0, scratch, n);
    memcpy(gstmts, s->stmts, sizeof gstmts);
    gnstmt = s->nstmt;
    gunnamed = s->unnamed_kind;
    struct portal portals[CAND_MSGS];
    u32 nportals = 0;
    resp_len = 0;
    for (u32 off = 0; off + 5 <= n;) {
        u8 t = scratch[off];
        u32 len = be32(scratch + off + 1);
        const u8 *b = scratch + off + 5, *end = scratch + off + 1 + len;
        off += 1 + len;
        if (!resp_room()) return 0;
        u8 *r = resp + resp_len;
        if (t == 'Q') {
            if (end == b || end[-1] != 0) return 0;
            u32 k = classify(b, (u32)(end - b) - 1);
            if (k == K_NONE) return 0;
            if (k == K_SELECT1) {
                resp_add(msg_rowdesc(r, 0));
                resp_add(msg_datarow(resp + resp_len, 0));
                resp_add(msg_select1_done(resp + resp_len));
            } else {
                resp_add(msg_empty(r, 'I'));
            }
            resp_add(msg_rfq(resp + resp_len, 'I'));
        } else if (t == 'P') {
            i32 nl = cstr(b, end);
            if (nl < 0 || nl >= NAME_CAP) return 0;
            const u8 *q = b + nl + 1;
            i32 ql = cstr(q, end);
            if (ql < 0) return 0;
            const u8 *tp = q + ql + 1;
            if (end - tp != 2 || tp[0] || tp[1]) return 0; /* parameter types declared */
            u32 k = classify(q, (u32)ql);
            if (k == K_NONE) return 0;
            if (nl == 0) {
                gunnamed = (u8)k;
            } else {
                if (gfind(b, (u32)nl) >= 0 || gnstmt >= MAX_STMTS) return 0;
                struct stmt *e = &gstmts[gnstmt++];
                e->kind = (u8)k; e->mat = 0; e->nlen = (u8)nl;
                memcpy(e->name, b, (u32)nl);
            }
            resp_add(msg_empty(r, '1'));
        } else if (t == 'B') {
            i32 pl = cstr(b, end);
            if (pl < 0) return 0;
            const u8 *sn = b + pl + 1;
            i32 sl = cstr(sn, end);
            if (sl < 0) return 0;
            const u8 *x = sn + sl + 1;
            if (end - x < 2) return 0;
            u32 nf = be16(x);
            x += 2;
            if (nf > 1 || end - x < (i32)(2 * nf + 2)) return 0;
            if (nf && be16(x) > 1) return 0;
            x += 2 * nf;
            if (be16(x)) return 0; /* parameters */
            x += 2;
            if (end - x < 2) return 0;
            u32 nr = be16(x);
            x += 2;
            if (nr > 1 || end - x != (i32)(2 * nr)) return 0;
            u32 fmt = nr ? be16(x) : 0;
            if (fmt > 1) return 0;
            u32 kind;
            if (sl == 0) kind = gunnamed;
            else { i32 gi = gfind(sn, (u32)sl); kind = gi < 0 ? K_NONE : gstmts[gi].kind; }
            if (kind == K_NONE) return 0;
            u32 pi = nportals;
            for (u32 i = 0; i < nportals; i++)
                if (portals[i].nlen == (u32)pl && memeq(portals[i].name, b, (u32)pl)) pi = i;
            if (pi < nportals && pl) return 0; /* named portal exists */
            if (pi == nportals) {
                if (nportals >= CAND_MSGS) return 0;
                nportals++;
            }
            portals[pi].name = b; portals[pi].nlen = (u32)pl;
            portals[pi].kind = (u8)kind; portals[pi].fmt = (u8)fmt; portals[pi].done = 0;
            resp_add(msg_empty(r, '2'));
        } else if (t == 'D' || t == 'E' || t == 'C') {
            const u8 *nm = b;
            u8 what = 'P';
            if (t != 'E') { if (end - b < 1) return 0; what = b[0]; nm = b + 1; }
            i32 l = cstr(nm, end);
            if (l < 0) return 0;
            if (t == 'E' ? end - (nm + l + 1) != 4 : end - (nm + l + 1) != 0) return 0;
            if (what == 'S') {
                i32 gi = l ? gfind(nm, (u32)l) : -1;
                u32 kind = l ? (gi < 0 ? K_NONE : gstmts[gi].kind) : gunnamed;
                if (kind == K_NONE) return 0;
                if (t == 'D') {
                    resp_add(msg_paramdesc0(r));
                    r = resp + resp_len;
                    resp_add(kind == K_SELECT1 ? msg_rowdesc(r, 0) : msg_empty(r, 'n'));
                } else { /* Close of a statement only this session has seen */
                    if (!l) gunnamed = K_NONE;
                    else {
                        if (gstmts[gi].mat) return 0; /* the backend has it too */
                        gstmts[gi] = gstmts[--gnstmt];
                    }
                    resp_add(msg_empty(r, '3'));
                }
            } else if (what == 'P') {
                u32 pi = nportals;
                for (u32 i = 0; i < nportals; i++)
                    if (portals[i].nlen == (u32)l && memeq(portals[i].name, nm, (u32)l)) pi = i;
                if (pi == nportals) return 0;
                struct portal *pt = &portals[pi];
                if (t == 'D') {
                    resp_add(pt->kind == K_SELECT1 ? msg_rowdesc(r, pt->fmt) : msg_empty(r, 'n'));
                } else if (t == 'E') {
                    i32 maxrows = (i32)be32(nm + l + 1);
                    if (pt->done || (pt->kind == K_SELECT1 && maxrows == 1)) return 0;
                    pt->done = 1;
                    if (pt->kind == K_SELECT1) {
                        resp_add(msg_datarow(r, pt->fmt));
                        resp_add(msg_select1_done(resp + resp_len));
                    } else {
                        resp_add(msg_empty(r, 'I'));
                    }
                } else {
                    portals[pi] = portals[--nportals];
                    resp_add(msg_empty(r, '3'));
                }
            } else {
                return 0;
            }
        } else if (t == 'S') {
            if (end != b) return 0;
            resp_add(msg_rfq(r, 'I'));
            nportals = 0;
        } else {
            return 0;
        }
    }
    if (final) {
        memcpy(s->stmts, gstmts, sizeof gstmts);
        s->nstmt = (u8)gnstmt;
        s->unnamed_kind = gunnamed;
    }
    return 1;
}

/* ---------------------------------------------------------------- relaying client bytes */

static const char *kind_sql(u32 k) { return k == K_SELECT1 ? "SELECT 1" : ""; }

static u32 msg_parse(u8 *p, const u8 *name, u32 nlen, u32 kind) {
    const char *q = kind_sql(kind);
    u32 ql = slen(q), n = 5;
    p[0] = 'P';
    memcpy(p + n, name, nlen); n += nlen; p[n++] = 0;
    memcpy(p + n, q, ql); n += ql; p[n++] = 0;
    p[n++] = 0; p[n++] = 0;
    put32(p + 1, n - 1);
    return n;
}

/* The backend must learn the statements this session answered for itself before it
 * sees anything that may use them: Parse each, then Sync; the answers are swallowed. */
static void emit_prefix(struct stream *s, u32 mask, u32 unnamed) {
    u8 m[NAME_CAP + 32];
    for (u32 i = 0; i < s->nstmt; i++)
        if (mask & (1u << i)) send_up(s, m, msg_parse(m, s->stmts[i].name, s->stmts[i].nlen, s->stmts[i].kind));
    if (unnamed) send_up(s, m, msg_parse(m, (const u8 *)"", 0, unnamed));
    send_up(s, m, msg_empty(m, 'S'));
    s->swallow++;
    counts[C_STATEMENTS_RECREATED]++;
}

static int backend_ready(const struct stream *s) { return backend_up && s->connected; }

/* About to relay client messages toward the backend from a quiescent session.
 * replaces_unnamed: the first of them (a Query, or a Parse of the unnamed statement)
 * discards the unnamed statement anyway, so it need not be recreated. */
static void begin_backend(struct stream *s, u32 route, int replaces_unnamed) {
    u32 mask = 0;
    for (u32 i = 0; i < s->nstmt; i++) if (!s->stmts[i].mat) mask |= 1u << i;
    if (s->holding == 0 && !s->hold.len) s->hold_quiescent = (u8)quiescent(s);
    u32 unnamed = replaces_unnamed ? K_NONE : s->unnamed_kind;
    s->unnamed_kind = K_NONE;
    if (!mask && !unnamed) return;
    if (route == R_FORWARD) {
        emit_prefix(s, mask, unnamed);
    } else {
        s->mat_pending = 1;
        s->mat_mask = (u8)mask;
        s->mat_unnamed = (u8)unnamed;
    }
    for (u32 i = 0; i < s->nstmt; i++) s->stmts[i].mat = 1;
}

static void drop_stmt(struct stream *s, const u8 *name, u32 n) {
    for (u32 i = 0; i < s->nstmt; i++)
        if (name_eq(&s->stmts[i], name, n)) { s->stmts[i] = s->stmts[--s->nstmt]; return; }
}

/* Account a client message relayed (or held for relaying) to the backend. */
static void count_msg(struct stream *s, u8 t) {
    if (t == 'Q' || t == 'S' || t == 'F') s->pending++;
    if (t == 'S') s->unsynced = 0;
    else if (t == 'P' || t == 'B' || t == 'D' || t == 'E' || t == 'C' || t == 'H') s->unsynced = 1;
}

static int route_bytes(struct stream *s, u32 route, const u8 *p, u32 n) {
    if (route == R_FORWARD && s->phase == PH_STARTUP && s->connected) {
        send_up(s, p, n);
    } else if (route == R_FORWARD) {
        if (s->hold.len || !backend_ready(s)) {
            /* A message already partly relayed: a timeout cannot answer it cleanly. */
            if (!s->hold.len && p != s->hdr) s->hold_quiescent = 0;
            return hold_bytes_in(s, p, n);
        }
        send_up(s, p, n);
    } else if (route == R_HOLD) {
        return hold_bytes_in(s, p, n);
    } else if (route == R_CAND) {
        if (buf_append(&s->cand, p, n) < 0) {
            fatal(s, "53200", "out of memory holding the connection's bytes");
            return -1;
        }
    }
    return 0;
}

/* A relayed Query or Parse (body b, n bytes) may replace or drop tracked statements. */
static void forget_stmts(struct stream *s, u8 t, const u8 *b, u32 n) {
    const u8 *end = b + n;
    if (t == 'P') {
        i32 l = cstr(b, end);
        if (l < 0) { s->nstmt = 0; return; }
        drop_stmt(s, b, (u32)l);
    } else if (t == 'C') {
        i32 l = n ? cstr(b + 1, end) : -1;
        if (l < 0) { s->nstmt = 0; return; }
        if (b[0] == 'S') drop_stmt(s, b + 1, (u32)l);
        return;
    }
    if (contains_ci(b, n, "deallocate") || contains_ci(b, n, "discard")) s->nstmt = 0;
}

/* The buffered group will not be answered locally: relay it, in order. */
static int spill(struct stream *s) {
    u32 n = s->cand.len;
    if (!n) return 0;
    u32 route = backend_ready(s) && !s->hold.len ? R_FORWARD : R_HOLD;
    buf_copy(&s->cand, 0, scratch, n);
    begin_backend(s, route, scratch[0] == 'Q' || (scratch[0] == 'P' && n > 5 && !scratch[5]));
    buf_consume(&s->cand, n);
    s->cand_msgs = 0;
    for (u32 off = 0; off + 5 <= n;) {
        u8 t = scratch[off];
        u32 len = be32(scratch + off + 1);
        const u8 *b = scratch + off + 5, *end = scratch + off + 1 + len;
        if (off + 1 + len > n) break;
        off += 1 + len;
        count_msg(s, t);
        if (s->nstmt && (t == 'P' || t == 'C' || t == 'Q')) forget_stmts(s, t, b, (u32)(end - b));
    }
    return route_bytes(s, route, scratch, n);
}

static void answer_locally(struct stream *s) {
    send_down(s, resp, resp_len);
    counts[C_KEEPALIVES]++;
    buf_consume(&s->cand, s->cand.len);
    s->cand_msgs = 0;
}

static int frontend_type(u8 t) {
    static const char ok[] = "BCdcfDEHFPpQSX";
    for (u32 i = 0; ok[i]; i++) if ((u8)ok[i] == t) return 1;
    return 0;
}

/* Fast path for the first message of a would-be group when its whole body is in this
 * read (the common case): a Query or Parse that is no keep-alive is relayed without
 * being buffered, a keep-alive Query is answered at once. 0: no decision. */
static int peek_decide(struct stream *s, const u8 *b, u32 n) {
    u8 t = s->type;
    u32 len = s->body_left;
    if (s->cand.len || n < len || !len || b[len - 1]) return 0;
    if (t == 'Q') {
        u32 k = classify(b, len - 1);
        if (k == K_NONE) return 1;
        resp_len = 0;
        if (k == K_SELECT1) {
            resp_add(msg_rowdesc(resp, 0));
            resp_add(msg_datarow(resp + resp_len, 0));
            resp_add(msg_select1_done(resp + resp_len));
        } else {
            resp_add(msg_empty(resp, 'I'));
        }
        resp_add(msg_rfq(resp + resp_len, 'I'));
        send_down(s, resp, resp_len);
        counts[C_KEEPALIVES]++;
        return 2;
    }
    if (t == 'P') {
        i32 nl = cstr(b, b + len);
        if (nl < 0) return 0;
        i32 ql = cstr(b + nl + 1, b + len);
        if (ql < 0) return 0;
        return classify(b + nl + 1, (u32)ql) == K_NONE ? 1 : 0;
    }
    return 0;
}

/* A client message header is complete: check it and choose where its bytes go; p/n
 * are the rest of this read. Returns 0 when the stream was closed. */
static int msg_begin(struct stream *s, const u8 *p, u32 n) {
    u8 t = s->hdr[0];
    u32 len = be32(s->hdr + 1);
    if (!frontend_type(t)) { fatal(s, "08P01", "invalid frontend message type"); return 0; }
    if (len < 4 || len > max_message_bytes) { fatal(s, "08P01", "invalid message length"); return 0; }
    s->type = t;
    s->body_left = len - 4;
    if (s->phase == PH_STARTUP) {
        s->route = R_FORWARD;
    } else if (s->discard_sync) {
        s->route = R_DISCARD;
    } else {
        int cand = local_keepalive && quiescent(s) && s->cand_msgs < CAND_MSGS
                   && s->cand.len + 1 + len <= CAND_MAX
                   && (t == 'P' || t == 'B' || t == 'D' || t == 'E' || t == 'C' || t == 'S'
                       || t == 'H' || (t == 'Q' && !s->cand.len));
        int peek = cand && (t == 'Q' || t == 'P') ? peek_decide(s, p, n) : 0;
        if (peek == 2) {
            s->route = R_LOCAL;
            return 1;
        }
        if (cand && !peek) {
            s->route = R_CAND;
            s->cand_msgs++;
        } else {
            if (s->cand.len && spill(s) < 0) return 0;
            if (t == 'X' && !s->hold.len && !backend_ready(s)) {
                close_stream(s); /* a Terminate need not wake anything */
                return 0;
            }
            s->route = backend_ready(s) && !s->hold.len ? R_FORWARD : R_HOLD;
            begin_backend(s, s->route, t == 'Q');
            count_msg(s, t);
            if (s->nstmt && (t == 'P' || t == 'C' || t == 'Q')) {
                if (peek) forget_stmts(s, t, p, s->body_left); /* the body is at hand */
                else s->nstmt = 0;
            }
        }
    }
    return route_bytes(s, s->route, s->hdr, 5) == 0;
}

static int msg_end(struct stream *s) {
    s->hdr_have = 0;
    if (s->route == R_LOCAL) return 1;
    if (s->route == R_DISCARD) {
        if (s->type == 'S' && s->discard_sync) {
            u8 m[8];
            s->discard_sync = 0;
            send_down(s, m, msg_rfq(m, s->status));
        }
        return 1;
    }
    if (s->route != R_CAND) return 1;
    u8 t = s->type;
    if (t == 'H' && s->cand.len == 5) { /* a lone Flush: nothing to flush */
        buf_consume(&s->cand, 5);
        s->cand_msgs = 0;
        return 1;
    }
    int final = t == 'Q' || t == 'S';
    int local = t != 'H' && group_eval(s, final);
    if (!local) return spill(s) == 0;
    if (final) answer_locally(s);
    return 1;
}

/* Client bytes of an established (or establishing) session. Returns 0 if closed. */
static int client_feed(struct stream *s, const u8 *p, u32 n) {
    while (n) {
        if (s->hdr_have < 5) {
            u32 k = minu(n, 5u - s->hdr_have);
            memcpy(s->hdr + s->hdr_have, p, k);
            s->hdr_have += (u8)k;
            p += k;
            n -= k;
            if (s->hdr_have < 5) return 1;
            if (!msg_begin(s, p, n)) return 0;
            if (!s->body_left && !msg_end(s)) return 0;
            continue;
        }
        u32 k = minu(n, s->body_left);
        if (route_bytes(s, s->route, p, k) < 0) return 0;
        p += k;
        n -= k;
        s->body_left -= k;
        if (!s->body_left && !msg_end(s)) return 0;
    }
    return 1;
}

/* ---------------------------------------------------------------- startup */

static void start_wait(struct stream *s, u32 phase) {
    if (!backend_up) counts[phase == PH_PASSTHRU ? C_WAKE_TLS : C_WAKE_STARTUP]++;
    s->phase = (u8)phase;
    update(s);
    try_connect(s);
}

/* Bytes before the session: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage or
 * a TLS ClientHello (direct TLS). They accumulate in hold until one is complete. */
static void init_feed(struct stream *s) {
    while (s->phase == PH_INIT && s->hold.len) {
        u8 h[8];
        buf_copy(&s->hold, 0, h, 1);
        if (h[0] == 0x16) { start_wait(s, PH_PASSTHRU); return; }
        if (s->hold.len < 8) return;
        buf_copy(&s->hold, 0, h, 8);
        u32 len = be32(h), code = be32(h + 4);
        if (code == CODE_SSL || code == CODE_GSSENC) {
            if (len != 8) { fatal(s, "08P01", "invalid length of startup packet"); return; }
            u8 *seen = code == CODE_SSL ? &s->ssl_seen : &s->gss_seen;
            if (*seen) { fatal(s, "08P01", "duplicate SSL or GSSENC negotiation request"); return; }
            *seen = 1;
            if (ssl_passthrough) { start_wait(s, PH_PASSTHRU); return; }
            buf_consume(&s->hold, 8);
            send_down(s, (const u8 *)"N", 1);
            continue;
        }
        if (code == CODE_CANCEL) {
            if (len < 16 || len > 12 + 256) { close_stream(s); return; }
            if (s->hold.len < len) return;
            s->phase = PH_CANCEL; /* the host answers at once when no backend is ready */
            try_connect(s);
            return;
        }
        if (len < 8 || len > STARTUP_MAX) { fatal(s, "08P01", "invalid length of startup packet"); return; }
        if ((code >> 16) != 3) { fatal(s, "0A000", "unsupported frontend protocol"); return; }
        if (s->hold.len < len) return;
        start_wait(s, PH_WAIT_STARTUP);
        return;
    }
}

/* Send up to max bytes of the stream's hold upstream (one coalesced action). */
static void send_hold(struct stream *s, u32 max) {
    u32 n = minu(s->hold.len, max);
    while (n) {
        u32 k = minu(n, CHUNK - s->hold.off);
        send_up(s, chunk_mem[s->hold.head] + s->hold.off, k);
        buf_consume(&s->hold, k);
        n -= k;
    }
}

/* Relay what the hold has for the backend; chunked by the space left in this answer. */
static void flush_hold(struct stream *s) {
    if (!s->hold.len || !backend_ready(s) || budget < 4) return;
    if (s->mat_pending) {
        s->mat_pending = 0;
        emit_prefix(s, s->mat_mask, s->mat_unnamed);
    }
    u32 room = FAB_OUT_CAP - fab_out_len;
    if (room > 128 * 1024) send_hold(s, minu(room - 128 * 1024, 256 * 1024));
    update(s);
}

static u8 refeed[CAND_MAX];

static void on_connected(struct stream *s) {
    u8 h[4];
    if (s->phase == PH_CANCEL) {
        buf_copy(&s->hold, 0, h, 4);
        send_hold(s, be32(h));
        counts[C_CANCELS_FORWARDED]++;
        close_stream(s);
        return;
    }
    if (s->phase == PH_PASSTHRU) {
        send_hold(s, s->hold.len);
        act_sid(ACT_SPLICE, s->id);
        s->phase = PH_SPLICED;
        if (s->paused) { act_sid(ACT_RESUME, s->id); s->paused = 0; }
        update(s);
        return;
    }
    if (s->phase != PH_WAIT_STARTUP) return;
    buf_copy(&s->hold, 0, h, 4);
    send_hold(s, be32(h));
    s->phase = PH_STARTUP;
    /* Whatever followed the startup packet is typed messages: parse it as such. */
    struct buf rest = s->hold;
    buf_init(&s->hold);
    int alive = 1;
    while (alive && rest.len) {
        u32 k = minu(rest.len, CAND_MAX);
        buf_copy(&rest, 0, refeed, k);
        buf_consume(&rest, k);
        alive = client_feed(s, refeed, k);
    }
    buf_consume(&rest, rest.len);
    if (alive) {
        if (s->paused) { act_sid(ACT_RESUME, s->id); s->paused = 0; }
        update(s);
    }
}

/* ---------------------------------------------------------------- backend bytes */

static void bmsg_end(struct stream *s) {
    s->bhave = 0;
    if (s->btype == 'Z') {
        if (s->bdrop) {
            if (s->swallow) s->swallow--;
        } else {
            if (s->pending) s->pending--;
            s->status = s->bz;
            if (s->phase == PH_STARTUP) s->phase = PH_SESSION;
        }
    }
    s->bdrop = 0;
}

static void backend_broken(struct stream *s, const u8 *p, u32 n) {
    logf2(LOG_WARNING, "postgres activator: backend stream does not parse; relaying it raw", 0);
    send_down(s, p, n);
    if (s->hold.len) flush_hold(s);
    act_sid(ACT_SPLICE, s->id);
    s->phase = PH_SPLICED;
    if (s->paused) { act_sid(ACT_RESUME, s->id); s->paused = 0; }
}

static void backend_feed(struct stream *s, const u8 *p, u32 n) {
    u32 i = 0, seg = 0;
    while (i < n) {
        if (s->bhave < 5) {
            u32 start = i, prev = s->bhave;
            u32 k = minu(5u - s->bhave, n - i);
            memcpy(s->bhdr + s->bhave, p + i, k);
            s->bhave += (u8)k;
            i += k;
            if (s->bhave < 5) { send_down(s, p + seg, start - seg); return; }
            u32 len = be32(s->bhdr + 1);
            s->btype = s->bhdr[0];
            if (len < 4 || len > 0x40000000u || (s->btype == 'Z' && len != 5)) {
                send_down(s, p + seg, start - seg);
                if (prev) send_down(s, s->bhdr, prev);
                backend_broken(s, p + start, n - start);
                return;
            }
            u8 t = s->btype;
            s->bdrop = s->swallow && t != 'N' && t != 'S' && t != 'A';
            if (s->bdrop) {
                send_down(s, p + seg, start - seg);
                seg = i;
            } else if (prev) {
                send_down(s, p + seg, start - seg);
                send_down(s, s->bhdr, prev);
                seg = start;
            }
            s->bleft = len - 4;
            s->bz = 'I';
            if (!s->bleft) bmsg_end(s);
            continue;
        }
        u32 k = minu(s->bleft, n - i);
        if (s->btype == 'Z' && s->bleft == 1) s->bz = p[i];
        if (s->bdrop) {
            send_down(s, p + seg, i - seg);
            seg = i + k;
        }
        i += k;
        s->bleft -= k;
        if (!s->bleft) bmsg_end(s);
    }
    send_down(s, p + seg, i - seg);
}

/* ---------------------------------------------------------------- hold timeouts */

/* The held messages of an established session will never reach a backend: answer each
 * the way PostgreSQL answers a failed one, and skip the rest of an unfinished group. */
static void session_timeout(struct stream *s) {
    u8 err[160], m[8];
    u32 elen = msg_error(err, "ERROR", "57P03", "the database system is not available (hold timeout)");
    u8 st = s->status == 'I' ? 'I' : 'E';
    if (s->mat_pending) {
        for (u32 i = 0; i < s->nstmt; i++) if (s->mat_mask & (1u << i)) s->stmts[i].mat = 0;
        s->unnamed_kind = s->mat_unnamed;
        s->mat_pending = 0;
    }
    u32 off = 0, in_group = 0, total = s->hold.len;
    while (off + 5 <= total) {
        u8 h[5];
        buf_copy(&s->hold, off, h, 5);
        u32 len = be32(h + 1);
        if (off + 1 + len > total) break; /* the message still arriving */
        off += 1 + len;
        if (h[0] == 'Q' || h[0] == 'F') {
            send_down(s, err, elen);
            send_down(s, m, msg_rfq(m, st));
        } else if (h[0] == 'S') {
            if (!in_group) send_down(s, err, elen);
            send_down(s, m, msg_rfq(m, st));
            in_group = 0;
        } else if (h[0] == 'X') {
            close_stream(s);
            return;
        } else if (!in_group) {
            send_down(s, err, elen);
            in_group = 1;
        }
    }
    int partial = s->hdr_have == 5 && s->body_left && s->route != R_CAND;
    if (partial) {
        u8 h[1];
        buf_copy(&s->hold, off, h, 1);
        if (h[0] == 'Q' || h[0] == 'F') {
            send_down(s, err, elen);
            send_down(s, m, msg_rfq(m, st));
        } else if (!in_group) {
            send_down(s, err, elen);
            in_group = 1;
        }
        s->route = R_DISCARD;
    }
    buf_consume(&s->hold, s->hold.len);
    s->pending = 0;
    s->unsynced = 0;
    s->discard_sync = (u8)in_group;
    if (s->paused) { act_sid(ACT_RESUME, s->id); s->paused = 0; }
    counts[C_HOLD_TIMEOUTS]++;
    logf2(LOG_INFO, "postgres activator: hold timed out; answered 57P03", 0);
    update(s);
}

static void check_timeouts(void) {
    for (u32 idx = 0; idx < MAX_STREAMS && nholding; idx++) {
        struct stream *s = &streams[idx];
        if (s->phase == PH_FREE || !s->holding) continue;
        if (!s->t0_set) { s->t0 = now_ms; s->t0_set = 1; continue; }
        if (now_ms - s->t0 < hold_timeout_ms) continue;
        if (budget < 6) return;
        if (s->phase == PH_WAIT_STARTUP || s->phase == PH_PASSTHRU) {
            u8 m[160];
            if (s->phase == PH_PASSTHRU && !s->ssl_seen && !s->gss_seen) {
                close_stream(s); /* direct TLS: no plaintext answer is possible */
            } else {
                send_down(s, m, msg_error(m, "FATAL", "57P03",
                                          "the database system is not available (hold timeout)"));
                logf2(LOG_INFO, "postgres activator: hold timed out before the session; answered 57P03", 0);
                counts[C_HOLD_TIMEOUTS]++;
                close_stream(s);
            }
        } else if (s->phase == PH_SESSION) {
            if (s->hold_quiescent) session_timeout(s);
            else { counts[C_HOLD_TIMEOUTS]++; fatal(s, "57P03", "the database system is not available (hold timeout)"); }
        }
    }
}

/* Connects, flushes and resumes that waited for a backend or for buffer space. */
static void do_work(void) {
    for (u32 idx = 0; idx < MAX_STREAMS && nwork && budget > 4; idx++) {
        struct stream *s = &streams[idx];
        if (s->phase == PH_FREE || !s->work) continue;
        if ((s->phase == PH_WAIT_STARTUP || s->phase == PH_PASSTHRU) && !s->connected
            && !s->inflight && (backend_up || (ticked && now_ms - s->connect_at >= RETRY_MS)))
            try_connect(s);
        if (s->phase == PH_SESSION && s->hold.len) flush_hold(s);
        if (s->paused && s->hold.len + s->cand.len < stream_hold_bytes / 2
            && nchunks_used * 2 < max_chunks && (s->phase == PH_SESSION || s->phase == PH_STARTUP
                                                 || s->phase == PH_INIT)) {
            act_sid(ACT_RESUME, s->id);
            s->paused = 0;
            update(s);
        }
    }
}

/* ---------------------------------------------------------------- events */

static void on_open(const u8 *p, u32 len) {
    if (len < 4) return;
    u32 id = rd32(p);
    struct stream *old = find(id);
    if (old) stream_free(old); /* the host reuses ids of streams it has ended */
    struct stream *s = stream_new(id);
    if (!s) {
        logf2(LOG_WARNING, "postgres activator: stream table full or id reused; closing", 0);
        act_sid(ACT_DOWNSTREAM_CLOSE, id);
        return;
    }
    update(s);
}

static void on_data(const u8 *p, u32 len) {
    if (len < 4) return;
    struct stream *s = find(rd32(p));
    if (!s) return;
    const u8 *d = p + 4;
    u32 n = len - 4;
    switch (s->phase) {
    case PH_INIT:
        if (hold_bytes_in(s, d, n) < 0) return;
        init_feed(s);
        return;
    case PH_WAIT_STARTUP:
    case PH_PASSTHRU:
    case PH_CANCEL:
        hold_bytes_in(s, d, n);
        return;
    case PH_STARTUP:
    case PH_SESSION:
        if (client_feed(s, d, n)) update(s);
        return;
    default:
        return;
    }
}

static void on_client_close(const u8 *p, u32 len) {
    if (len < 4) return;
    struct stream *s = find(rd32(p));
    if (!s) return;
    if (s->phase == PH_SPLICED) stream_free(s); /* the host has ended the pair */
    else close_stream(s);
}

static void on_connect_result(const u8 *p, u32 len) {
    if (len < 5) return;
    struct stream *s = find(rd32(p));
    if (!s || !s->inflight) return;
    s->inflight = 0;
    if (p[4]) {
        s->connected = 1;
        backend_up = 1;
        on_connected(s);
        return;
    }
    if (s->phase == PH_CANCEL) { counts[C_CANCELS_CLOSED]++; close_stream(s); return; }
    backend_up = 0;
}

static void on_upstream_data(const u8 *p, u32 len) {
    if (len < 4) return;
    struct stream *s = find(rd32(p));
    if (!s || !s->connected) return;
    if (s->phase == PH_STARTUP || s->phase == PH_SESSION) {
        backend_feed(s, p + 4, len - 4);
        update(s);
    }
}

static void on_upstream_close(const u8 *p, u32 len) {
    if (len < 4) return;
    struct stream *s = find(rd32(p));
    if (!s || !s->connected) return;
    s->connected = 0;
    act_sid(ACT_DOWNSTREAM_CLOSE, s->id);
    stream_free(s);
}

static int cfg_str_is(const u8 *cfg, u32 len, const char *key, const char *val) {
    u32 kl = slen(key), vl = slen(val);
    for (u32 i = 0; i + kl + 2 <= len; i++) {
        if (cfg[i] != '"') continue;
        u32 k = 0;
        while (k < kl && cfg[i + 1 + k] == (u8)key[k]) k++;
        if (k != kl || cfg[i + 1 + kl] != '"') continue;
        u32 j = i + 2 + kl;
        while (j < len && (cfg[j] == ' ' || cfg[j] == '\t' || cfg[j] == '\n')) j++;
        if (j >= len || cfg[j] != ':') continue;
        j++;
        while (j < len && (cfg[j] == ' ' || cfg[j] == '\t' || cfg[j] == '\n')) j++;
        if (j + vl + 2 > len || cfg[j] != '"') return 0;
        for (u32 m = 0; m < vl; m++) if (cfg[j + 1 + m] != (u8)val[m]) return 0;
        return cfg[j + 1 + vl] == '"';
    }
    return 0;
}

FAB_EXPORT(fab_streams) i32 fab_streams(void) { return 1; }

FAB_EXPORT(fab_init) i32 fab_init(const u8 *cfg, u32 len) {
    ssl_passthrough = cfg_str_is(cfg, len, "ssl", "passthrough");
    local_keepalive = cfg_u32(cfg, len, "local_keepalive", 1) != 0;
    need_debounce = cfg_u32(cfg, len, "need_debounce", 1) != 0;
    hold_timeout_ms = cfg_u32(cfg, len, "hold_timeout_ms", 30000);
    stream_hold_bytes = cfg_u32(cfg, len, "stream_hold_bytes", 65536);
    if (stream_hold_bytes < 1024) stream_hold_bytes = 1024;
    u32 hb = cfg_u32(cfg, len, "hold_bytes", MAX_CHUNKS * CHUNK);
    max_chunks = hb / CHUNK;
    if (max_chunks > MAX_CHUNKS) max_chunks = MAX_CHUNKS;
    if (max_chunks < 16) max_chunks = 16;
    max_message_bytes = cfg_u32(cfg, len, "max_message_bytes", 0x3fffffffu);
    if (max_message_bytes < 1024) max_message_bytes = 1024;
    for (u32 i = 0; i < NSLOTS; i++) slots[i] = 0;
    for (u32 i = 0; i < MAX_STREAMS; i++) {
        streams[i].phase = PH_FREE;
        free_streams[i] = MAX_STREAMS - 1 - i;
    }
    nfree_streams = MAX_STREAMS;
    nbusy = nwork = nholding = 0;
    backend_up = 0;
    last_need = 0xff;
    return 0;
}

FAB_EXPORT(fab_process) i64 fab_process(const u8 *ev, u32 len) {
    out_begin();
    last_rec = NIL;
    ticked_now = 0;
    if (len < 2) return out_end();
    u32 count = rd16(ev);
    /* ABI: 4 per event + 16 + 8 per live stream are read; one kept for the need, and
     * the live-stream share taken at 6 (the host may already have ended some). */
    budget = 4 * count + 16 + 6 * (MAX_STREAMS - nfree_streams) - 1 - NCOUNT;
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
        case EV_BACKEND_AVAILABLE: backend_up = 1; break;
        case EV_BACKEND_UNAVAILABLE: backend_up = 0; break;
        case EV_TICK:
            if (plen >= 8) { now_ms = rd64(pl); ticked = 1; }
            ticked_now = 1;
            if (nholding) check_timeouts();
            break;
        case EV_STREAM_OPEN: on_open(pl, plen); break;
        case EV_STREAM_DATA: on_data(pl, plen); break;
        case EV_STREAM_CLOSE: on_client_close(pl, plen); break;
        case EV_UPSTREAM_CONNECT_RESULT: on_connect_result(pl, plen); break;
        case EV_UPSTREAM_DATA: on_upstream_data(pl, plen); break;
        case EV_UPSTREAM_CLOSE: on_upstream_close(pl, plen); break;
        default: break;
        }
    }
    if (nwork) do_work();
    budget += NCOUNT;
    for (u32 i = 0; i < NCOUNT; i++) {
        if (!counts[i]) continue;
        u32 nl = slen(count_names[i]);
        u8 *p = act(ACT_COUNT, 4 + nl);
        if (!p) break;
        wr32(p, counts[i]);
        memcpy(p + 4, count_names[i], nl);
        counts[i] = 0;
    }
    u32 need = nbusy ? NEED_ACTIVE : NEED_NONE;
    /* active at once; none only at a tick (within 100 ms), so that 20 clients taking
     * turns do not flip the port's level (a cross-thread post in the host) per query */
    if (need == NEED_NONE && last_need == NEED_ACTIVE && need_debounce && !ticked_now)
        need = NEED_ACTIVE;
    if (need != last_need) {
        budget++;
        u8 *p = act(ACT_SET_BACKEND_NEED, 1);
        if (p) { p[0] = (u8)need; last_need = need; }
    }
    return out_end();
}
