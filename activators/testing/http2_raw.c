/* http2_raw.c - the HTTP/2 activator as it was before the SDK (hand-written against the raw
 * ABI, activators/common/fab.h), kept as the reference that tests/bench/sdk_http2.py
 * measures http2/http2.c (written with the SDK) against, as testing/tcp_raw.c is for TCP.
 * Not shipped. Its description, unchanged:
 *
 * http2.c - the HTTP/2 (h2c, prior knowledge) stream activator.
 *
 * Every client connection is terminated here: the activator sends its SETTINGS at once,
 * ACKs the client's, answers PINGs itself and holds requests while the backend sleeps.
 * A request stream needs a backend: the first one opens one upstream connection for this
 * client connection (upstream_connect(sid, 0)) and the request goes there. Two
 * independent HTTP/2 connections are kept (client<->activator, activator<->backend), each
 * with its own SETTINGS, PING and flow-control windows.
 *
 * HPACK: every header block, the client's and the backend's, is decoded against its
 * sender's table (dynamic table, Huffman) and re-encoded for the other peer without
 * dynamic-table insertions (static index + literals without indexing), so no decoder
 * depends on a block it did not see: a request answered locally costs nothing, and
 * blocks need no order between streams. See README.md.
 *
 * Config (JSON, all optional): hold_timeout_ms (default 30000, the host sets it from the
 * service's hold.timeout), max_connections (default 32, at most 64).
 */
#define FAB_OUT_CAP (1024 * 1024 - 4096)
#include "../common/fab.h"
#include "../sdk/c/hpack_tables.h"

#define CPY(d, s, n) __builtin_memcpy((d), (s), (n))
#define MOVE(d, s, n) __builtin_memmove((d), (s), (n))

/* ---- sizes (bytes) ---- */
#define MAXF 16384                 /* SETTINGS_MAX_FRAME_SIZE we announce (the default) */
#define IN_CAP (9 + MAXF)
#define HB_CAP 32768               /* one assembled header block */
#define Q_CAP (96 * 1024)          /* frames queued toward one peer */
#define NSTREAMS 128
#define MAX_OPEN 100               /* SETTINGS_MAX_CONCURRENT_STREAMS toward the client */
#define TBL_CAP 4096
#define TBL_ENT 128
#define STR_CAP 65536              /* one decoded HPACK string */
#define RE_CAP 32768               /* one re-encoded header block */
#define SCR_CAP (160 * 1024)       /* bytes to one side in one flush */
#define MAX_CONNS 64
#define WIN0 65535
#define LOW(win) ((win) < WIN0 / 2)  /* a peer may send less than half a window more */

/* frame types and flags */
#define T_DATA 0
#define T_HEADERS 1
#define T_PRIORITY 2
#define T_RST 3
#define T_SETTINGS 4
#define T_PUSH 5
#define T_PING 6
#define T_GOAWAY 7
#define T_WU 8
#define T_CONT 9
#define FL_END_STREAM 1
#define FL_ACK 1
#define FL_END_HEADERS 4
#define FL_PADDED 8
#define FL_PRIORITY 0x20

/* error codes */
#define E_NO 0
#define E_PROTOCOL 1
#define E_INTERNAL 2
#define E_FLOW 3
#define E_CLOSED 5
#define E_FRAME_SIZE 6
#define E_REFUSED 7
#define E_CANCEL 8
#define E_COMPRESSION 9
#define E_CALM 11

/* stream flags */
#define F_USED 1
#define F_CLI_END 2      /* the client sent END_STREAM */
#define F_SRV_END 4      /* END_STREAM toward the client is queued */
#define F_QUEUED_UP 8    /* its request headers wait in the upstream queue */
#define F_SENT_UP 16     /* its request headers reached the backend */
#define F_LOCAL 32       /* answered by the activator */
#define F_RESET 64
#define F_GRPC 128
#define F_TSET 256       /* t0 is a real time */

/* upstream states */
#define UP_NONE 0
#define UP_CONNECTING 1
#define UP_OPEN 2
#define UP_GONE 3

#define GOAWAY_PING "fabgoawy"

typedef struct {
    u32 id, flags;
    i64 c_send, b_send;    /* what we may still send to the client / backend */
    i64 c_recv, b_recv;    /* what the client / backend may still send us */
    u32 c_credit, b_credit;
    u32 qc, qb;            /* records queued toward the client / backend */
    u32 blk;
    u64 t0;
    u32 gto;               /* grpc-timeout in ms, 0: none */
} strm;

typedef struct {
    u32 len;
    u8 buf[Q_CAP];
} queue;

typedef struct {
    u8 data[TBL_CAP];
    u32 off[TBL_ENT], nl[TBL_ENT], vl[TBL_ENT];
    u8 sidx[TBL_ENT];      /* the static index of the entry's name, 0: none */
    u32 head, n, size, max, wpos;
} hptable;

typedef struct conn {
    u32 sid, used, dirty;
    u32 nused;             /* stream slots in use (an upper bound of the open ones) */
    u32 dead;              /* client connection error: code + 1 */
    u32 pre_len, cin_len, bin_len, chb_len, bhb_len;
    u32 c_cont, c_cont_flags, b_cont, b_cont_flags;
    u32 cli_settings, b_settings;
    i64 c_send, b_send, c_recv, b_recv;
    i64 c_init, b_init;
    u32 c_credit, b_credit;
    u32 c_maxf, b_maxf;
    u32 c_tsu;             /* next block to the client starts with a table size update */
    u32 max_cid, max_upid;
    u32 up, up_preface, b_tsu;
    u32 up_close;          /* upstream to close: GOAWAY code + 1 */
    u32 b_goaway, b_last;
    u32 ga;                /* 0, 1 (2^31-1 + PING sent), 2 (real last id sent) */
    u32 cli_goaway;
    u8 pre[24];
    u8 cin[IN_CAP];
    u8 bin[IN_CAP];
    u8 chb[HB_CAP];
    u8 bhb[HB_CAP];
    hptable dec;           /* the client's encoder, as seen by our decoder */
    hptable bdec;          /* the backend's encoder, as seen by our decoder */
    strm st[NSTREAMS];
    queue q2c, q2b;
} conn;

static conn *conns[MAX_CONNS];
static u32 nconns_alloc;
static u32 max_conns = 32;
static u32 hold_timeout_ms = 30000;
static u64 now_ms;
static u32 have_now;
static u32 backend_state;  /* 0 unknown (try), 1 up, 2 down */
static u64 last_retry;
static i32 last_need = -1;
static u32 epoch;
static u32 budget;

/* counters reported with `count` actions at the end of each call */
enum { C_PINGS, C_HOLD_TIMEOUTS, C_REFUSED, C_PROTO_ERRORS, C_BACKEND_GOAWAYS, C_STREAMS, NCOUNT };
static const char *const COUNT_NAME[NCOUNT] = {
    "pings_answered", "hold_timeouts", "streams_refused_h2", "protocol_errors",
    "backend_goaways", "requests"};
static u32 counts[NCOUNT];

static u8 D[SCR_CAP], U[SCR_CAP];
static u32 dlen, ulen;
static u8 NAMEB[STR_CAP], VALB[STR_CAP];
static u8 RE[RE_CAP];

static const u8 MAGIC[24] = {'P','R','I',' ','*',' ','H','T','T','P','/','2','.','0','\r','\n',
                             '\r','\n','S','M','\r','\n','\r','\n'};

/* ---- small helpers ---- */
static u32 slen(const char *s) { u32 n = 0; while (s[n]) n++; return n; }
static u32 ST_NLEN[62], ST_VLEN[62];
static u8 ST_HASH[128];
static u8 ST_FIRST[62];  /* the first static index with the same name */
#define SI_UNKNOWN 0xffu  /* open addressing: name hash -> first static index with that name */

static u32 name_hash(const u8 *n, u32 len) {
    return (len * 31u + n[0] * 7u + n[len - 1]) & 127u;
}
static u32 be24(const u8 *p) { return ((u32)p[0] << 16) | ((u32)p[1] << 8) | p[2]; }
static u32 be32(const u8 *p) {
    return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3];
}
static void wbe16(u8 *p, u32 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void wbe32(u8 *p, u32 v) {
    p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v;
}
static int room(u32 n) { return fab_out_count + n + 1 <= budget; }

static void logmsg(u32 level, const char *msg) {
    if (room(2)) act_log(level, msg);
}

/* ---- Huffman decoder (canonical code, RFC 7541 appendix B) ---- */
static u16 hf_sym[257];
static u32 hf_first[31], hf_cnt[31], hf_off[31];

static void hf_init(void) {
    for (u32 l = 0; l < 31; l++) hf_cnt[l] = 0;
    for (u32 s = 0; s < 257; s++) hf_cnt[FAB_HPACK_HUFF_LEN[s]]++;
    u32 off = 0, code = 0;
    for (u32 l = 1; l <= 30; l++) {
        hf_off[l] = off;
        hf_first[l] = code;
        off += hf_cnt[l];
        code = (code + hf_cnt[l]) << 1;
    }
    u32 k = 0;
    for (u32 l = 1; l <= 30; l++)
        for (u32 s = 0; s < 257; s++)
            if (FAB_HPACK_HUFF_LEN[s] == l) hf_sym[k++] = (u16)s;
}

/* Decode n Huffman bytes; returns the length or -1 (EOS, bad padding, too long). */
static i32 hf_decode(const u8 *p, u32 n, u8 *out, u32 cap) {
    u32 code = 0, l = 0, o = 0;
    for (u32 i = 0; i < n; i++) {
        for (i32 b = 7; b >= 0; b--) {
            code = (code << 1) | ((p[i] >> b) & 1);
            l++;
            if (l > 30) return -1;
            if (code >= hf_first[l] && code - hf_first[l] < hf_cnt[l]) {
                u32 sym = hf_sym[hf_off[l] + code - hf_first[l]];
                if (sym == 256 || o >= cap) return -1;
                out[o++] = (u8)sym;
                code = 0;
                l = 0;
            }
        }
    }
    if (l > 7 || code != (1u << l) - 1) return -1;
    return (i32)o;
}

/* ---- HPACK decoding (client blocks) and stateless re-encoding ---- */
static int hp_int(const u8 *p, u32 len, u32 *pos, u32 bits, u32 *out) {
    if (*pos >= len) return -1;
    u32 mask = (1u << bits) - 1;
    u32 v = p[(*pos)++] & mask;
    if (v == mask) {
        u32 m = 0;
        for (;;) {
            if (*pos >= len || m > 21) return -1;
            u8 b = p[(*pos)++];
            v += (u32)(b & 0x7f) << m;
            m += 7;
            if (!(b & 0x80)) break;
        }
        if (v > 0xffffff) return -1;
    }
    *out = v;
    return 0;
}

static i32 hp_str(const u8 *p, u32 len, u32 *pos, u8 *out) {
    if (*pos >= len) return -1;
    u32 h = p[*pos] & 0x80, n;
    if (hp_int(p, len, pos, 7, &n) || n > len - *pos) return -1;
    i32 r;
    if (h) {
        r = hf_decode(p + *pos, n, out, STR_CAP);
    } else {
        if (n > STR_CAP) return -1;
        CPY(out, p + *pos, n);
        r = (i32)n;
    }
    *pos += n;
    return r;
}

static void tbl_evict(hptable *t) {
    u32 slot = (t->head + TBL_ENT - (t->n - 1)) % TBL_ENT;
    t->size -= t->nl[slot] + t->vl[slot] + 32;
    t->n--;
}

static void tbl_fit(hptable *t, u32 need) {
    while (t->n && t->size + need > t->max) tbl_evict(t);
}

/* Copy n bytes in / out of the ring at off, in at most two pieces (no byte loops). */
static u32 ring_put(hptable *t, u32 off, const u8 *src, u32 n) {
    u32 first = TBL_CAP - off < n ? TBL_CAP - off : n;
    if (first) CPY(t->data + off, src, first);
    if (n > first) CPY(t->data, src + first, n - first);
    return (off + n) % TBL_CAP;
}

static u32 ring_get(const hptable *t, u32 off, u8 *dst, u32 n) {
    u32 first = TBL_CAP - off < n ? TBL_CAP - off : n;
    if (first) CPY(dst, t->data + off, first);
    if (n > first) CPY(dst + first, t->data, n - first);
    return (off + n) % TBL_CAP;
}

static void tbl_insert(hptable *t, const u8 *name, u32 nl, const u8 *val, u32 vl, u32 si) {
    u32 sz = nl + vl + 32;
    if (sz > t->max) {
        while (t->n) tbl_evict(t);
        return;
    }
    tbl_fit(t, sz);
    t->head = (t->head + 1) % TBL_ENT;
    t->off[t->head] = t->wpos;
    t->nl[t->head] = nl;
    t->vl[t->head] = vl;
    t->sidx[t->head] = (u8)si;
    t->wpos = ring_put(t, t->wpos, name, nl);
    t->wpos = ring_put(t, t->wpos, val, vl);
    t->n++;
    t->size += sz;
}

/* Copy entry idx (1-based HPACK index) into NAMEB/VALB; -1 if out of range. */
static int tbl_get(hptable *t, u32 idx, u32 *nl, u32 *vl, int want_value, u32 *si) {
    if (idx == 0) return -1;
    if (idx <= 61) {
        *si = ST_FIRST[idx];
        *nl = ST_NLEN[idx];
        CPY(NAMEB, FAB_HPACK_STATIC_NAME[idx], *nl);
        *vl = 0;
        if (want_value) { *vl = ST_VLEN[idx]; CPY(VALB, FAB_HPACK_STATIC_VALUE[idx], *vl); }
        return 0;
    }
    u32 d = idx - 62;
    if (d >= t->n) return -1;
    u32 slot = (t->head + TBL_ENT - d) % TBL_ENT;
    *nl = t->nl[slot];
    *si = t->sidx[slot];
    u32 o = ring_get(t, t->off[slot], NAMEB, *nl);
    *vl = 0;
    if (want_value) {
        *vl = t->vl[slot];
        ring_get(t, o, VALB, *vl);
    }
    return 0;
}

typedef struct {
    u32 len, too_big, grpc, gto;
} reenc;

static int re_int(reenc *r, u32 first, u32 bits, u32 v) {
    u32 mask = (1u << bits) - 1;
    if (r->len + 6 > RE_CAP) return -1;
    if (v < mask) { RE[r->len++] = (u8)(first | v); return 0; }
    RE[r->len++] = (u8)(first | mask);
    v -= mask;
    while (v >= 128) { RE[r->len++] = (u8)(0x80 | (v & 0x7f)); v >>= 7; }
    RE[r->len++] = (u8)v;
    return 0;
}

static int re_str(reenc *r, const u8 *s, u32 n) {
    if (re_int(r, 0, 7, n) || n > RE_CAP - r->len) return -1;
    CPY(RE + r->len, s, n);
    r->len += n;
    return 0;
}

static int eqn(const u8 *a, u32 an, const char *b, u32 bn) {
    if (an != bn) return 0;
    for (u32 i = 0; i < an; i++) if (a[i] != (u8)b[i]) return 0;
    return 1;
}


static u32 parse_gto(const u8 *v, u32 n) {
    if (n < 2 || n > 9) return 0;
    u64 x = 0;
    for (u32 i = 0; i + 1 < n; i++) {
        if (v[i] < '0' || v[i] > '9') return 0;
        x = x * 10 + (v[i] - '0');
    }
    u64 ms;
    switch (v[n - 1]) {
    case 'H': ms = x * 3600000; break;
    case 'M': ms = x * 60000; break;
    case 'S': ms = x * 1000; break;
    case 'm': ms = x; break;
    case 'u': ms = (x + 999) / 1000; break;
    case 'n': ms = (x + 999999) / 1000000; break;
    default: return 0;
    }
    if (ms == 0) ms = 1;
    if (ms > 0x7fffffff) ms = 0x7fffffff;
    return (u32)ms;
}

/* One decoded header field: re-encode it without touching the other peer's table. si is
 * the static index of its name if known (SI_UNKNOWN: look it up); returns it. */
static u32 re_field(reenc *r, u32 nl, u32 vl, int never, u32 si) {
    if (nl == 12 && eqn(NAMEB, nl, "content-type", 12) && vl >= 16 &&
        eqn(VALB, 16, "application/grpc", 16))
        r->grpc = 1;
    if (nl == 12 && eqn(NAMEB, nl, "grpc-timeout", 12)) r->gto = parse_gto(VALB, vl);
    u32 save = r->len, name_idx = si == SI_UNKNOWN ? 0 : si;
    if (si == SI_UNKNOWN && nl) {
        for (u32 h = name_hash(NAMEB, nl); ST_HASH[h]; h = (h + 1) & 127u) {
            u32 i = ST_HASH[h];
            if (!eqn(NAMEB, nl, FAB_HPACK_STATIC_NAME[i], ST_NLEN[i])) continue;
            name_idx = i;
            break;
        }
    }
    if (r->too_big) return name_idx;
    for (u32 i = name_idx; !never && i && i <= 61 && eqn(NAMEB, nl, FAB_HPACK_STATIC_NAME[i], ST_NLEN[i]);
         i++) {
        if (eqn(VALB, vl, FAB_HPACK_STATIC_VALUE[i], ST_VLEN[i])) {
            if (re_int(r, 0x80, 7, i)) goto big;
            return name_idx;
        }
    }
    if (name_idx) {
        if (re_int(r, never ? 0x10 : 0, 4, name_idx)) goto big;
    } else {
        if (r->len + 1 > RE_CAP) goto big;
        RE[r->len++] = never ? 0x10 : 0;
        if (re_str(r, NAMEB, nl)) goto big;
    }
    if (re_str(r, VALB, vl)) goto big;
    return name_idx;
big:
    r->len = save;
    r->too_big = 1;
    return name_idx;
}

/* Decode a whole block against the client's table; 0 ok, -1 COMPRESSION_ERROR. */
static int hp_decode(hptable *t, const u8 *p, u32 len, reenc *r) {
    u32 pos = 0, seen = 0;
    r->len = r->too_big = r->grpc = r->gto = 0;
    while (pos < len) {
        u8 b = p[pos];
        u32 idx, nl, vl, si = SI_UNKNOWN;
        if (b & 0x80) {
            if (hp_int(p, len, &pos, 7, &idx) || tbl_get(t, idx, &nl, &vl, 1, &si)) return -1;
            re_field(r, nl, vl, 0, si);
            seen = 1;
        } else if ((b & 0xe0) == 0x20) {
            if (seen || hp_int(p, len, &pos, 5, &idx) || idx > TBL_CAP) return -1;
            t->max = idx;
            tbl_fit(t, 0);
        } else {
            u32 bits = (b & 0x40) ? 6 : 4;
            int incr = (b & 0x40) != 0, never = (b & 0xf0) == 0x10;
            if (hp_int(p, len, &pos, bits, &idx)) return -1;
            if (idx) {
                if (tbl_get(t, idx, &nl, &vl, 0, &si)) return -1;
            } else {
                i32 n = hp_str(p, len, &pos, NAMEB);
                if (n < 0) return -1;
                nl = (u32)n;
            }
            i32 v = hp_str(p, len, &pos, VALB);
            if (v < 0) return -1;
            vl = (u32)v;
            si = re_field(r, nl, vl, never, si);
            if (incr) tbl_insert(t, NAMEB, nl, VALB, vl, si);
            seen = 1;
        }
    }
    return 0;
}

/* ---- queues of frames toward one peer ---- */
static int q_push(queue *q, u32 type, u32 flags, u32 sid, const u8 *p, u32 n) {
    if (Q_CAP - q->len < 10 + n) return 0;
    u8 *r = q->buf + q->len;
    r[0] = (u8)type;
    r[1] = (u8)flags;
    wr32(r + 2, sid);
    wr32(r + 6, n);
    if (n) CPY(r + 10, p, n);
    q->len += 10 + n;
    return 1;
}

/* Remove the records of one stream (DATA only, or all); returns the DATA bytes removed. */
static u32 q_purge(queue *q, u32 sid, int data_only, u32 *removed) {
    u32 r = 0, w = 0, bytes = 0;
    *removed = 0;
    while (r < q->len) {
        u8 *rec = q->buf + r;
        u32 n = rd32(rec + 6), rl = 10 + n;
        if (rd32(rec + 2) == sid && (!data_only || rec[0] == T_DATA)) {
            if (rec[0] == T_DATA) bytes += n;
            (*removed)++;
        } else {
            if (w != r) MOVE(q->buf + w, rec, rl);
            w += rl;
        }
        r += rl;
    }
    q->len = w;
    return bytes;
}

static strm *find(conn *c, u32 id) {
    if (!id || id > c->max_cid) return 0;
    strm *h = &c->st[(id >> 1) % NSTREAMS];  /* new_stream prefers this slot */
    if ((h->flags & F_USED) && h->id == id) return h;
    for (u32 i = 0; i < NSTREAMS; i++)
        if ((c->st[i].flags & F_USED) && c->st[i].id == id) return &c->st[i];
    return 0;
}

static int is_open(const strm *s) {
    return (s->flags & F_USED) && !(s->flags & F_RESET) &&
           !((s->flags & F_CLI_END) && (s->flags & F_SRV_END));
}

static u32 open_count(conn *c) {
    u32 n = 0;
    for (u32 i = 0; i < NSTREAMS; i++) n += is_open(&c->st[i]);
    return n;
}

static void conn_error(conn *c, u32 code) {
    if (!c->dead) { c->dead = code + 1; counts[C_PROTO_ERRORS]++; }
    c->dirty = 1;
}

static void push2c(conn *c, strm *s, u32 type, u32 flags, u32 sid, const u8 *p, u32 n) {
    if (!q_push(&c->q2c, type, flags, sid, p, n)) { conn_error(c, E_CALM); return; }
    if (s) s->qc++;
}

static int push2b(conn *c, strm *s, u32 type, u32 flags, u32 sid, const u8 *p, u32 n) {
    if (!q_push(&c->q2b, type, flags, sid, p, n)) return 0;
    if (s) s->qb++;
    return 1;
}

static void rst2c(conn *c, strm *s, u32 sid, u32 code) {
    u8 b[4];
    if (code == E_REFUSED) counts[C_REFUSED]++;
    wbe32(b, code);
    push2c(c, s, T_RST, 0, sid, b, 4);
}

static void goaway2c(conn *c, u32 last, u32 code) {
    u8 b[8];
    wbe32(b, last);
    wbe32(b + 4, code);
    push2c(c, 0, T_GOAWAY, 0, 0, b, 8);
}

/* Forget what is queued toward the client for s (DATA from the backend): credit the
 * backend's connection window for it, since those bytes will never be handed on. */
static void purge_to_client(conn *c, strm *s) {
    u32 removed;
    c->b_credit += q_purge(&c->q2c, s->id, 1, &removed);
    s->qc -= removed;
}

static void purge_to_backend(conn *c, strm *s) {
    u32 removed;
    c->c_credit += q_purge(&c->q2b, s->id, 0, &removed);
    s->qb -= removed;
    s->flags &= ~F_QUEUED_UP;
}

/* ---- local answers to the client (never touch its dynamic table) ---- */
static void local_reply(conn *c, strm *s, u32 status, u32 grpc_status) {
    u8 hb[128];
    u32 n = 0;
    if (!(s->flags & F_SENT_UP)) purge_to_backend(c, s);
    if (grpc_status) {
        const char *msg = grpc_status == 4 ? "deadline exceeded while the backend woke"
                                           : "backend unavailable";
        u32 ml = slen(msg);
        hb[n++] = 0x88;                                   /* :status 200 */
        hb[n++] = 0x0f; hb[n++] = 0x10; hb[n++] = 16;      /* content-type (31) */
        CPY(hb + n, "application/grpc", 16); n += 16;
        hb[n++] = 0; hb[n++] = 11; CPY(hb + n, "grpc-status", 11); n += 11;
        hb[n++] = grpc_status >= 10 ? 2 : 1;
        if (grpc_status >= 10) hb[n++] = (u8)('0' + grpc_status / 10);
        hb[n++] = (u8)('0' + grpc_status % 10);
        hb[n++] = 0; hb[n++] = 12; CPY(hb + n, "grpc-message", 12); n += 12;
        hb[n++] = (u8)ml; CPY(hb + n, msg, ml); n += ml;
    } else {
        hb[n++] = 0x08; hb[n++] = 3;                       /* :status (8), literal */
        hb[n++] = (u8)('0' + status / 100);
        hb[n++] = (u8)('0' + status / 10 % 10);
        hb[n++] = (u8)('0' + status % 10);
        hb[n++] = 0x0f; hb[n++] = 0x0d; hb[n++] = 1; hb[n++] = '0';   /* content-length (28) */
    }
    push2c(c, s, T_HEADERS, FL_END_STREAM | FL_END_HEADERS, s->id, hb, n);
    s->flags |= F_LOCAL | F_SRV_END;
    if (!(s->flags & F_CLI_END)) {
        rst2c(c, s, s->id, E_NO);  /* RFC 9113 8.1: complete response, stop sending */
        s->flags |= F_RESET;
    }
}

/* ---- the backend connection went away: refuse what it never processed ---- */
static void start_goaway(conn *c) {
    if (c->ga) return;
    goaway2c(c, 0x7fffffff, E_NO);
    push2c(c, 0, T_PING, 0, 0, (const u8 *)GOAWAY_PING, 8);
    c->ga = 1;
}

static void backend_gone(conn *c) {
    if (c->up == UP_GONE) return;
    c->up = UP_GONE;
    c->dirty = 1;
    for (u32 i = 0; i < NSTREAMS; i++) {
        strm *s = &c->st[i];
        if (!(s->flags & F_USED)) continue;
        purge_to_backend(c, s);
        if (!is_open(s)) continue;
        if (!(s->flags & F_SENT_UP) || s->id > c->b_last) {
            rst2c(c, s, s->id, E_REFUSED);
        } else {
            rst2c(c, s, s->id, E_INTERNAL);
        }
        s->flags |= F_RESET;
    }
    c->q2b.len = 0;
    start_goaway(c);
}

static void up_error(conn *c, u32 code) {
    if (c->up != UP_OPEN) return;
    c->up_close = code + 1;
    backend_gone(c);
}

/* ---- frames from the client ---- */
static void apply_cli_settings(conn *c, const u8 *p, u32 n) {
    for (u32 i = 0; i + 6 <= n; i += 6) {
        u32 id = ((u32)p[i] << 8) | p[i + 1], v = be32(p + i + 2);
        if (id == 1) {
            c->c_tsu = 1;  /* our encoder uses no table: say so (size 0) in the next block */
        } else if (id == 2) {
            if (v > 1) { conn_error(c, E_PROTOCOL); return; }
        } else if (id == 4) {
            if (v > 0x7fffffff) { conn_error(c, E_FLOW); return; }
            i64 d = (i64)v - c->c_init;
            c->c_init = v;
            for (u32 k = 0; k < NSTREAMS; k++)
                if (c->st[k].flags & F_USED) c->st[k].c_send += d;
        } else if (id == 5) {
            if (v < 16384 || v > 16777215) { conn_error(c, E_PROTOCOL); return; }
            c->c_maxf = v;
        }
    }
}

static strm *new_stream(conn *c, u32 id) {
    for (u32 k = 0; k < NSTREAMS; k++) {
        strm *s = &c->st[((id >> 1) + k) % NSTREAMS];
        if (s->flags & F_USED) continue;
        __builtin_memset(s, 0, sizeof *s);
        s->id = id;
        s->flags = F_USED;
        s->c_send = c->c_init;
        s->b_send = c->b_init;
        s->c_recv = WIN0;
        s->b_recv = WIN0;
        if (have_now) { s->t0 = now_ms; s->flags |= F_TSET; }
        c->nused++;
        return s;
    }
    return 0;
}

static void cli_header_block(conn *c, u32 sid, u32 flags) {
    reenc r;
    if (hp_decode(&c->dec, c->chb, c->chb_len, &r)) { conn_error(c, E_COMPRESSION); return; }
    int end = (flags & FL_END_STREAM) != 0;
    strm *s = find(c, sid);
    if (sid <= c->max_cid) {
        if (!s || !is_open(s)) return;  /* a closed stream: decoded for the table, ignored */
        if (s->flags & F_CLI_END) { rst2c(c, s, sid, E_CLOSED); s->flags |= F_RESET; return; }
        if (!end) { rst2c(c, s, sid, E_PROTOCOL); s->flags |= F_RESET; return; }
        s->flags |= F_CLI_END;
        if (s->flags & (F_LOCAL | F_RESET)) return;
        if (r.too_big || !push2b(c, s, T_HEADERS, FL_END_STREAM, sid, RE, r.len)) {
            rst2c(c, s, sid, E_CALM);
            s->flags |= F_RESET;
            if (s->flags & F_SENT_UP) {
                u8 b[4];
                wbe32(b, E_CANCEL);
                purge_to_backend(c, s);
                push2b(c, 0, T_RST, 0, sid, b, 4);
            }
        }
        return;
    }
    c->max_cid = sid;
    if (c->up == UP_GONE || c->b_goaway || c->cli_goaway || c->ga == 2 ||
        (c->nused >= MAX_OPEN && open_count(c) >= MAX_OPEN)) {
        rst2c(c, 0, sid, E_REFUSED);
        return;
    }
    s = new_stream(c, sid);
    if (!s) { rst2c(c, 0, sid, E_REFUSED); return; }
    counts[C_STREAMS]++;
    if (end) s->flags |= F_CLI_END;
    if (r.grpc) { s->flags |= F_GRPC; s->gto = r.gto; }
    if (r.too_big) { local_reply(c, s, 431, 0); return; }
    if (!push2b(c, s, T_HEADERS, end ? FL_END_STREAM : 0, sid, RE, r.len)) {
        s->flags |= F_RESET;
        rst2c(c, s, sid, E_REFUSED);
        return;
    }
    s->flags |= F_QUEUED_UP;
}

static void cli_frame(conn *c, u32 type, u32 flags, u32 sid, const u8 *p, u32 n) {
    if (!c->cli_settings) {
        if (type != T_SETTINGS || (flags & FL_ACK)) { conn_error(c, E_PROTOCOL); return; }
        c->cli_settings = 1;
    }
    if (c->c_cont) {
        if (type != T_CONT || sid != c->c_cont) { conn_error(c, E_PROTOCOL); return; }
        if (n > HB_CAP - c->chb_len) { conn_error(c, E_CALM); return; }
        CPY(c->chb + c->chb_len, p, n);
        c->chb_len += n;
        if (flags & FL_END_HEADERS) {
            c->c_cont = 0;
            cli_header_block(c, sid, c->c_cont_flags);
        }
        return;
    }
    switch (type) {
    case T_DATA: {
        if (!sid) { conn_error(c, E_PROTOCOL); return; }
        if (sid > c->max_cid) { conn_error(c, E_PROTOCOL); return; }
        u32 pad = 0, off = 0;
        if (flags & FL_PADDED) {
            if (n < 1 || p[0] >= n) { conn_error(c, E_PROTOCOL); return; }
            pad = p[0] + 1u;
            off = 1;
        }
        if ((i64)n > c->c_recv) { conn_error(c, E_FLOW); return; }
        c->c_recv -= n;
        strm *s = find(c, sid);
        if (!s || !is_open(s) || (s->flags & F_CLI_END) || (s->flags & F_LOCAL)) {
            c->c_credit += n;  /* consumed here: nobody else will see it */
            if (s && is_open(s) && (s->flags & F_CLI_END)) {
                rst2c(c, s, sid, E_CLOSED);
                s->flags |= F_RESET;
            }
            return;
        }
        if ((i64)n > s->c_recv) {
            c->c_credit += n;
            rst2c(c, s, sid, E_FLOW);
            s->flags |= F_RESET;
            return;
        }
        s->c_recv -= n;
        u32 dl = n - pad;
        c->c_credit += pad;
        s->c_credit += pad;
        int end = (flags & FL_END_STREAM) != 0;
        if (end) s->flags |= F_CLI_END;
        if (dl || end) {
            if (!push2b(c, s, T_DATA, end ? FL_END_STREAM : 0, sid, p + off, dl))
                conn_error(c, E_CALM);
        }
        return;
    }
    case T_HEADERS: {
        if (!sid || !(sid & 1)) { conn_error(c, E_PROTOCOL); return; }
        u32 off = 0, pad = 0;
        if (flags & FL_PADDED) {
            if (n < 1) { conn_error(c, E_PROTOCOL); return; }
            pad = p[0];
            off = 1;
        }
        if (flags & FL_PRIORITY) off += 5;
        if (off + pad > n) { conn_error(c, E_PROTOCOL); return; }
        u32 fl = n - off - pad;
        if (fl > HB_CAP) { conn_error(c, E_CALM); return; }
        CPY(c->chb, p + off, fl);
        c->chb_len = fl;
        if (flags & FL_END_HEADERS) {
            cli_header_block(c, sid, flags);
        } else {
            c->c_cont = sid;
            c->c_cont_flags = flags;
        }
        return;
    }
    case T_PRIORITY:
        if (!sid) { conn_error(c, E_PROTOCOL); return; }
        if (n != 5) conn_error(c, E_FRAME_SIZE);
        return;
    case T_RST: {
        if (!sid || sid > c->max_cid) { conn_error(c, E_PROTOCOL); return; }
        if (n != 4) { conn_error(c, E_FRAME_SIZE); return; }
        strm *s = find(c, sid);
        if (!s || (s->flags & F_RESET)) return;
        s->flags |= F_RESET;
        purge_to_client(c, s);
        if (s->flags & F_SENT_UP) {
            purge_to_backend(c, s);
            if (c->up == UP_OPEN) push2b(c, 0, T_RST, 0, sid, p, 4);
        } else {
            purge_to_backend(c, s);
        }
        return;
    }
    case T_SETTINGS:
        if (sid) { conn_error(c, E_PROTOCOL); return; }
        if (flags & FL_ACK) { if (n) conn_error(c, E_FRAME_SIZE); return; }
        if (n % 6) { conn_error(c, E_FRAME_SIZE); return; }
        apply_cli_settings(c, p, n);
        push2c(c, 0, T_SETTINGS, FL_ACK, 0, 0, 0);
        return;
    case T_PUSH:
        conn_error(c, E_PROTOCOL);
        return;
    case T_PING:
        if (sid) { conn_error(c, E_PROTOCOL); return; }
        if (n != 8) { conn_error(c, E_FRAME_SIZE); return; }
        if (flags & FL_ACK) {
            int mine = 1;
            for (u32 i = 0; i < 8; i++) if (p[i] != (u8)GOAWAY_PING[i]) mine = 0;
            if (mine && c->ga == 1) {
                goaway2c(c, c->max_cid, E_NO);
                c->ga = 2;
            }
            return;
        }
        push2c(c, 0, T_PING, FL_ACK, 0, p, 8);
        counts[C_PINGS]++;
        return;
    case T_GOAWAY:
        if (sid) { conn_error(c, E_PROTOCOL); return; }
        if (n < 8) { conn_error(c, E_FRAME_SIZE); return; }
        c->cli_goaway = 1;
        return;
    case T_WU: {
        if (n != 4) { conn_error(c, E_FRAME_SIZE); return; }
        u32 inc = be32(p) & 0x7fffffff;
        if (!sid) {
            if (!inc) { conn_error(c, E_PROTOCOL); return; }
            c->c_send += inc;
            if (c->c_send > 0x7fffffff) conn_error(c, E_FLOW);
            return;
        }
        if (sid > c->max_cid) { conn_error(c, E_PROTOCOL); return; }
        strm *s = find(c, sid);
        /* closed both ways may still have frames queued toward the client */
        if (!s || (s->flags & F_RESET)) return;
        if (!inc) { rst2c(c, s, sid, E_PROTOCOL); s->flags |= F_RESET; return; }
        s->c_send += inc;
        if (s->c_send > 0x7fffffff) { rst2c(c, s, sid, E_FLOW); s->flags |= F_RESET; }
        return;
    }
    case T_CONT:
        conn_error(c, E_PROTOCOL);
        return;
    default:
        return;  /* unknown types (PRIORITY_UPDATE, extensions) are ignored (RFC 9113 5.5) */
    }
}

static void cli_input(conn *c, const u8 *p, u32 n) {
    while (n && !c->dead) {
        if (c->pre_len < 24) {
            u32 take = 24 - c->pre_len;
            if (take > n) take = n;
            CPY(c->pre + c->pre_len, p, take);
            c->pre_len += take;
            p += take;
            n -= take;
            for (u32 i = 0; i < c->pre_len; i++)
                if (c->pre[i] != MAGIC[i]) { conn_error(c, E_PROTOCOL); return; }
            continue;
        }
        if (!c->cin_len && n >= 9) {
            u32 fl = be24(p);
            if (fl > MAXF) { conn_error(c, E_FRAME_SIZE); return; }
            if (n >= 9 + fl) {
                cli_frame(c, p[3], p[4], be32(p + 5) & 0x7fffffff, p + 9, fl);
                p += 9 + fl;
                n -= 9 + fl;
                continue;
            }
        }
        if (c->cin_len < 9) {
            u32 take = 9 - c->cin_len;
            if (take > n) take = n;
            CPY(c->cin + c->cin_len, p, take);
            c->cin_len += take;
            p += take;
            n -= take;
            if (c->cin_len < 9) return;
            if (be24(c->cin) > MAXF) { conn_error(c, E_FRAME_SIZE); return; }
        }
        u32 total = 9 + be24(c->cin), take = total - c->cin_len;
        if (take > n) take = n;
        CPY(c->cin + c->cin_len, p, take);
        c->cin_len += take;
        p += take;
        n -= take;
        if (c->cin_len == total) {
            c->cin_len = 0;
            cli_frame(c, c->cin[3], c->cin[4], be32(c->cin + 5) & 0x7fffffff, c->cin + 9,
                      total - 9);
        }
    }
}

/* ---- frames from the backend ---- */
/* A backend header block: decoded against the backend's table (so that table stays in
 * step whatever becomes of the stream) and re-encoded for the client without the dynamic
 * table, like requests the other way: blocks then need no order between streams. */
static void b_header_block(conn *c, u32 sid, u32 flags) {
    reenc r;
    if (hp_decode(&c->bdec, c->bhb, c->bhb_len, &r)) { up_error(c, E_COMPRESSION); return; }
    strm *s = find(c, sid);
    int end = (flags & FL_END_STREAM) != 0;
    if (!s || (s->flags & F_RESET)) return;  /* the client reset it: decoded, dropped */
    if (r.too_big) {
        u8 b[4];
        wbe32(b, E_CANCEL);
        purge_to_client(c, s);
        rst2c(c, s, sid, E_INTERNAL);
        purge_to_backend(c, s);
        push2b(c, 0, T_RST, 0, sid, b, 4);
        s->flags |= F_RESET;
        return;
    }
    if (!q_push(&c->q2c, T_HEADERS, end ? FL_END_STREAM : 0, sid, RE, r.len)) {
        conn_error(c, E_INTERNAL);
        return;
    }
    s->qc++;
    if (end) s->flags |= F_SRV_END;
}

static void b_frame(conn *c, u32 type, u32 flags, u32 sid, const u8 *p, u32 n) {
    if (!c->b_settings) {
        if (type != T_SETTINGS || (flags & FL_ACK)) { up_error(c, E_PROTOCOL); return; }
        c->b_settings = 1;
    }
    if (c->b_cont) {
        if (type != T_CONT || sid != c->b_cont) { up_error(c, E_PROTOCOL); return; }
        if (n > HB_CAP - c->bhb_len) { up_error(c, E_CALM); conn_error(c, E_INTERNAL); return; }
        CPY(c->bhb + c->bhb_len, p, n);
        c->bhb_len += n;
        if (flags & FL_END_HEADERS) {
            c->b_cont = 0;
            b_header_block(c, sid, c->b_cont_flags);
        }
        return;
    }
    switch (type) {
    case T_DATA: {
        if (!sid || sid > c->max_upid) { up_error(c, E_PROTOCOL); return; }
        u32 pad = 0, off = 0;
        if (flags & FL_PADDED) {
            if (n < 1 || p[0] >= n) { up_error(c, E_PROTOCOL); return; }
            pad = p[0] + 1u;
            off = 1;
        }
        if ((i64)n > c->b_recv) { up_error(c, E_FLOW); return; }
        c->b_recv -= n;
        strm *s = find(c, sid);
        if (!s || (s->flags & (F_RESET | F_SRV_END)) || !(s->flags & F_SENT_UP)) {
            c->b_credit += n;
            return;
        }
        if ((i64)n > s->b_recv) { up_error(c, E_FLOW); return; }
        s->b_recv -= n;
        c->b_credit += pad;
        s->b_credit += pad;
        int end = (flags & FL_END_STREAM) != 0;
        if (end) s->flags |= F_SRV_END;
        if (n - pad || end) {
            if (!q_push(&c->q2c, T_DATA, end ? FL_END_STREAM : 0, sid, p + off, n - pad)) {
                conn_error(c, E_INTERNAL);
                return;
            }
            s->qc++;
        }
        return;
    }
    case T_HEADERS: {
        if (!sid || sid > c->max_upid) { up_error(c, E_PROTOCOL); return; }
        u32 off = 0, pad = 0;
        if (flags & FL_PADDED) {
            if (n < 1) { up_error(c, E_PROTOCOL); return; }
            pad = p[0];
            off = 1;
        }
        if (flags & FL_PRIORITY) off += 5;
        if (off + pad > n) { up_error(c, E_PROTOCOL); return; }
        u32 fl = n - off - pad;
        if (fl > HB_CAP) { up_error(c, E_CALM); conn_error(c, E_INTERNAL); return; }
        CPY(c->bhb, p + off, fl);
        c->bhb_len = fl;
        if (flags & FL_END_HEADERS) {
            b_header_block(c, sid, flags);
        } else {
            c->b_cont = sid;
            c->b_cont_flags = flags;
        }
        return;
    }
    case T_RST: {
        if (n != 4) { up_error(c, E_FRAME_SIZE); return; }
        if (!sid || sid > c->max_upid) { up_error(c, E_PROTOCOL); return; }
        strm *s = find(c, sid);
        if (!s || (s->flags & F_RESET)) return;
        if (!(s->flags & F_SRV_END)) purge_to_client(c, s);
        purge_to_backend(c, s);
        push2c(c, s, T_RST, 0, sid, p, 4);
        s->flags |= F_RESET;
        return;
    }
    case T_SETTINGS:
        if (sid) { up_error(c, E_PROTOCOL); return; }
        if (flags & FL_ACK) return;
        if (n % 6) { up_error(c, E_FRAME_SIZE); return; }
        for (u32 i = 0; i + 6 <= n; i += 6) {
            u32 id = ((u32)p[i] << 8) | p[i + 1], v = be32(p + i + 2);
            if (id == 1) c->b_tsu = 1;
            else if (id == 4) {
                if (v > 0x7fffffff) { up_error(c, E_FLOW); return; }
                i64 d = (i64)v - c->b_init;
                c->b_init = v;
                for (u32 k = 0; k < NSTREAMS; k++)
                    if (c->st[k].flags & F_USED) c->st[k].b_send += d;
            } else if (id == 5) {
                if (v < 16384 || v > 16777215) { up_error(c, E_PROTOCOL); return; }
                c->b_maxf = v;
            }
        }
        push2b(c, 0, T_SETTINGS, FL_ACK, 0, 0, 0);
        return;
    case T_PUSH:
        up_error(c, E_PROTOCOL);
        return;
    case T_PING:
        if (sid) { up_error(c, E_PROTOCOL); return; }
        if (n != 8) { up_error(c, E_FRAME_SIZE); return; }
        if (!(flags & FL_ACK)) push2b(c, 0, T_PING, FL_ACK, 0, p, 8);
        return;
    case T_GOAWAY: {
        if (sid) { up_error(c, E_PROTOCOL); return; }
        if (n < 8) { up_error(c, E_FRAME_SIZE); return; }
        u32 last = be32(p) & 0x7fffffff;
        if (!c->b_goaway || last < c->b_last) c->b_last = last;
        if (!c->b_goaway) counts[C_BACKEND_GOAWAYS]++;
        c->b_goaway = 1;
        for (u32 i = 0; i < NSTREAMS; i++) {
            strm *s = &c->st[i];
            if (!is_open(s)) continue;
            if (!(s->flags & F_SENT_UP) || s->id > c->b_last) {
                purge_to_backend(c, s);
                rst2c(c, s, s->id, E_REFUSED);
                s->flags |= F_RESET;
            }
        }
        start_goaway(c);
        return;
    }
    case T_WU: {
        if (n != 4) { up_error(c, E_FRAME_SIZE); return; }
        u32 inc = be32(p) & 0x7fffffff;
        if (!sid) {
            if (!inc) { up_error(c, E_PROTOCOL); return; }
            c->b_send += inc;
            if (c->b_send > 0x7fffffff) up_error(c, E_FLOW);
            return;
        }
        strm *s = find(c, sid);
        if (!s || !inc) return;
        s->b_send += inc;
        return;
    }
    case T_CONT:
        up_error(c, E_PROTOCOL);
        return;
    default:
        return;
    }
}

static void b_input(conn *c, const u8 *p, u32 n) {
    while (n && c->up == UP_OPEN) {
        if (!c->bin_len && n >= 9) {
            u32 fl = be24(p);
            if (fl > MAXF) { up_error(c, E_FRAME_SIZE); return; }
            if (n >= 9 + fl) {
                b_frame(c, p[3], p[4], be32(p + 5) & 0x7fffffff, p + 9, fl);
                p += 9 + fl;
                n -= 9 + fl;
                continue;
            }
        }
        if (c->bin_len < 9) {
            u32 take = 9 - c->bin_len;
            if (take > n) take = n;
            CPY(c->bin + c->bin_len, p, take);
            c->bin_len += take;
            p += take;
            n -= take;
            if (c->bin_len < 9) return;
            if (be24(c->bin) > MAXF) { up_error(c, E_FRAME_SIZE); return; }
        }
        u32 total = 9 + be24(c->bin), take = total - c->bin_len;
        if (take > n) take = n;
        CPY(c->bin + c->bin_len, p, take);
        c->bin_len += take;
        p += take;
        n -= take;
        if (c->bin_len == total) {
            c->bin_len = 0;
            b_frame(c, c->bin[3], c->bin[4], be32(c->bin + 5) & 0x7fffffff, c->bin + 9,
                    total - 9);
        }
    }
}

/* ---- serialising queued frames within the peers' windows ---- */
static int put_frame(u8 *out, u32 cap, u32 *ol, u32 type, u32 flags, u32 sid,
                     const u8 *p, u32 n) {
    if (cap - *ol < 9 + n) return 0;
    u8 *f = out + *ol;
    f[0] = (u8)(n >> 16); f[1] = (u8)(n >> 8); f[2] = (u8)n;
    f[3] = (u8)type; f[4] = (u8)flags;
    wbe32(f + 5, sid);
    if (n) CPY(f + 9, p, n);
    *ol += 9 + n;
    return 1;
}

/* A header block as HEADERS + CONTINUATION frames of at most maxf, written whole or not at
 * all (nothing may come between them); prefix >= 0 is a byte put first (a table size
 * update). */
static int put_block(u8 *out, u32 cap, u32 *ol, u32 flags, u32 sid, i32 prefix,
                     const u8 *p, u32 n, u32 maxf) {
    u32 total = n + (prefix >= 0), frames = total ? (total + maxf - 1) / maxf : 1;
    if (cap - *ol < total + 9 * frames) return 0;
    u32 done = 0, first = 1;
    do {
        u32 chunk = total - done > maxf ? maxf : total - done;
        u8 *f = out + *ol;
        f[0] = (u8)(chunk >> 16); f[1] = (u8)(chunk >> 8); f[2] = (u8)chunk;
        f[3] = first ? T_HEADERS : T_CONT;
        f[4] = (u8)((first ? flags : 0) | (done + chunk == total ? FL_END_HEADERS : 0));
        wbe32(f + 5, sid);
        u8 *d = f + 9;
        u32 k = chunk;
        if (first && prefix >= 0) { *d++ = (u8)prefix; k--; }
        u32 src = done - (prefix >= 0 && !first ? 1 : 0);
        if (k) CPY(d, p + src, k);
        *ol += 9 + chunk;
        done += chunk;
        first = 0;
    } while (done < total);
    return 1;
}

static void flush_q(conn *c, int toclient, u8 *out, u32 cap, u32 *ol) {
    queue *q = toclient ? &c->q2c : &c->q2b;
    u32 maxf = toclient ? (c->c_maxf < MAXF ? c->c_maxf : MAXF) : c->b_maxf;
    u32 r = 0, w = 0, full = 0;
    epoch++;
    while (r < q->len) {
        u8 *rec = q->buf + r;
        u32 type = rec[0], fl = rec[1], sid = rd32(rec + 2), n = rd32(rec + 6);
        u32 rl = 10 + n;
        strm *s = find(c, sid);
        u32 sent = 0, done = 0;
        if (!full && !(s && s->blk == epoch)) {
            if (type == T_DATA) {
                i64 *cw = toclient ? &c->c_send : &c->b_send;
                i64 *sw = s ? (toclient ? &s->c_send : &s->b_send) : 0;
                while (sent < n) {
                    i64 win = *cw;
                    if (sw && *sw < win) win = *sw;
                    if (!sw) win = 0;
                    if (win <= 0) break;
                    u32 chunk = n - sent;
                    if (chunk > maxf) chunk = maxf;
                    if ((i64)chunk > win) chunk = (u32)win;
                    if (cap - *ol < 9 + chunk) {
                        full = 1;
                        if (cap - *ol <= 9) break;
                        chunk = cap - *ol - 9;
                    }
                    int last = sent + chunk == n;
                    put_frame(out, cap, ol, T_DATA, last ? fl : 0, sid, rec + 10 + sent, chunk);
                    *cw -= chunk;
                    *sw -= chunk;
                    sent += chunk;
                    if (toclient) {
                        c->b_credit += chunk;
                        if (!(s->flags & (F_SRV_END | F_RESET))) s->b_credit += chunk;
                    } else {
                        c->c_credit += chunk;
                        if (!(s->flags & (F_CLI_END | F_RESET))) s->c_credit += chunk;
                    }
                    if (full) break;
                }
                if (n == 0) {
                    if (put_frame(out, cap, ol, T_DATA, fl, sid, 0, 0)) done = 1;
                    else full = 1;
                } else if (sent == n) {
                    done = 1;
                }
            } else if (type == T_HEADERS) {
                i32 prefix = -1;
                if (toclient ? c->c_tsu : c->b_tsu) prefix = 0x20;
                if (put_block(out, cap, ol, fl, sid, prefix, rec + 10, n, maxf)) {
                    done = 1;
                    if (toclient) c->c_tsu = 0;
                    if (!toclient) {
                        c->b_tsu = 0;
                        if (s && !(s->flags & F_SENT_UP)) {
                            s->flags |= F_SENT_UP;
                            s->flags &= ~F_QUEUED_UP;
                        }
                        if (sid > c->max_upid) c->max_upid = sid;
                    }
                } else {
                    full = 1;
                }
            } else {
                if (put_frame(out, cap, ol, type, fl, sid, rec + 10, n)) done = 1;
                else full = 1;
            }
        }
        if (done) {
            if (s) { if (toclient) s->qc--; else s->qb--; }
        } else {
            if (s) s->blk = epoch;  /* its later frames wait too; other streams go on */
            u32 left = n - sent;
            if (w != r || sent) {
                MOVE(q->buf + w, rec, 10);
                wr32(q->buf + w + 6, left);
                if (left) MOVE(q->buf + w + 10, rec + 10 + sent, left);
            }
            w += 10 + left;
        }
        r += rl;
    }
    q->len = w;
}

static void put_wu(u8 *out, u32 cap, u32 *ol, u32 sid, u32 inc) {
    u8 b[4];
    wbe32(b, inc);
    put_frame(out, cap, ol, T_WU, 0, sid, b, 4);
}

static void emit_bytes(u32 kind, u32 sid, const u8 *p, u32 n) {
    if (!n) return;
    u8 *a = out_action(kind, 4 + n);
    if (!a) return;
    wr32(a, sid);
    CPY(a + 4, p, n);
}

static void emit_sid(u32 kind, u32 sid) {
    u8 *a = out_action(kind, 4);
    if (a) wr32(a, sid);
}

static void free_conn(conn *c) {
    c->used = 0;
    c->dirty = 0;
}

static int wants_up(conn *c) {
    for (u32 i = 0; i < NSTREAMS; i++) {
        strm *s = &c->st[i];
        if (is_open(s) && (s->flags & F_QUEUED_UP) && !(s->flags & F_SENT_UP)) return 1;
    }
    return 0;
}

/* Write what this connection may send to each side; 0 when deferred for lack of room. */
static int flush_conn(conn *c) {
    if (!room(6)) return 0;
    u32 avail = FAB_OUT_CAP - fab_out_len;
    if (avail < 4096) return 0;
    u32 cap = (avail - 1024) / 2;
    if (cap > SCR_CAP) cap = SCR_CAP;
    dlen = ulen = 0;
    c->dirty = 0;
    if (c->dead) {
        u8 b[8];
        wbe32(b, c->max_cid);
        wbe32(b + 4, c->dead - 1);
        put_frame(D, cap, &dlen, T_GOAWAY, 0, 0, b, 8);
        emit_bytes(ACT_DOWNSTREAM_SEND, c->sid, D, dlen);
        emit_sid(ACT_DOWNSTREAM_CLOSE, c->sid);
        if (c->up == UP_OPEN || c->up == UP_CONNECTING || c->up_close)
            emit_sid(ACT_UPSTREAM_CLOSE, c->sid);
        logmsg(LOG_INFO, "http2: client connection error, GOAWAY sent");
        free_conn(c);
        return 1;
    }
    if (c->up == UP_NONE && backend_state != 2 && wants_up(c)) {
        u8 *a = out_action(ACT_UPSTREAM_CONNECT, 6);  /* port 0: the target port */
        if (a) { wr32(a, c->sid); wr16(a + 4, 0); c->up = UP_CONNECTING; }
    }
    if (c->up == UP_OPEN && c->up_preface) {
        u8 s[12];
        CPY(U, MAGIC, 24);
        ulen = 24;
        wbe16(s, 2); wbe32(s + 2, 0);               /* ENABLE_PUSH 0 */
        wbe16(s + 6, 3); wbe32(s + 8, 100);         /* MAX_CONCURRENT_STREAMS */
        put_frame(U, cap, &ulen, T_SETTINGS, 0, 0, s, 12);
        c->up_preface = 0;
        c->b_tsu = 1;
    }
    flush_q(c, 1, D, cap, &dlen);
    if (c->up == UP_OPEN) flush_q(c, 0, U, cap, &ulen);
    /* Credit each peer for what was handed on or consumed, once, and only when the peer
     * is down to half its window: one WINDOW_UPDATE per half window, not one per call.
     * No stall: a peer below half a window always gets what it is owed. */
    if (c->c_credit && LOW(c->c_recv) && cap - dlen >= 13) {
        put_wu(D, cap, &dlen, 0, c->c_credit);
        c->c_recv += c->c_credit;
        c->c_credit = 0;
    }
    for (u32 i = 0; i < NSTREAMS; i++) {
        strm *s = &c->st[i];
        if (!(s->flags & F_USED)) continue;
        if (s->c_credit && LOW(s->c_recv) && !(s->flags & (F_CLI_END | F_RESET)) &&
            cap - dlen >= 13) {
            put_wu(D, cap, &dlen, s->id, s->c_credit);
            s->c_recv += s->c_credit;
            s->c_credit = 0;
        }
        if (c->up == UP_OPEN && s->b_credit && LOW(s->b_recv) && (s->flags & F_SENT_UP) &&
            !(s->flags & (F_SRV_END | F_RESET)) && cap - ulen >= 13) {
            put_wu(U, cap, &ulen, s->id, s->b_credit);
            s->b_recv += s->b_credit;
            s->b_credit = 0;
        }
    }
    if (c->up == UP_OPEN && c->b_credit && LOW(c->b_recv) && cap - ulen >= 13) {
        put_wu(U, cap, &ulen, 0, c->b_credit);
        c->b_recv += c->b_credit;
        c->b_credit = 0;
    }
    if (c->up_close && cap - ulen >= 17) {
        u8 b[8];
        wbe32(b, 0);
        wbe32(b + 4, c->up_close - 1);
        put_frame(U, cap, &ulen, T_GOAWAY, 0, 0, b, 8);
    }
    emit_bytes(ACT_DOWNSTREAM_SEND, c->sid, D, dlen);
    emit_bytes(ACT_UPSTREAM_SEND, c->sid, U, ulen);
    if (c->up_close) {
        emit_sid(ACT_UPSTREAM_CLOSE, c->sid);
        c->up_close = 0;
    }
    /* forget finished streams */
    for (u32 i = 0; i < NSTREAMS; i++) {
        strm *s = &c->st[i];
        if ((s->flags & F_USED) && !is_open(s) && !s->qc && !s->qb) {
            s->flags = 0;
            c->nused--;
        }
    }
    if ((c->ga == 2 || c->cli_goaway) && !open_count(c) && !c->q2c.len) {
        emit_sid(ACT_DOWNSTREAM_CLOSE, c->sid);
        if (c->up == UP_OPEN || c->up == UP_CONNECTING) emit_sid(ACT_UPSTREAM_CLOSE, c->sid);
        free_conn(c);
    }
    return 1;
}

/* ---- connections ---- */
static conn *find_conn(u32 sid) {
    for (u32 i = 0; i < nconns_alloc; i++)
        if (conns[i]->used && conns[i]->sid == sid) return conns[i];
    return 0;
}

static conn *open_conn(u32 sid) {
    conn *c = 0;
    for (u32 i = 0; i < nconns_alloc; i++)
        if (!conns[i]->used) { c = conns[i]; break; }
    if (!c) {
        if (nconns_alloc >= max_conns) return 0;
        u32 p = fab_alloc(sizeof(conn));
        if (!p) return 0;
        c = (conn *)p;
        conns[nconns_alloc++] = c;
    }
    /* reset only the bookkeeping, not the big buffers */
    u32 head = (u32)((u8 *)&c->pre - (u8 *)c);
    memset(c, 0, head);
    for (u32 i = 0; i < NSTREAMS; i++) c->st[i].flags = 0;
    c->q2c.len = c->q2b.len = 0;
    c->dec.head = c->dec.n = c->dec.size = c->dec.wpos = 0;
    c->dec.max = TBL_CAP;
    c->bdec.head = c->bdec.n = c->bdec.size = c->bdec.wpos = 0;
    c->bdec.max = TBL_CAP;
    c->sid = sid;
    c->used = 1;
    c->c_send = c->b_send = c->c_recv = c->b_recv = WIN0;
    c->c_init = c->b_init = WIN0;
    c->c_maxf = c->b_maxf = MAXF;
    c->c_tsu = 1;
    c->b_last = 0x7fffffff;
    u8 s[6];
    wbe16(s, 3);
    wbe32(s + 2, MAX_OPEN);
    push2c(c, 0, T_SETTINGS, 0, 0, s, 6);
    c->dirty = 1;
    return c;
}

static void on_tick(u64 t) {
    now_ms = t;
    have_now = 1;
    if (backend_state == 2 && t - last_retry >= 1000) {
        backend_state = 0;  /* retry once a second in case an availability event was missed */
        last_retry = t;
    }
    for (u32 i = 0; i < nconns_alloc; i++) {
        conn *c = conns[i];
        if (!c->used) continue;
        for (u32 k = 0; k < NSTREAMS; k++) {
            strm *s = &c->st[k];
            if (!(s->flags & F_USED)) continue;
            if (!(s->flags & F_TSET)) { s->t0 = t; s->flags |= F_TSET; continue; }
            if (!is_open(s) || !(s->flags & F_QUEUED_UP) || (s->flags & (F_SENT_UP | F_LOCAL)))
                continue;
            u64 age = t - s->t0;
            u32 grpc_expired = (s->flags & F_GRPC) && s->gto && s->gto < hold_timeout_ms &&
                               age >= s->gto;
            if (age >= hold_timeout_ms || grpc_expired) {
                if (s->flags & F_GRPC) local_reply(c, s, 0, grpc_expired ? 4 : 14);
                else local_reply(c, s, 503, 0);
                c->dirty = 1;
                counts[C_HOLD_TIMEOUTS]++;
            }
        }
        if (c->q2c.len || c->q2b.len || c->c_credit || c->b_credit) c->dirty = 1;
        if (c->up == UP_NONE && backend_state != 2) c->dirty = 1;
    }
}

static void need_update(void) {
    i32 need = NEED_NONE;
    for (u32 i = 0; i < nconns_alloc && need == NEED_NONE; i++) {
        conn *c = conns[i];
        if (c->used && open_count(c)) need = NEED_ACTIVE;
    }
    if (need != last_need && fab_out_count < budget) {
        act_need((u32)need);
        last_need = need;
    }
    for (u32 i = 0; i < NCOUNT; i++) {
        if (!counts[i] || fab_out_count >= budget) continue;
        u32 n = slen(COUNT_NAME[i]);
        u8 *a = out_action(ACT_COUNT, 4 + n);
        if (!a) break;
        wr32(a, counts[i]);
        CPY(a + 4, COUNT_NAME[i], n);
        counts[i] = 0;
    }
}

FAB_EXPORT(fab_streams) i32 fab_streams(void) { return 1; }

FAB_EXPORT(fab_init) i32 fab_init(const u8 *cfg, u32 len) {
    hold_timeout_ms = cfg_u32(cfg, len, "hold_timeout_ms", 30000);
    max_conns = cfg_u32(cfg, len, "max_connections", 32);
    if (max_conns == 0 || max_conns > MAX_CONNS) max_conns = MAX_CONNS;
    hf_init();
    for (u32 i = 1; i <= 61; i++) { ST_NLEN[i] = slen(FAB_HPACK_STATIC_NAME[i]); ST_VLEN[i] = slen(FAB_HPACK_STATIC_VALUE[i]); }
    for (u32 i = 0; i < 128; i++) ST_HASH[i] = 0;
    for (u32 i = 1; i <= 61; i++) {
        ST_FIRST[i] = (u8)i;
        if (i > 1 && ST_NLEN[i] == ST_NLEN[i - 1] &&
            eqn((const u8 *)FAB_HPACK_STATIC_NAME[i], ST_NLEN[i], FAB_HPACK_STATIC_NAME[i - 1], ST_NLEN[i])) {
            ST_FIRST[i] = ST_FIRST[i - 1];
            continue;  /* same name as the entry before: found through that one */
        }
        u32 h = name_hash((const u8 *)FAB_HPACK_STATIC_NAME[i], ST_NLEN[i]);
        while (ST_HASH[h]) h = (h + 1) & 127u;
        ST_HASH[h] = (u8)i;
    }
    return 0;
}

FAB_EXPORT(fab_process) i64 fab_process(const u8 *ev, u32 len) {
    out_begin();
    if (len < 2) return out_end();
    u32 count = rd16(ev), pos = 2, live = 0;
    for (u32 i = 0; i < nconns_alloc; i++) live += conns[i]->used;
    budget = 4 * count + 16 + 8 * live;  /* what the host reads of one answer (ABI.md) */
    for (u32 e = 0; e < count; e++) {
        if (len - pos < REC_HDR) break;
        u32 kind = ev[pos], n = rd32(ev + pos + 4);
        if (n > len - pos - REC_HDR) break;
        const u8 *p = ev + pos + REC_HDR;
        pos += REC_HDR + n;
        if (kind == EV_TICK) {
            if (n == 8) on_tick(rd64(p));
            continue;
        }
        if (kind == EV_BACKEND_AVAILABLE) {
            backend_state = 1;
            for (u32 i = 0; i < nconns_alloc; i++)
                if (conns[i]->used && conns[i]->up == UP_NONE) conns[i]->dirty = 1;
            continue;
        }
        if (kind == EV_BACKEND_UNAVAILABLE) {
            backend_state = 2;
            last_retry = now_ms;
            continue;
        }
        if (n < 4) continue;
        u32 sid = rd32(p);
        if (kind == EV_STREAM_OPEN) {
            if (find_conn(sid)) continue;
            if (!open_conn(sid)) {
                emit_sid(ACT_DOWNSTREAM_CLOSE, sid);
                logmsg(LOG_WARNING, "http2: connection limit reached, connection closed");
            }
            continue;
        }
        conn *c = find_conn(sid);
        if (!c) continue;
        c->dirty = 1;
        switch (kind) {
        case EV_STREAM_DATA:
            cli_input(c, p + 4, n - 4);
            break;
        case EV_STREAM_CLOSE:
            emit_sid(ACT_DOWNSTREAM_CLOSE, sid);
            if (c->up == UP_OPEN || c->up == UP_CONNECTING) emit_sid(ACT_UPSTREAM_CLOSE, sid);
            free_conn(c);
            continue;
        case EV_UPSTREAM_CONNECT_RESULT:
            if (n < 5 || c->up != UP_CONNECTING) break;
            if (p[4]) {
                c->up = UP_OPEN;
                c->up_preface = 1;
                backend_state = 1;
            } else {
                c->up = UP_NONE;
                backend_state = 2;
                last_retry = now_ms;
            }
            break;
        case EV_UPSTREAM_DATA:
            if (c->up == UP_OPEN) b_input(c, p + 4, n - 4);
            break;
        case EV_UPSTREAM_CLOSE:
            if (c->up == UP_OPEN || c->up == UP_CONNECTING) {
                backend_gone(c);
                emit_sid(ACT_UPSTREAM_CLOSE, sid);
            }
            break;
        default:
            break;
        }
        if (c->used && (c->q2c.len > Q_CAP / 2 || c->q2b.len > Q_CAP / 2 || c->dead))
            flush_conn(c);
    }
    for (u32 i = 0; i < nconns_alloc; i++)
        if (conns[i]->used && conns[i]->dirty) flush_conn(conns[i]);
    need_update();
    return out_end();
}
