/* http2.c - the HTTP/2 (h2c, prior knowledge) stream activator.
 *
 * Every client connection is terminated here: the activator sends its SETTINGS at once,
 * ACKs the client's, answers PINGs itself and holds requests while the backend sleeps.
 * A request stream needs a backend: the first one opens one upstream connection for this
 * client connection (upstream_connect(sid, 0)) and the request goes there. Two
 * independent HTTP/2 connections are kept (client<->activator, activator<->backend), each
 * with its own SETTINGS, PING and flow-control windows.
 *
 * HPACK: every header block, the client's and the backend's, is decoded against its
 * sender's table and re-encoded for the other peer without dynamic-table insertions, so
 * no decoder depends on a block it did not see: a request answered locally costs
 * nothing, and blocks need no order between streams. See README.md.
 *
 * Written with the C SDK: fabricd.h (events, actions, fab_table), fab_http2.h (frames),
 * fab_hpack.h (header blocks). What is left here is the relay: streams, queues toward
 * each peer, flow control, holds and local answers.
 *
 * Config (JSON, all optional): hold_timeout_ms (default 30000, the host sets it from the
 * service's hold.timeout), max_connections (default and at most 1024).
 */
#define FAB_OUT_CAP (1024 * 1024 - 4096)
#include "../sdk/c/fabricd.h"
#include "../sdk/c/fab_http2.h"
#include "../sdk/c/fab_hpack.h"

/* ---- sizes (bytes) ---- */
#define MAXF FAB_H2_MAX_FRAME      /* SETTINGS_MAX_FRAME_SIZE we announce (the default) */
#define HB_CAP 32768               /* one assembled header block */
#define Q_CAP (96 * 1024)          /* frames queued toward one peer */
#define NSTREAMS 128
#define MAX_OPEN 100               /* SETTINGS_MAX_CONCURRENT_STREAMS toward the client */
#define RE_CAP 32768               /* one re-encoded header block */
#define SCR_CAP (160 * 1024)       /* bytes to one side in one flush */
#define MAX_CONNS 1024
#define MAX_WORK 18                /* work blocks (306 KiB each) in the default memory */
#define DEFAULT_MEMORY (16u << 20) /* the host's default memory_limit */
#define INBOX_CAP 512              /* bytes kept for a connection waiting for a block */
#define BTABLE 512                 /* HEADER_TABLE_SIZE we ask of the backend */
#define BSNAP_CAP BTABLE           /* its table's entries, kept while idle (they fit) */
#define HLIST_MAX (64 * 1024)      /* one decoded header list (RFC 7541 4.1 sizes), at most */
#define HLIST_ANNOUNCED 32768      /* SETTINGS_MAX_HEADER_LIST_SIZE toward the client: a list
                                    * this size always fits a block (HB_CAP) and RE */
#define HIST 512                   /* recent client stream ids remembered (opened, reset by us) */
#define RST_BURST 1000             /* client resets of open streams: a burst, then */
#define RST_RATE 100               /* this many a second (rapid reset, CVE-2023-44487) */
#define FLAG_SELFDEP 0x100         /* with a HEADERS' flags: it depends on itself */
#define WIN0 FAB_H2_DEFAULT_WINDOW
#define LOW(win) ((win) < WIN0 / 2)  /* a peer may send less than half a window more */

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
#define F_RESP 512       /* the backend's response headers arrived */
#define F_FINAL 1024     /* ... and a final (not 1xx) one among them */
#define F_EARLY 2048     /* the backend's response ended before the client's request did */

/* upstream states */
#define UP_NONE 0
#define UP_CONNECTING 1
#define UP_OPEN 2
#define UP_GONE 3

#define GOAWAY_PING "fabgoawy"
#define GOAWAY_WAIT_MS 1000        /* at most this long for its ACK */
#define STALL_MS 10000             /* a block held for a partial frame alone, at most */
#define PREFACE_MS 10000           /* a connection without the client's preface, at most */

typedef struct {
    u32 id, flags;
    i64 c_send, b_send;    /* what we may still send to the client / backend */
    i64 c_recv, b_recv;    /* what the client / backend may still send us */
    u32 c_credit, b_credit;
    u32 qc, qb;            /* records queued toward the client / backend */
    u32 blk;
    u32 hlist;             /* the request's header list size (RFC 7541 4.1) */
    u64 t0;
    u32 gto;               /* grpc-timeout in ms, 0: none */
    i64 clen;              /* the request's content-length, -1: none */
    u64 body;              /* request body bytes so far (checked against clen) */
} strm;

typedef struct {
    u32 len;
    u8 buf[Q_CAP];
} queue;

/* What a connection needs only while busy (streams, queued or partial bytes): taken from
 * a pool of blocks allocated on first use, given back when the connection goes idle, so
 * an idle connection costs only its bookkeeping and the client's HPACK table. */
struct work {
    struct fab_h2_reader cin, bin;
    u8 chb[HB_CAP];
    u8 bhb[HB_CAP];
    struct fab_hpack_table bdec;  /* the backend's encoder, as seen by our decoder */
    strm st[NSTREAMS];
    queue q2c, q2b;
    struct work *next_free;
};

typedef struct conn {
    u32 sid, used, dirty;
    u32 nused;             /* stream slots in use (an upper bound of the open ones) */
    u32 dead;              /* client connection error: code + 1 */
    u32 chb_len, bhb_len;
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
    u64 ga_t;              /* when ga became 1 (0: before a tick) */
    u32 cli_goaway;
    u32 dec_taint;         /* the client's table may hold an entry not checked (check_field) */
    u32 b_taint;           /* the same for the backend's table */
    u32 cli_fin;           /* the client's FIN came: finish the streams in flight, then close */
    u32 c_cont_cost, b_cont_cost;  /* a header block's frames so far, 9 octets each + payload */
    u32 rst_tokens;        /* client resets still allowed (RST_BURST, RST_RATE a second) */
    u64 rst_t;             /* when rst_tokens was last refilled */
    /* The last HIST client stream ids (odd, up to max_cid), one bit each: opened, and reset
     * by us (RST_STREAM sent). Frames the client sent before it read our RST_STREAM are
     * ignored (RFC 9113 5.1); other frames on a closed stream are errors. */
    u64 hist_open[HIST / 64], hist_ours[HIST / 64];
    u32 b_maxcs;           /* the backend's SETTINGS_MAX_CONCURRENT_STREAMS */
    u32 b_maxhl;           /* the backend's SETTINGS_MAX_HEADER_LIST_SIZE (none: 2^32-1) */
    u64 fin_t;             /* after cli_fin: the FIN, or the last bytes sent since */
    u32 early;             /* streams marked F_EARLY since the last flush */
    u32 cin_pre;           /* while w is 0: the client's preface bytes seen (0 or 24) */
    u32 bdec_max;          /* while w is 0: the backend table's size, and its entries: */
    u32 bsnap_len;         /* bytes in bsnap (oldest first: nl, vl u16, sidx, name, value) */
    u32 waiting;           /* no work block: paused, bytes in inbox; FIFO order */
    u32 inbox_len;
    u64 stall_t;           /* when a tick first saw it hold a block for partial input alone */
    u64 pre_t;             /* when a tick first saw it without the client's preface */
    u64 stuck_t;           /* when a tick first saw frames queued toward the client since
                            * the last bytes sent to it (0: none waiting) */
    struct work *w;        /* the busy state, from the pool; 0 while idle */
    /* from here on: reset by their own init, not zeroed */
    struct fab_hpack_table dec;   /* the client's encoder, as seen by our decoder */
    u8 inbox[INBOX_CAP];
    u8 bsnap[BSNAP_CAP];
} conn;

/* Connections are allocated on first use (about 300 KiB each) and reused in allocation
 * order; conn_by_sid finds them by the host's stream id. */
static conn *conns[MAX_CONNS];
static u32 nconns_alloc;
FAB_TABLE(conn_by_sid, conn *, MAX_CONNS);
static u32 max_conns = MAX_CONNS;
static u32 hold_timeout_ms = 30000;
static u32 reopen_upstream;  /* config: a session outlives an upstream with nothing in flight */
static u32 have_now;
static u32 backend_state;  /* 0 unknown (try), 1 up, 2 down */
static u64 last_retry;
static u32 epoch;
static u32 budget;

/* counters reported with `count` actions at the end of each call */
enum { C_PINGS, C_HOLD_TIMEOUTS, C_REFUSED, C_PROTO_ERRORS, C_BACKEND_GOAWAYS, C_STREAMS,
       C_UP_TIMEOUTS, C_CONN_REFUSED, C_MALFORMED, C_TOO_LARGE, C_MALFORMED_RESP, C_STALLED,
       C_SEND_TIMEOUTS, C_EARLY, C_WORK_WAITS, C_PREFACE_TIMEOUTS, C_UP_REOPENED, NCOUNT };
static const char *const COUNT_NAME[NCOUNT] = {
    "pings_answered", "hold_timeouts", "streams_refused_h2", "protocol_errors",
    "backend_goaways", "requests", "upstream_timeouts", "connections_refused",
    "malformed_requests", "headers_too_large", "malformed_responses", "stalled_closed",
    "send_timeouts", "early_responses", "work_block_waits", "preface_timeouts",
    "upstreams_reopened"};
static u32 counts[NCOUNT], count_len[NCOUNT];

static u8 D[SCR_CAP], U[SCR_CAP];
static u32 dlen, ulen;
static u8 RE[RE_CAP];

static int room(u32 n) { return fab_action_count() + n + 1 <= budget; }

static void logmsg(u32 level, const char *msg) {
    if (room(2)) fab_log(level, msg);
}

/* ---- header blocks: decoded against the sender's table, re-encoded statelessly ---- */
typedef struct {
    struct fab_hpack_out o;
    u32 too_big, grpc, gto;
    u32 check;             /* CHECK_REQUEST, CHECK_TRAILERS, CHECK_RESPONSE, CHECK_RESP_TRAILERS,
                            * or 0: not checked */
    u32 status;            /* a response's :status, 0: none */
    u32 bad;               /* malformed (RFC 9113 8.1.1): a stream error PROTOCOL_ERROR */
    u32 regular, pseudo;   /* a regular field seen; the request pseudo-fields seen */
    u32 connect;           /* :method CONNECT */
    u32 options;           /* :method OPTIONS */
    u32 http;              /* :scheme http or https (any case) */
    u32 path;              /* :path's form: PATH_ORIGIN ("/..."), PATH_STAR ("*"), other */
    i64 clen;              /* content-length, -1: none */
    u32 list;              /* the decoded header list's size (RFC 7541 4.1: name + value + 32) */
    u32 table_ok;          /* every dynamic-table entry was checked when it went in */
} reenc;

#define CHECK_REQUEST 1
#define CHECK_TRAILERS 2
#define CHECK_RESPONSE 3
#define CHECK_RESP_TRAILERS 4
#define PS_STATUS 16
#define SI_STATUS 8
#define PS_METHOD 1
#define PS_SCHEME 2
#define PS_AUTHORITY 4
#define PS_PATH 8
#define PATH_ORIGIN 1
#define PATH_STAR 2
#define PATH_OTHER 3
/* static table indices (RFC 7541 A) of the names checked */
#define SI_AUTHORITY 1
#define SI_METHOD 2
#define SI_PATH 4
#define SI_SCHEME 6
#define SI_CONTENT_LENGTH 28
#define SI_HOST 38
#define SI_TRANSFER_ENCODING 57

/* Byte tests over 8 bytes at once: does v hold a byte below lo (at most 128), or equal
 * to x, y or z? The last step overlaps the one before; a value under 8 bytes is padded
 * with 0x80, a byte no test looks for. v is always the HPACK decoder's scratch buffer
 * (FAB_HPACK_STR_CAP bytes), so 8 bytes are there to read. Exact: no closer look. */
#define ONES 0x0101010101010101ull
#define HAS_ZERO(w) (((w) - ONES) & ~(w) & ONES * 0x80)

static int any_of(const u8 *v, u32 n, u32 lo, u32 x, u32 y, u32 z) {
    if (!n) return 0;
    for (u32 i = 0;; i += 8) {
        u64 w;
        if (n < 8) {
            __builtin_memcpy(&w, v, 8);
            u64 keep = (1ull << (8 * n)) - 1;
            w = (w & keep) | (~keep & ONES * 0x80);
        } else {
            if (i + 8 > n) i = n - 8;
            __builtin_memcpy(&w, v + i, 8);  /* one unaligned i64.load */
        }
        if (((w - ONES * lo) & ~w & ONES * 0x80) | HAS_ZERO(w ^ (ONES * x)) |
            HAS_ZERO(w ^ (ONES * y)) | HAS_ZERO(w ^ (ONES * z)))
            return 1;
        if (i + 8 >= n) return 0;
    }
}

/* RFC 9113 8.2.1: a value holds no NUL, CR or LF, and neither starts nor ends with SP or
 * HTAB. A CR or LF relayed to a backend that speaks HTTP/1 on would split the field in
 * two (header injection), whatever this hop's framing says. */
static int bad_value(const u8 *v, u32 n) {
    if (!n) return 0;
    if (v[0] == ' ' || v[0] == '\t' || v[n - 1] == ' ' || v[n - 1] == '\t') return 1;
    return any_of(v, n, 0, 0, '\n', '\r');
}

/* Byte classes of RFC 9110 5.6.2 (tchar: a method) and RFC 3986 3.1 (a scheme), as
 * 128-bit masks over ASCII; both values are short, and the common ones skip the scan. */
static const u64 TCHAR[2] = {0x3ff6cfa00000000ull, 0x57ffffffc7fffffeull};
static const u64 SCHEME[2] = {0x3ff680000000000ull, 0x7fffffe07fffffeull};

static int all_in(const u64 *set, const u8 *v, u32 n) {
    for (u32 i = 0; i < n; i++) {
        u8 b = v[i];
        if (b >= 128 || !((set[b >> 6] >> (b & 63)) & 1)) return 0;
    }
    return 1;
}

/* A pseudo-field's own syntax (RFC 9113 8.3.1): a method is a token, a scheme starts with
 * a letter, an authority has no userinfo ('@'), no path and no space, a path is visible
 * characters; noted for the checks at the block's end (CONNECT, OPTIONS *, an http(s)
 * path's form). */
static void check_pseudo(reenc *r, u32 bit, const u8 *v, u32 vl, int scan) {
    if (bit == PS_METHOD) {
        r->connect = vl == 7 && fab_memeq(v, "CONNECT", 7);
        r->options = vl == 7 && fab_memeq(v, "OPTIONS", 7);
        if (scan && (!vl || !all_in(TCHAR, v, vl))) r->bad = 1;
    } else if (bit == PS_SCHEME) {
        u32 l4 = vl >= 4 ? fab_le32(v) | 0x20202020u : 0;  /* lowercase, for "http" */
        r->http = l4 == 0x70747468u && (vl == 4 || (vl == 5 && (v[4] | 0x20) == 's'));
        if (scan && !r->http && (!vl || (v[0] | 0x20) < 'a' || (v[0] | 0x20) > 'z' ||
                                 !all_in(SCHEME, v, vl)))
            r->bad = 1;
    } else if (bit == PS_AUTHORITY) {
        if (scan && any_of(v, vl, 0x21, '@', '/', 0x7f)) r->bad = 1;
    } else {
        if (!vl) { r->bad = 1; return; }
        r->path = v[0] == '/' ? PATH_ORIGIN : vl == 1 && v[0] == '*' ? PATH_STAR : PATH_OTHER;
        if (scan && any_of(v, vl, 0x21, 0x7f, 0x7f, 0x7f)) r->bad = 1;
    }
}

/* A request's field against RFC 9113 8.2 and 8.3.1, so a malformed request is answered
 * here (RST_STREAM PROTOCOL_ERROR) and never wakes a backend: pseudo-fields known, once
 * each, before the regular ones and never in trailers; names lowercase and of token
 * characters; values without NUL, CR, LF or surrounding whitespace; no
 * connection-specific fields; te only "trailers"; one content-length. Static-table names
 * (most fields) skip the name's character scan. A value is scanned when it is a literal:
 * an indexed field's value is a static entry's, or a dynamic entry's that was scanned when
 * it went in as a literal (unless the table is tainted: a block not checked, or one found
 * malformed, may have put in an entry that would fail; then every value is scanned). */
static void check_field(reenc *r, const struct fab_hpack_field *f) {
    u32 si = f->static_name, nl = f->name_len, vl = f->value_len;
    const u8 *nm = f->name, *v = f->value;
    int scan = !f->indexed || (f->indexed > 61 && !r->table_ok);
    if (nl && nm[0] == ':' && r->check >= CHECK_RESPONSE) {
        /* a response: :status once, first, three digits (RFC 9113 8.3.2); nothing else */
        if (si != SI_STATUS || r->regular || r->check == CHECK_RESP_TRAILERS ||
            (r->pseudo & PS_STATUS) || vl != 3) {
            r->bad = 1;
            return;
        }
        r->pseudo |= PS_STATUS;
        for (u32 i = 0; i < 3; i++) {
            if (v[i] < '0' || v[i] > '9') { r->bad = 1; return; }
            r->status = r->status * 10 + (v[i] - '0');
        }
        return;
    }
    if (nl && nm[0] == ':') {  /* its own scan (check_pseudo) is stricter than bad_value's */
        u32 bit = si == SI_METHOD ? PS_METHOD : si == SI_SCHEME ? PS_SCHEME
                : si == SI_AUTHORITY ? PS_AUTHORITY : si == SI_PATH ? PS_PATH : 0;
        if (!bit || r->regular || r->check == CHECK_TRAILERS || (r->pseudo & bit)) {
            r->bad = 1;
            return;
        }
        r->pseudo |= bit;
        check_pseudo(r, bit, v, vl, scan);
        return;
    }
    if (scan && bad_value(v, vl)) { r->bad = 1; return; }
    r->regular = 1;
    if (si) {
        if (si == SI_TRANSFER_ENCODING) {
            r->bad = 1;
        } else if (si == SI_CONTENT_LENGTH && r->check == CHECK_REQUEST) {
            i64 x = 0;
            if (!vl || vl > 15) { r->bad = 1; return; }
            for (u32 i = 0; i < vl; i++) {
                if (v[i] < '0' || v[i] > '9') { r->bad = 1; return; }
                x = x * 10 + (v[i] - '0');
            }
            if (r->clen >= 0 && r->clen != x) r->bad = 1;
            r->clen = x;
        } else if (si == SI_HOST && r->check == CHECK_REQUEST && scan &&
                   any_of(v, vl, 0x21, '@', '/', 0x7f)) {
            r->bad = 1;  /* held to :authority's rules (RFC 9110 7.2: uri-host [":" port]) */
        }
        return;
    }
    if (!nl) { r->bad = 1; return; }
    for (u32 i = 0; scan && i < nl; i++) {  /* an indexed name was scanned as it went in */
        u8 b = nm[i];
        if (b <= 0x20 || (b >= 'A' && b <= 'Z') || b >= 0x7f || b == ':') { r->bad = 1; return; }
    }
    if (nl == 2 && nm[0] == 't' && nm[1] == 'e') {
        if (!(vl == 8 && fab_memeq(v, "trailers", 8))) r->bad = 1;
    } else if ((nl == 10 && (fab_memeq(nm, "connection", 10) || fab_memeq(nm, "keep-alive", 10))) ||
               (nl == 7 && fab_memeq(nm, "upgrade", 7)) ||
               (nl == 16 && fab_memeq(nm, "proxy-connection", 16))) {
        r->bad = 1;
    }
}

/* The pseudo-fields a request must have (8.3.1; CONNECT: 8.5). */
static void check_request_end(reenc *r) {
    if (r->check == CHECK_RESPONSE && !r->bad) r->bad = !(r->pseudo & PS_STATUS);
    if (r->check != CHECK_REQUEST || r->bad) return;
    if (!(r->pseudo & PS_METHOD)) r->bad = 1;
    else if (r->connect) r->bad = (r->pseudo & (PS_SCHEME | PS_PATH)) || !(r->pseudo & PS_AUTHORITY);
    else if ((r->pseudo & (PS_SCHEME | PS_PATH)) != (PS_SCHEME | PS_PATH)) r->bad = 1;
    /* http(s): origin form, or asterisk form for OPTIONS (RFC 9112 3.2) */
    else if (r->http) r->bad = !(r->path == PATH_ORIGIN || (r->path == PATH_STAR && r->options));
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

/* One decoded field: noted (gRPC) and re-encoded, unless the block outgrew RE. */
static void re_field(void *ctx, const struct fab_hpack_field *f) {
    reenc *r = ctx;
    if (f->name_len == 12 && fab_memeq(f->name, "content-type", 12) && f->value_len >= 16 &&
        fab_memeq(f->value, "application/grpc", 16))
        r->grpc = 1;
    if (f->name_len == 12 && fab_memeq(f->name, "grpc-timeout", 12))
        r->gto = parse_gto(f->value, f->value_len);
    if (r->check && !r->bad) check_field(r, f);
    r->list += f->name_len + f->value_len + 32;
    if (r->check && r->list > HLIST_ANNOUNCED) r->too_big = 1;  /* 431 (RFC 9113 10.5.1) */
    if (r->too_big) return;
    if (fab_hpack_encode_field(&r->o, f->name, f->name_len, f->value, f->value_len,
                               f->never_indexed, f->static_name))
        r->too_big = 1;
}

/* Decode a whole block into RE; 0 ok, or the connection error: COMPRESSION_ERROR for a
 * malformed block, ENHANCE_YOUR_CALM for a header list past HLIST_MAX decoded (a bomb). */
static u32 hp_decode(struct fab_hpack_table *t, const u8 *p, u32 len, reenc *r, u32 check,
                     u32 table_ok) {
    r->o.buf = RE;
    r->o.len = 0;
    r->o.cap = RE_CAP;
    r->too_big = r->grpc = r->gto = 0;
    r->check = check;
    r->bad = r->regular = r->pseudo = r->connect = r->options = r->http = r->path = 0;
    r->status = 0;
    r->clen = -1;
    r->list = 0;
    r->table_ok = table_ok;
    int e = fab_hpack_decode_max(t, p, len, HLIST_MAX, re_field, r);
    if (e) return e == -2 ? FAB_H2_ENHANCE_YOUR_CALM : FAB_H2_COMPRESSION_ERROR;
    check_request_end(r);
    return 0;
}

/* ---- queues of frames toward one peer: records of type, flags, sid, length, payload ---- */
static int q_push(queue *q, u32 type, u32 flags, u32 sid, const u8 *p, u32 n) {
    if (Q_CAP - q->len < 10 + n) return 0;
    u8 *r = q->buf + q->len;
    r[0] = (u8)type;
    r[1] = (u8)flags;
    fab_put_le32(r + 2, sid);
    fab_put_le32(r + 6, n);
    if (n) fab_copy(r + 10, p, n);
    q->len += 10 + n;
    return 1;
}

/* Remove the records of one stream (DATA only, or all); returns the DATA bytes removed. */
static u32 q_purge(queue *q, u32 sid, int data_only, u32 *removed) {
    u32 r = 0, w = 0, bytes = 0;
    *removed = 0;
    while (r < q->len) {
        u8 *rec = q->buf + r;
        u32 n = fab_le32(rec + 6), rl = 10 + n;
        if (fab_le32(rec + 2) == sid && (!data_only || rec[0] == FAB_H2_DATA)) {
            if (rec[0] == FAB_H2_DATA) bytes += n;
            (*removed)++;
        } else {
            if (w != r) fab_move(q->buf + w, rec, rl);
            w += rl;
        }
        r += rl;
    }
    q->len = w;
    return bytes;
}

static strm *find(conn *c, u32 id) {
    struct work *w = c->w;
    if (!id || id > c->max_cid || !w) return 0;
    strm *h = &w->st[(id >> 1) % NSTREAMS];  /* new_stream prefers this slot */
    if ((h->flags & F_USED) && h->id == id) return h;
    for (u32 i = 0; i < NSTREAMS; i++)
        if ((w->st[i].flags & F_USED) && w->st[i].id == id) return &w->st[i];
    return 0;
}

static int is_open(const strm *s) {
    return (s->flags & F_USED) && !(s->flags & F_RESET) &&
           !((s->flags & F_CLI_END) && (s->flags & F_SRV_END));
}

static u32 open_count(conn *c) {
    u32 n = 0;
    const struct work *w = c->w;
    if (!w) return 0;
    for (u32 i = 0; i < NSTREAMS; i++) n += is_open(&w->st[i]);
    return n;
}

/* ---- recent stream ids: a ring of bits over the last HIST odd ids ---- */
static int hist_in(const conn *c, u32 id) {
    return id && id <= c->max_cid && ((c->max_cid - id) >> 1) < HIST;
}

static int hist_get(const u64 *h, u32 id) {
    u32 k = (id >> 1) % HIST;
    return (int)((h[k >> 6] >> (k & 63)) & 1);
}

static void hist_set(u64 *h, u32 id) {
    u32 k = (id >> 1) % HIST;
    h[k >> 6] |= 1ull << (k & 63);
}

/* A new highest client stream id: the ids it skips were never opened (RFC 9113 5.1.1:
 * closed now), and the ring forgets what it held in their places. */
static void new_max_cid(conn *c, u32 id) {
    u32 from = c->max_cid ? (c->max_cid >> 1) + 1 : 0, to = id >> 1;
    if (to - from + 1 >= HIST) {
        for (u32 i = 0; i < HIST / 64; i++) c->hist_open[i] = c->hist_ours[i] = 0;
    } else {
        for (u32 k = from; k <= to; k++) {
            u32 b = k % HIST;
            c->hist_open[b >> 6] &= ~(1ull << (b & 63));
            c->hist_ours[b >> 6] &= ~(1ull << (b & 63));
        }
    }
    c->max_cid = id;
    hist_set(c->hist_open, id);
}

/* A frame on a client stream that is not open (closed, or never opened below max_cid):
 * 1 when it is to be ignored (we reset the stream: the client may have sent it before it
 * read our RST_STREAM; or it is older than the ring remembers), 0 when it is an error. */
static int late_frame(const conn *c, u32 id) {
    return !hist_in(c, id) || hist_get(c->hist_ours, id);
}

static void conn_error(conn *c, u32 code) {
    if (!c->dead) { c->dead = code + 1; counts[C_PROTO_ERRORS]++; }
    c->dirty = 1;
}

static void push2c(conn *c, strm *s, u32 type, u32 flags, u32 sid, const u8 *p, u32 n) {
    if (!q_push(&c->w->q2c, type, flags, sid, p, n)) { conn_error(c, FAB_H2_ENHANCE_YOUR_CALM); return; }
    if (s) s->qc++;
}

static int push2b(conn *c, strm *s, u32 type, u32 flags, u32 sid, const u8 *p, u32 n) {
    if (!q_push(&c->w->q2b, type, flags, sid, p, n)) return 0;
    if (s) s->qb++;
    return 1;
}

static void rst2c(conn *c, strm *s, u32 sid, u32 code) {
    u8 b[4];
    if (code == FAB_H2_REFUSED_STREAM) counts[C_REFUSED]++;
    if (hist_in(c, sid)) hist_set(c->hist_ours, sid);
    fab_put_be32(b, code);
    push2c(c, s, FAB_H2_RST_STREAM, 0, sid, b, 4);
}

/* s (or 0) counts the record, so the stream stays open toward the backend's limit
 * (SETTINGS_MAX_CONCURRENT_STREAMS) until the RST_STREAM is written. */
static void rst2b(conn *c, strm *s, u32 sid, u32 code) {
    u8 b[4];
    fab_put_be32(b, code);
    push2b(c, s, FAB_H2_RST_STREAM, 0, sid, b, 4);
}

static void goaway2c(conn *c, u32 last, u32 code) {
    u8 b[8];
    fab_put_be32(b, last);
    fab_put_be32(b + 4, code);
    push2c(c, 0, FAB_H2_GOAWAY, 0, 0, b, 8);
}

/* Forget what is queued toward the client for s (DATA from the backend): credit the
 * backend's connection window for it, since those bytes will never be handed on. */
static void purge_to_client(conn *c, strm *s) {
    u32 removed;
    c->b_credit += q_purge(&c->w->q2c, s->id, 1, &removed);
    s->qc -= removed;
}

static void purge_to_backend(conn *c, strm *s) {
    u32 removed;
    c->c_credit += q_purge(&c->w->q2b, s->id, 0, &removed);
    s->qb -= removed;
    s->flags &= ~F_QUEUED_UP;
}

/* A stream error toward the client (RST_STREAM with code): the stream ends both ways,
 * what was queued for it is dropped (and credited), and a backend that had the request
 * gets RST_STREAM(CANCEL). s may be 0 (a stream with no slot). */
static int reset_allowed(conn *c);

static void stream_error(conn *c, strm *s, u32 sid, u32 code) {
    if (s && is_open(s)) {
        /* resets the client provokes cost the backend what its own resets do ("MadeYouReset",
         * CVE-2025-8671): they take from the same tokens */
        if (!reset_allowed(c)) { conn_error(c, FAB_H2_ENHANCE_YOUR_CALM); return; }
        u32 sent = (s->flags & F_SENT_UP) != 0;
        purge_to_client(c, s);
        purge_to_backend(c, s);
        if (sent && c->up == UP_OPEN) rst2b(c, s, sid, FAB_H2_CANCEL);
        s->flags |= F_RESET;
    }
    rst2c(c, s, sid, code);
}

/* ---- local answers to the client (never touch its dynamic table) ---- */
/* Their header blocks, encoded once at init: 503, 431, 502, gRPC UNAVAILABLE (14) and
 * DEADLINE_EXCEEDED (4) as Trailers-Only. */
enum { LR_503, LR_431, LR_502, LR_GRPC_UNAVAILABLE, LR_GRPC_DEADLINE, NLR };
static u8 lr_block[NLR][112];
static u32 lr_len[NLR];

static void build_reply(u32 k, const char *status, const char *grpc_status, const char *msg) {
    struct fab_hpack_out o = {lr_block[k], 0, sizeof lr_block[k]};
    fab_hpack_encode_header(&o, ":status", status);
    if (grpc_status) {
        fab_hpack_encode_header(&o, "content-type", "application/grpc");
        fab_hpack_encode_header(&o, "grpc-status", grpc_status);
        fab_hpack_encode_header(&o, "grpc-message", msg);
    } else {
        fab_hpack_encode_header(&o, "content-length", "0");
    }
    lr_len[k] = o.len;
}

static void build_replies(void) {
    build_reply(LR_503, "503", 0, 0);
    build_reply(LR_431, "431", 0, 0);
    build_reply(LR_502, "502", 0, 0);
    build_reply(LR_GRPC_UNAVAILABLE, "200", "14", "backend unavailable");
    build_reply(LR_GRPC_DEADLINE, "200", "4", "deadline exceeded while the backend woke");
}

static void local_reply(conn *c, strm *s, u32 kind) {
    if (!(s->flags & F_SENT_UP)) purge_to_backend(c, s);
    push2c(c, s, FAB_H2_HEADERS, FAB_H2_END_STREAM | FAB_H2_END_HEADERS, s->id, lr_block[kind],
           lr_len[kind]);
    s->flags |= F_LOCAL | F_SRV_END;
    if (!(s->flags & F_CLI_END)) {
        rst2c(c, s, s->id, FAB_H2_NO_ERROR);  /* RFC 9113 8.1: complete response, stop sending */
        s->flags |= F_RESET;
    }
}

/* ---- the backend connection went away: refuse what it never processed ---- */
static void start_goaway(conn *c) {
    if (c->ga) return;
    goaway2c(c, 0x7fffffff, FAB_H2_NO_ERROR);
    push2c(c, 0, FAB_H2_PING, 0, 0, (const u8 *)GOAWAY_PING, 8);
    c->ga = 1;
    c->ga_t = fab_now();
}

static void backend_gone(conn *c) {
    if (c->up == UP_GONE) return;
    c->up = UP_GONE;
    c->dirty = 1;
    for (u32 i = 0; i < NSTREAMS; i++) {
        strm *s = &c->w->st[i];
        if (!(s->flags & F_USED)) continue;
        purge_to_backend(c, s);
        if (!is_open(s)) continue;
        if (!(s->flags & F_SENT_UP) || s->id > c->b_last) {
            rst2c(c, s, s->id, FAB_H2_REFUSED_STREAM);
        } else {
            rst2c(c, s, s->id, FAB_H2_INTERNAL_ERROR);
        }
        s->flags |= F_RESET;
    }
    c->w->q2b.len = 0;
    start_goaway(c);
}

/* A stream the backend accepted (up to `last`, its GOAWAY's) and has not finished: what
 * its going away would lose. */
static int in_flight(conn *c, u32 last) {
    struct work *w = c->w;
    for (u32 i = 0; w && i < NSTREAMS; i++) {
        strm *s = &w->st[i];
        if (is_open(s) && (s->flags & F_SENT_UP) && s->id <= last) return 1;
    }
    return 0;
}

/* reopen_upstream: the backend closed or sent GOAWAY with nothing of this connection in
 * flight (a stop, a restart, its own idle timeout). The client's session stays; the
 * upstream is forgotten as if never opened, and the next request (or one held now) opens
 * a new one, which wakes the backend when it sleeps. Requests toward the backend are
 * re-encoded without its dynamic table, so they are valid on any new connection; its
 * table toward us starts empty again. Stream ids go on from the client's (a new
 * connection may start at any odd id, RFC 9113 5.1.1). */
static void drop_upstream(conn *c) {
    if (c->up == UP_OPEN || c->up == UP_CONNECTING) fab_upstream_close(c->sid);
    c->up = UP_NONE;
    c->up_preface = c->up_close = 0;
    c->b_settings = c->b_goaway = 0;
    c->b_last = 0x7fffffff;
    c->b_cont = c->b_cont_flags = c->b_cont_cost = c->bhb_len = 0;
    c->b_tsu = c->b_taint = 0;
    c->b_send = c->b_recv = c->b_init = WIN0;
    c->b_credit = 0;
    c->b_maxf = MAXF;
    c->b_maxcs = c->b_maxhl = 0xffffffff;
    c->bdec_max = FAB_HPACK_TABLE_SIZE;
    c->bsnap_len = 0;
    counts[C_UP_REOPENED]++;
    struct work *w = c->w;
    if (!w) return;
    fab_h2_reader_init(&w->bin, 0);
    fab_hpack_decoder_init(&w->bdec);
    w->bdec.max = FAB_HPACK_TABLE_SIZE;
    /* toward the backend, keep only what held requests (never sent) queued there */
    queue *q = &w->q2b;
    u32 r = 0, k = 0;
    while (r < q->len) {
        u8 *rec = q->buf + r;
        u32 sid = fab_le32(rec + 2), n = fab_le32(rec + 6), rl = 10 + n;
        strm *s = sid ? find(c, sid) : 0;
        if (s && is_open(s) && !(s->flags & F_SENT_UP)) {
            if (k != r) fab_move(q->buf + k, rec, rl);
            k += rl;
        } else {
            if (rec[0] == FAB_H2_DATA) c->c_credit += n;
            if (s) s->qb--;
        }
        r += rl;
    }
    q->len = k;
    for (u32 i = 0; i < NSTREAMS; i++) {
        strm *s = &w->st[i];
        if (!(s->flags & F_USED)) continue;
        s->b_credit = 0;
        if (!(s->flags & F_SENT_UP)) { s->b_send = WIN0; s->b_recv = WIN0; }
    }
    c->dirty = 1;
}

static void up_error(conn *c, u32 code) {
    if (c->up != UP_OPEN) return;
    c->up_close = code + 1;
    backend_gone(c);
}

/* ---- frames from the client ---- */
static void apply_cli_settings(conn *c, const struct fab_h2_frame *f) {
    for (u32 i = 0, id, v; fab_h2_setting(f, &i, &id, &v);) {
        u32 err = fab_h2_setting_error(id, v);
        if (err) { conn_error(c, err); return; }
        if (id == FAB_H2_SETTINGS_HEADER_TABLE_SIZE) {
            c->c_tsu = 1;  /* our encoder uses no table: say so (size 0) in the next block */
        } else if (id == FAB_H2_SETTINGS_INITIAL_WINDOW_SIZE) {
            i64 d = (i64)v - c->c_init;
            c->c_init = v;
            for (u32 k = 0; k < NSTREAMS; k++) {
                strm *s = &c->w->st[k];
                if (!(s->flags & F_USED)) continue;
                s->c_send += d;
                /* RFC 9113 6.9.2: a window pushed past 2^31-1 is a connection error */
                if (s->c_send > FAB_H2_MAX_WINDOW) { conn_error(c, FAB_H2_FLOW_CONTROL_ERROR); return; }
            }
        } else if (id == FAB_H2_SETTINGS_MAX_FRAME_SIZE) {
            c->c_maxf = v;
        }
    }
}

static strm *new_stream(conn *c, u32 id) {
    for (u32 k = 0; k < NSTREAMS; k++) {
        strm *s = &c->w->st[((id >> 1) + k) % NSTREAMS];
        if (s->flags & F_USED) continue;
        fab_zero(s, sizeof *s);
        s->id = id;
        s->flags = F_USED;
        s->clen = -1;
        s->c_send = c->c_init;
        s->b_send = c->b_init;
        s->c_recv = WIN0;
        s->b_recv = WIN0;
        if (have_now) { s->t0 = fab_now(); s->flags |= F_TSET; }
        c->nused++;
        return s;
    }
    return 0;
}

static void cli_header_block(conn *c, u32 sid, u32 flags) {
    reenc r;
    strm *s = find(c, sid);
    u32 check = sid > c->max_cid ? CHECK_REQUEST
              : s && is_open(s) && !(s->flags & F_CLI_END) ? CHECK_TRAILERS : 0;
    u32 err = hp_decode(&c->dec, c->w->chb, c->chb_len, &r, check, !c->dec_taint);
    if (err) { conn_error(c, err); return; }
    if (!check || r.bad) c->dec_taint = 1;  /* what it put in the table was not all checked */
    int end = (flags & FAB_H2_END_STREAM) != 0;
    if (sid <= c->max_cid) {
        if (!s || !is_open(s)) {
            /* decoded for the table either way; in flight before our RST_STREAM: ignored;
             * else a closed stream (STREAM_CLOSED) or an id going backwards (5.1.1) */
            if (late_frame(c, sid)) return;
            conn_error(c, hist_get(c->hist_open, sid) ? FAB_H2_STREAM_CLOSED : FAB_H2_PROTOCOL_ERROR);
            return;
        }
        if (s->flags & F_CLI_END) { stream_error(c, s, sid, FAB_H2_STREAM_CLOSED); return; }
        if (!end || (flags & FLAG_SELFDEP) || r.bad ||
            (s->clen >= 0 && s->body != (u64)s->clen)) {
            counts[C_MALFORMED]++;
            stream_error(c, s, sid, FAB_H2_PROTOCOL_ERROR);
            return;
        }
        s->flags |= F_CLI_END;
        if (s->flags & (F_LOCAL | F_RESET)) return;
        if (r.too_big) counts[C_TOO_LARGE]++;
        if (r.too_big || !push2b(c, s, FAB_H2_HEADERS, FAB_H2_END_STREAM, sid, RE, r.o.len)) {
            rst2c(c, s, sid, FAB_H2_ENHANCE_YOUR_CALM);
            s->flags |= F_RESET;
            if (s->flags & F_SENT_UP) {
                purge_to_backend(c, s);
                rst2b(c, s, sid, FAB_H2_CANCEL);
            }
        }
        return;
    }
    new_max_cid(c, sid);
    if ((flags & FLAG_SELFDEP) || r.bad || (end && r.clen > 0)) {
        counts[C_MALFORMED]++;
        rst2c(c, 0, sid, FAB_H2_PROTOCOL_ERROR);  /* malformed: answered here, no backend */
        return;
    }
    if (c->up == UP_GONE || c->b_goaway || c->cli_goaway || c->ga == 2) {
        rst2c(c, 0, sid, FAB_H2_REFUSED_STREAM);
        return;
    }
    /* Past the concurrency we announced (RFC 9113 5.1.2) the client provokes the reset:
     * it takes a token like one of its own (the rapid-reset pattern whose resets leave
     * the slots taken went on refused, stream after stream, and never met the bucket) */
    s = c->nused >= MAX_OPEN && open_count(c) >= MAX_OPEN ? 0 : new_stream(c, sid);
    if (!s) {
        if (!reset_allowed(c)) { conn_error(c, FAB_H2_ENHANCE_YOUR_CALM); return; }
        rst2c(c, 0, sid, FAB_H2_REFUSED_STREAM);
        return;
    }
    counts[C_STREAMS]++;
    if (end) s->flags |= F_CLI_END;
    s->clen = r.clen;
    s->hlist = r.list;
    if (r.grpc) { s->flags |= F_GRPC; s->gto = r.gto; }
    if (r.too_big || r.list > c->b_maxhl) {  /* ours, or the backend's (6.5.2) */
        counts[C_TOO_LARGE]++;
        local_reply(c, s, LR_431);
        return;
    }
    if (!push2b(c, s, FAB_H2_HEADERS, end ? FAB_H2_END_STREAM : 0, sid, RE, r.o.len)) {
        s->flags |= F_RESET;
        rst2c(c, s, sid, FAB_H2_REFUSED_STREAM);
        return;
    }
    s->flags |= F_QUEUED_UP;
}

/* A client stream id that names no stream the client may have opened: 0, an even id
 * (we push nothing), or one above the highest it opened (idle): PROTOCOL_ERROR. */
static int idle_id(const conn *c, u32 sid) {
    return !sid || !(sid & 1) || sid > c->max_cid;
}

/* Rapid reset (CVE-2023-44487): each client RST_STREAM of an open stream takes a token;
 * RST_BURST of them, RST_RATE more a second. A client past that is abusing us. */
static int reset_allowed(conn *c) {
    u64 now = fab_now();
    if (now > c->rst_t) {
        u64 add = (now - c->rst_t) * RST_RATE / 1000;
        if (add) {
            u64 t = c->rst_tokens + add;
            c->rst_tokens = t > RST_BURST ? RST_BURST : (u32)t;
            c->rst_t = now;
        }
    } else if (now < c->rst_t) {
        c->rst_t = now;
    }
    if (!c->rst_tokens) return 0;
    c->rst_tokens--;
    return 1;
}

static void cli_frame(conn *c, const struct fab_h2_frame *f) {
    u32 type = f->type, flags = f->flags, sid = f->sid, n = f->len;
    const u8 *p = f->payload, *d;
    u32 dl;
    if (!c->cli_settings) {
        if (type != FAB_H2_SETTINGS || (flags & FAB_H2_ACK)) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        c->cli_settings = 1;
    }
    if (c->c_cont) {
        if (type != FAB_H2_CONTINUATION || sid != c->c_cont) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        /* each frame costs its header too, so a flood of empty CONTINUATIONs is bounded
         * like a big block (CVE-2024-27316 and kin) */
        c->c_cont_cost += FAB_H2_HDR + n;
        if (n > HB_CAP - c->chb_len || c->c_cont_cost > HB_CAP) {
            conn_error(c, FAB_H2_ENHANCE_YOUR_CALM);
            return;
        }
        fab_copy(c->w->chb + c->chb_len, p, n);
        c->chb_len += n;
        if (flags & FAB_H2_END_HEADERS) {
            c->c_cont = 0;
            cli_header_block(c, sid, c->c_cont_flags);
        }
        return;
    }
    switch (type) {
    case FAB_H2_DATA: {
        if (idle_id(c, sid)) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (fab_h2_strip(f, &d, &dl)) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if ((i64)n > c->c_recv) { conn_error(c, FAB_H2_FLOW_CONTROL_ERROR); return; }
        c->c_recv -= n;
        strm *s = find(c, sid);
        if (!s || !is_open(s) || (s->flags & F_CLI_END) || (s->flags & F_LOCAL)) {
            c->c_credit += n;  /* consumed here: nobody else will see it */
            if (s && is_open(s) && (s->flags & F_CLI_END)) {
                stream_error(c, s, sid, FAB_H2_STREAM_CLOSED);  /* half-closed (remote) */
            } else if ((!s || !is_open(s)) && !late_frame(c, sid)) {
                rst2c(c, 0, sid, FAB_H2_STREAM_CLOSED);  /* closed (RFC 9113 6.1) */
            }
            return;
        }
        if ((i64)n > s->c_recv) {
            c->c_credit += n;
            stream_error(c, s, sid, FAB_H2_FLOW_CONTROL_ERROR);
            return;
        }
        int end = (flags & FAB_H2_END_STREAM) != 0;
        if (s->clen >= 0) {  /* RFC 9113 8.1.1: the body must match its content-length */
            u64 b = s->body + dl;
            if (b > (u64)s->clen || (end && b != (u64)s->clen)) {
                c->c_credit += n;
                counts[C_MALFORMED]++;
                stream_error(c, s, sid, FAB_H2_PROTOCOL_ERROR);
                return;
            }
            s->body = b;
        }
        s->c_recv -= n;
        c->c_credit += n - dl;  /* padding: consumed here */
        s->c_credit += n - dl;
        if (end) s->flags |= F_CLI_END;
        if (dl || end) {
            if (!push2b(c, s, FAB_H2_DATA, end ? FAB_H2_END_STREAM : 0, sid, d, dl))
                conn_error(c, FAB_H2_ENHANCE_YOUR_CALM);
        }
        return;
    }
    case FAB_H2_HEADERS:
        if (!sid || !(sid & 1)) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (fab_h2_strip(f, &d, &dl)) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (dl > HB_CAP) { conn_error(c, FAB_H2_ENHANCE_YOUR_CALM); return; }
        if (flags & FAB_H2_PRIORITY_FLAG) {
            u32 dep = fab_be32(p + ((flags & FAB_H2_PADDED) ? 1 : 0)) & 0x7fffffff;
            if (dep == sid) flags |= FLAG_SELFDEP;  /* a stream error, once decoded (5.3.1) */
        }
        fab_copy(c->w->chb, d, dl);
        c->chb_len = dl;
        if (flags & FAB_H2_END_HEADERS) {
            cli_header_block(c, sid, flags);
        } else {
            c->c_cont = sid;
            c->c_cont_flags = flags;
            c->c_cont_cost = FAB_H2_HDR + n;
        }
        return;
    case FAB_H2_PRIORITY: {
        if (!sid) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (fab_h2_bad_size(f)) { conn_error(c, FAB_H2_FRAME_SIZE_ERROR); return; }
        if ((fab_be32(p) & 0x7fffffff) != sid) return;  /* tolerated, dropped (RFC 9113 5.3.2) */
        strm *s = find(c, sid);
        /* a stream cannot depend on itself (5.3.1): a stream error on an open stream; one
         * that is idle or closed cannot be reset, so the connection */
        if (s && is_open(s)) stream_error(c, s, sid, FAB_H2_PROTOCOL_ERROR);
        else conn_error(c, FAB_H2_PROTOCOL_ERROR);
        return;
    }
    case FAB_H2_RST_STREAM: {
        if (idle_id(c, sid)) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (fab_h2_bad_size(f)) { conn_error(c, FAB_H2_FRAME_SIZE_ERROR); return; }
        strm *s = find(c, sid);
        if (!s) return;
        if (s->flags & F_RESET) {
            /* a complete response still queued ahead of our (or the backend's) RST_STREAM:
             * the client wants none of it now; its window would never move it */
            if (s->qc) {
                u32 removed;
                c->b_credit += q_purge(&c->w->q2c, sid, 0, &removed);
                s->qc -= removed;
            }
            return;
        }
        if (is_open(s) && !reset_allowed(c)) { conn_error(c, FAB_H2_ENHANCE_YOUR_CALM); return; }
        s->flags |= F_RESET;
        purge_to_client(c, s);
        purge_to_backend(c, s);
        if ((s->flags & F_SENT_UP) && c->up == UP_OPEN)
            push2b(c, s, FAB_H2_RST_STREAM, 0, sid, p, 4);
        return;
    }
    case FAB_H2_SETTINGS:
        if (sid) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (fab_h2_bad_size(f)) { conn_error(c, FAB_H2_FRAME_SIZE_ERROR); return; }
        if (flags & FAB_H2_ACK) return;
        apply_cli_settings(c, f);
        push2c(c, 0, FAB_H2_SETTINGS, FAB_H2_ACK, 0, 0, 0);
        return;
    case FAB_H2_PUSH_PROMISE:
        conn_error(c, FAB_H2_PROTOCOL_ERROR);
        return;
    case FAB_H2_PING:
        if (sid) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (fab_h2_bad_size(f)) { conn_error(c, FAB_H2_FRAME_SIZE_ERROR); return; }
        if (flags & FAB_H2_ACK) {
            if (c->ga == 1 && fab_memeq(p, GOAWAY_PING, 8)) {
                goaway2c(c, c->max_cid, FAB_H2_NO_ERROR);
                c->ga = 2;
            }
            return;
        }
        push2c(c, 0, FAB_H2_PING, FAB_H2_ACK, 0, p, 8);
        counts[C_PINGS]++;
        return;
    case FAB_H2_GOAWAY:
        if (sid) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (fab_h2_bad_size(f)) { conn_error(c, FAB_H2_FRAME_SIZE_ERROR); return; }
        c->cli_goaway = 1;
        return;
    case FAB_H2_WINDOW_UPDATE: {
        if (fab_h2_bad_size(f)) { conn_error(c, FAB_H2_FRAME_SIZE_ERROR); return; }
        u32 inc = fab_be32(p) & 0x7fffffff;
        if (!sid) {
            if (!inc) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
            c->c_send += inc;
            if (c->c_send > FAB_H2_MAX_WINDOW) conn_error(c, FAB_H2_FLOW_CONTROL_ERROR);
            return;
        }
        if (idle_id(c, sid)) { conn_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        strm *s = find(c, sid);
        /* closed both ways may still have frames queued toward the client: a complete
         * response ahead of an RST_STREAM(NO_ERROR) still moves with the client's window */
        if (!s) return;
        if (s->flags & F_RESET) {
            if (s->qc) {
                s->c_send += inc;
                if (s->c_send > FAB_H2_MAX_WINDOW) s->c_send = FAB_H2_MAX_WINDOW;
            }
            return;
        }
        if (!inc) { stream_error(c, s, sid, FAB_H2_PROTOCOL_ERROR); return; }
        s->c_send += inc;
        if (s->c_send > FAB_H2_MAX_WINDOW) stream_error(c, s, sid, FAB_H2_FLOW_CONTROL_ERROR);
        return;
    }
    case FAB_H2_CONTINUATION:
        conn_error(c, FAB_H2_PROTOCOL_ERROR);
        return;
    default:
        return;  /* unknown types (PRIORITY_UPDATE, extensions) are ignored (RFC 9113 5.5) */
    }
}

static void cli_input(conn *c, const u8 *p, u32 n) {
    struct fab_h2_frame f;
    i32 r = 0;
    while (!c->dead && (r = fab_h2_next(&c->w->cin, &p, &n, &f)) > 0) cli_frame(c, &f);
    if (!c->dead && r < 0) conn_error(c, (u32)-r);
}

/* ---- frames from the backend ---- */
/* A malformed response (RFC 9113 8.1.1): an intermediary must not relay it. The backend's
 * stream is reset (PROTOCOL_ERROR); the client gets a 502 if nothing final went to it
 * yet, else (bad trailers) RST_STREAM(INTERNAL_ERROR). Late backend frames: dropped. */
static void bad_response(conn *c, strm *s, u32 sid) {
    counts[C_MALFORMED_RESP]++;
    purge_to_backend(c, s);
    rst2b(c, s, sid, FAB_H2_PROTOCOL_ERROR);
    if (!(s->flags & F_FINAL)) {
        local_reply(c, s, LR_502);
    } else {
        purge_to_client(c, s);
        rst2c(c, s, sid, FAB_H2_INTERNAL_ERROR);
    }
    s->flags |= F_RESET;
}

/* The backend's END_STREAM, its response complete. If the client is still sending its
 * request, the upload is stopped at the next flush (early_responses) unless the backend
 * stops it itself first (its RST_STREAM, relayed in order behind the response). */
static void srv_end(conn *c, strm *s) {
    s->flags |= F_SRV_END;
    if (!(s->flags & F_CLI_END)) {
        s->flags |= F_EARLY;
        c->early++;
    }
}

/* A backend header block: decoded against the backend's table (so that table stays in
 * step whatever becomes of the stream) and re-encoded for the client without the dynamic
 * table, like requests the other way: blocks then need no order between streams. */
static void b_header_block(conn *c, u32 sid, u32 flags) {
    reenc r;
    strm *s = find(c, sid);
    u32 check = !s || (s->flags & (F_RESET | F_SRV_END)) ? 0
              : (s->flags & F_FINAL) ? CHECK_RESP_TRAILERS : CHECK_RESPONSE;
    u32 err = hp_decode(&c->w->bdec, c->w->bhb, c->bhb_len, &r, check, !c->b_taint);
    if (err) { up_error(c, err); return; }
    if (!check || r.bad) c->b_taint = 1;
    int end = (flags & FAB_H2_END_STREAM) != 0;
    if (!s || (s->flags & F_RESET)) return;  /* the client reset it: decoded, dropped */
    if (s->flags & F_SRV_END) {
        /* HEADERS after the backend's END_STREAM (half-closed remote, 5.1): not relayed */
        counts[C_MALFORMED_RESP]++;
        purge_to_backend(c, s);
        rst2b(c, s, sid, FAB_H2_STREAM_CLOSED);
        if (!(s->flags & F_CLI_END)) rst2c(c, s, sid, FAB_H2_NO_ERROR);
        s->flags |= F_RESET;
        return;
    }
    /* 8.1: a 1xx never ends the stream, 101 does not exist in HTTP/2 (8.6), trailers do */
    u32 info = check == CHECK_RESPONSE && r.status >= 100 && r.status < 200;
    if (r.bad || (info && (end || r.status == 101)) || (check == CHECK_RESP_TRAILERS && !end)) {
        bad_response(c, s, sid);
        return;
    }
    if (r.too_big) {
        purge_to_client(c, s);
        rst2c(c, s, sid, FAB_H2_INTERNAL_ERROR);
        purge_to_backend(c, s);
        rst2b(c, s, sid, FAB_H2_CANCEL);
        s->flags |= F_RESET;
        return;
    }
    if (!q_push(&c->w->q2c, FAB_H2_HEADERS, end ? FAB_H2_END_STREAM : 0, sid, RE, r.o.len)) {
        conn_error(c, FAB_H2_INTERNAL_ERROR);
        return;
    }
    s->qc++;
    s->flags |= F_RESP;
    if (check == CHECK_RESPONSE && !info) s->flags |= F_FINAL;
    if (end) srv_end(c, s);
}

static void b_frame(conn *c, const struct fab_h2_frame *f) {
    u32 type = f->type, flags = f->flags, sid = f->sid, n = f->len;
    const u8 *p = f->payload, *d;
    u32 dl;
    if (!c->b_settings) {
        if (type != FAB_H2_SETTINGS || (flags & FAB_H2_ACK)) { up_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        c->b_settings = 1;
    }
    if (c->b_cont) {
        if (type != FAB_H2_CONTINUATION || sid != c->b_cont) { up_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        c->b_cont_cost += FAB_H2_HDR + n;  /* empty CONTINUATIONs are bounded too */
        if (n > HB_CAP - c->bhb_len || c->b_cont_cost > HB_CAP) {
            up_error(c, FAB_H2_ENHANCE_YOUR_CALM);
            conn_error(c, FAB_H2_INTERNAL_ERROR);
            return;
        }
        fab_copy(c->w->bhb + c->bhb_len, p, n);
        c->bhb_len += n;
        if (flags & FAB_H2_END_HEADERS) {
            c->b_cont = 0;
            b_header_block(c, sid, c->b_cont_flags);
        }
        return;
    }
    switch (type) {
    case FAB_H2_DATA: {
        if (!sid || sid > c->max_upid) { up_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (fab_h2_strip(f, &d, &dl)) { up_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if ((i64)n > c->b_recv) { up_error(c, FAB_H2_FLOW_CONTROL_ERROR); return; }
        c->b_recv -= n;
        strm *s = find(c, sid);
        if (!s || (s->flags & (F_RESET | F_SRV_END)) || !(s->flags & F_SENT_UP)) {
            c->b_credit += n;
            return;
        }
        if ((i64)n > s->b_recv) { up_error(c, FAB_H2_FLOW_CONTROL_ERROR); return; }
        if (!(s->flags & F_FINAL)) {  /* DATA before the response's headers: malformed */
            c->b_credit += n;
            bad_response(c, s, sid);
            return;
        }
        s->b_recv -= n;
        c->b_credit += n - dl;
        s->b_credit += n - dl;
        int end = (flags & FAB_H2_END_STREAM) != 0;
        if (end) srv_end(c, s);
        if (dl || end) {
            if (!q_push(&c->w->q2c, FAB_H2_DATA, end ? FAB_H2_END_STREAM : 0, sid, d, dl)) {
                conn_error(c, FAB_H2_INTERNAL_ERROR);
                return;
            }
            s->qc++;
        }
        return;
    }
    case FAB_H2_HEADERS:
        if (!sid || sid > c->max_upid) { up_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (fab_h2_strip(f, &d, &dl)) { up_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (dl > HB_CAP) {
            up_error(c, FAB_H2_ENHANCE_YOUR_CALM);
            conn_error(c, FAB_H2_INTERNAL_ERROR);
            return;
        }
        fab_copy(c->w->bhb, d, dl);
        c->bhb_len = dl;
        if (flags & FAB_H2_END_HEADERS) {
            b_header_block(c, sid, flags);
        } else {
            c->b_cont = sid;
            c->b_cont_flags = flags;
            c->b_cont_cost = FAB_H2_HDR + n;
        }
        return;
    case FAB_H2_RST_STREAM: {
        if (fab_h2_bad_size(f)) { up_error(c, FAB_H2_FRAME_SIZE_ERROR); return; }
        if (!sid || sid > c->max_upid) { up_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        strm *s = find(c, sid);
        if (!s || (s->flags & F_RESET)) return;
        if (!(s->flags & F_SRV_END)) purge_to_client(c, s);
        else if (!(s->flags & F_CLI_END) && fab_be32(p) == FAB_H2_NO_ERROR) counts[C_EARLY]++;
        /* after a complete response, the client's window still moves the response queued
         * ahead of this RST_STREAM (its WINDOW_UPDATEs are applied while qc > 0) */
        purge_to_backend(c, s);
        push2c(c, s, FAB_H2_RST_STREAM, 0, sid, p, 4);
        if (hist_in(c, sid)) hist_set(c->hist_ours, sid);  /* reset by us, to the client */
        s->flags |= F_RESET;
        return;
    }
    case FAB_H2_SETTINGS:
        if (sid) { up_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (flags & FAB_H2_ACK) return;
        if (fab_h2_bad_size(f)) { up_error(c, FAB_H2_FRAME_SIZE_ERROR); return; }
        u32 hl = 0;
        for (u32 i = 0, id, v; fab_h2_setting(f, &i, &id, &v);) {
            u32 err = id == FAB_H2_SETTINGS_ENABLE_PUSH ? 0 : fab_h2_setting_error(id, v);
            if (err) { up_error(c, err); return; }
            if (id == FAB_H2_SETTINGS_HEADER_TABLE_SIZE) {
                c->b_tsu = 1;
            } else if (id == FAB_H2_SETTINGS_INITIAL_WINDOW_SIZE) {
                i64 dw = (i64)v - c->b_init;
                c->b_init = v;
                for (u32 k = 0; k < NSTREAMS; k++) {
                    strm *s = &c->w->st[k];
                    if (!(s->flags & F_USED)) continue;
                    s->b_send += dw;
                    if (s->b_send > FAB_H2_MAX_WINDOW) { up_error(c, FAB_H2_FLOW_CONTROL_ERROR); return; }
                }
            } else if (id == FAB_H2_SETTINGS_MAX_FRAME_SIZE) {
                c->b_maxf = v;
            } else if (id == FAB_H2_SETTINGS_MAX_CONCURRENT_STREAMS) {
                c->b_maxcs = v;
            } else if (id == FAB_H2_SETTINGS_MAX_HEADER_LIST_SIZE) {
                c->b_maxhl = v;
                hl = 1;
            }
        }
        /* held requests (none is sent before these SETTINGS) past the backend's header
         * list size: answered 431 here rather than sent to be refused (RFC 9113 6.5.2) */
        for (u32 k = 0; hl && k < NSTREAMS; k++) {
            strm *s = &c->w->st[k];
            if (is_open(s) && (s->flags & F_QUEUED_UP) && !(s->flags & F_SENT_UP) &&
                !(s->flags & F_LOCAL) && s->hlist > c->b_maxhl) {
                counts[C_TOO_LARGE]++;
                local_reply(c, s, LR_431);
            }
        }
        push2b(c, 0, FAB_H2_SETTINGS, FAB_H2_ACK, 0, 0, 0);
        return;
    case FAB_H2_PUSH_PROMISE:
        up_error(c, FAB_H2_PROTOCOL_ERROR);
        return;
    case FAB_H2_PING:
        if (sid) { up_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (fab_h2_bad_size(f)) { up_error(c, FAB_H2_FRAME_SIZE_ERROR); return; }
        if (!(flags & FAB_H2_ACK)) push2b(c, 0, FAB_H2_PING, FAB_H2_ACK, 0, p, 8);
        return;
    case FAB_H2_GOAWAY: {
        if (sid) { up_error(c, FAB_H2_PROTOCOL_ERROR); return; }
        if (fab_h2_bad_size(f)) { up_error(c, FAB_H2_FRAME_SIZE_ERROR); return; }
        u32 last = fab_be32(p) & 0x7fffffff;
        if (!c->b_goaway || last < c->b_last) c->b_last = last;
        if (!c->b_goaway) counts[C_BACKEND_GOAWAYS]++;
        c->b_goaway = 1;
        if (reopen_upstream && !in_flight(c, c->b_last)) {
            /* nothing it processed is unfinished: keep the session, reconnect when asked;
             * what it was sent and did not process is refused (safe to retry, 8.7) */
            for (u32 i = 0; i < NSTREAMS; i++) {
                strm *s = &c->w->st[i];
                if (!is_open(s) || !(s->flags & F_SENT_UP)) continue;
                purge_to_backend(c, s);
                rst2c(c, s, s->id, FAB_H2_REFUSED_STREAM);
                s->flags |= F_RESET;
            }
            drop_upstream(c);
            return;
        }
        for (u32 i = 0; i < NSTREAMS; i++) {
            strm *s = &c->w->st[i];
            if (!is_open(s)) continue;
            if (!(s->flags & F_SENT_UP) || s->id > c->b_last) {
                purge_to_backend(c, s);
                rst2c(c, s, s->id, FAB_H2_REFUSED_STREAM);
                s->flags |= F_RESET;
            }
        }
        start_goaway(c);
        return;
    }
    case FAB_H2_WINDOW_UPDATE: {
        if (fab_h2_bad_size(f)) { up_error(c, FAB_H2_FRAME_SIZE_ERROR); return; }
        u32 inc = fab_be32(p) & 0x7fffffff;
        if (!sid) {
            if (!inc) { up_error(c, FAB_H2_PROTOCOL_ERROR); return; }
            c->b_send += inc;
            if (c->b_send > FAB_H2_MAX_WINDOW) up_error(c, FAB_H2_FLOW_CONTROL_ERROR);
            return;
        }
        strm *s = find(c, sid);
        if (!s || !inc) return;
        s->b_send += inc;
        if (s->b_send > FAB_H2_MAX_WINDOW) up_error(c, FAB_H2_FLOW_CONTROL_ERROR);
        return;
    }
    case FAB_H2_CONTINUATION:
        up_error(c, FAB_H2_PROTOCOL_ERROR);
        return;
    default:
        return;
    }
}

static void b_input(conn *c, const u8 *p, u32 n) {
    struct fab_h2_frame f;
    i32 r = 0;
    while (c->up == UP_OPEN && (r = fab_h2_next(&c->w->bin, &p, &n, &f)) > 0) b_frame(c, &f);
    if (c->up == UP_OPEN && r < 0) up_error(c, (u32)-r);
}

/* ---- serialising queued frames within the peers' windows ---- */
/* Streams the backend counts toward its SETTINGS_MAX_CONCURRENT_STREAMS: sent to it and
 * not closed both ways, or with frames (END_STREAM, RST_STREAM) still queued toward it. */
static u32 up_active(conn *c) {
    u32 n = 0;
    struct work *w = c->w;
    for (u32 i = 0; i < NSTREAMS; i++) {
        strm *s = &w->st[i];
        n += (s->flags & F_SENT_UP) && (is_open(s) || s->qb);
    }
    return n;
}

static void flush_q(conn *c, int toclient, u8 *out, u32 cap, u32 *ol) {
    queue *q = toclient ? &c->w->q2c : &c->w->q2b;
    u32 maxf = toclient ? (c->c_maxf < MAXF ? c->c_maxf : MAXF) : c->b_maxf;
    u32 r = 0, w = 0, full = 0;
    /* new streams toward the backend: none before its SETTINGS (its limit), then within
     * it; the excess waits in the queue, in order (held, so the hold timeout applies) */
    u32 limit = !toclient && c->nused > c->b_maxcs;  /* else the limit cannot be reached */
    u32 upn = limit ? up_active(c) : 0;
    epoch++;
    while (r < q->len) {
        u8 *rec = q->buf + r;
        u32 type = rec[0], fl = rec[1], sid = fab_le32(rec + 2), n = fab_le32(rec + 6);
        u32 rl = 10 + n;
        strm *s = find(c, sid);
        u32 sent = 0, done = 0;
        if (!full && !(s && s->blk == epoch)) {
            if (type == FAB_H2_DATA) {
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
                    if (cap - *ol < FAB_H2_HDR + chunk) {
                        full = 1;
                        if (cap - *ol <= FAB_H2_HDR) break;
                        chunk = cap - *ol - FAB_H2_HDR;
                    }
                    int last = sent + chunk == n;
                    fab_h2_put_frame(out, cap, ol, FAB_H2_DATA, last ? fl : 0, sid, rec + 10 + sent,
                                     chunk);
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
                    if (fab_h2_put_frame(out, cap, ol, FAB_H2_DATA, fl, sid, 0, 0)) done = 1;
                    else full = 1;
                } else if (sent == n) {
                    done = 1;
                }
            } else if (type == FAB_H2_HEADERS && !toclient && s && !(s->flags & F_SENT_UP) &&
                       (!c->b_settings || (limit && upn >= c->b_maxcs))) {
                /* waits for a backend stream slot */
            } else if (type == FAB_H2_HEADERS) {
                i32 prefix = -1;
                if (toclient ? c->c_tsu : c->b_tsu) prefix = fab_hpack_size_update0;
                if (fab_h2_put_block(out, cap, ol, fl, sid, prefix, rec + 10, n, maxf)) {
                    done = 1;
                    if (toclient) c->c_tsu = 0;
                    if (!toclient) {
                        c->b_tsu = 0;
                        if (s && !(s->flags & F_SENT_UP)) {
                            s->flags |= F_SENT_UP;
                            s->flags &= ~F_QUEUED_UP;
                            upn++;
                        }
                        if (sid > c->max_upid) c->max_upid = sid;
                    }
                } else {
                    full = 1;
                }
            } else {
                if (fab_h2_put_frame(out, cap, ol, type, fl, sid, rec + 10, n)) done = 1;
                else full = 1;
            }
        }
        if (done) {
            if (s) { if (toclient) s->qc--; else s->qb--; }
        } else {
            if (s) s->blk = epoch;  /* its later frames wait too; other streams go on */
            u32 left = n - sent;
            if (w != r || sent) {
                fab_move(q->buf + w, rec, 10);
                fab_put_le32(q->buf + w + 6, left);
                if (left) fab_move(q->buf + w + 10, rec + 10 + sent, left);
            }
            w += 10 + left;
        }
        r += rl;
    }
    q->len = w;
}

static void put_wu(u8 *out, u32 cap, u32 *ol, u32 sid, u32 inc) {
    if (cap - *ol >= FAB_H2_HDR + 4) *ol += fab_h2_window_update(out + *ol, sid, inc);
}

/* ---- work blocks: the busy state, pooled ---- */
static struct work *work_free;
static u32 nwork, nwork_used, wait_seq, n_waiting;
static u32 max_work = MAX_WORK; /* on_init: what the instance's memory_limit leaves room for */

/* Give c a work block (its idle state restored into it); 0 when none is left. */
static int get_work(conn *c) {
    if (c->w) return 1;
    struct work *w = work_free;
    if (w) {
        work_free = w->next_free;
    } else {
        if (nwork >= max_work) return 0;
        u32 p = fab_alloc(sizeof(struct work));
        if (!p) return 0;
        w = (struct work *)p;
        nwork++;
    }
    nwork_used++;
    c->w = w;
    fab_h2_reader_init(&w->cin, c->cin_pre == 0);
    fab_h2_reader_init(&w->bin, 0);
    /* stream slots and queues: empty already (a block is given back only so, and a new
     * one is fresh zeroed memory) */
    fab_hpack_decoder_init(&w->bdec);
    w->bdec.max = c->bdec_max;
    for (u32 i = 0; i + 5 <= c->bsnap_len;) {
        const u8 *e = c->bsnap + i;
        u32 nl = fab_le16(e), vl = fab_le16(e + 2);
        fab__hp_insert(&w->bdec, e + 5, nl, e + 5 + nl, vl, e[4]);
        i += 5 + nl + vl;
    }
    c->bsnap_len = 0;
    return 1;
}

/* The backend's table in bsnap, oldest entry first; 0 when it does not fit (the block
 * is then kept: a backend that ignores the HEADER_TABLE_SIZE asked of it). */
static int save_btable(conn *c) {
    struct fab_hpack_table *t = &c->w->bdec;
    u32 len = 0;
    for (u32 d = t->n; d-- > 0;) {
        u32 slot = (t->head + FAB_HPACK_ENTRIES - d) % FAB_HPACK_ENTRIES;
        u32 nl = t->nl[slot], vl = t->vl[slot];
        if (5 + nl + vl > BSNAP_CAP - len) return 0;
        u8 *e = c->bsnap + len;
        fab_put_le16(e, nl);
        fab_put_le16(e + 2, vl);
        e[4] = t->sidx[slot];
        fab__hp_get(t, t->off[slot], e + 5, nl + vl);
        len += 5 + nl + vl;
    }
    c->bsnap_len = len;
    return 1;
}

static void put_work(conn *c) {
    struct work *w = c->w;
    if (!w) return;
    c->cin_pre = w->cin.pre_have;
    c->bdec_max = w->bdec.max;
    w->next_free = work_free;
    work_free = w;
    nwork_used--;
    c->w = 0;
}

/* Give the block back if nothing in it is needed any more: no stream, nothing queued,
 * no header block under way; the backend's table (at most BTABLE, as asked) is kept in
 * the connection, and so is a partial preface or frame from the client that fits the
 * inbox (replayed before its next bytes). A slowloris that trickles its preface or a
 * frame kept a block each, and 18 of them (the pool) paused every other connection. */
static void maybe_idle(conn *c) {
    struct work *w = c->w;
    if (!w || c->nused || w->q2c.len || w->q2b.len || c->c_cont || c->b_cont ||
        w->bin.have || c->up == UP_CONNECTING)
        return;
    u32 pre = w->cin.pre_have, part_pre = pre != 0 && pre != 24;
    u32 keep = part_pre ? pre : w->cin.have;
    if (keep > INBOX_CAP - c->inbox_len || !save_btable(c)) return;
    if (keep) {
        fab_copy(c->inbox + c->inbox_len, part_pre ? (const u8 *)FAB_H2_PREFACE : w->cin.buf,
                 keep);
        c->inbox_len += keep;
        if (part_pre) w->cin.pre_have = 0;  /* expected again, from the inbox */
        w->cin.have = 0;
    }
    put_work(c);
}

/* A block held for a client's partial input alone (a header block or a frame too big
 * for the inbox, no stream, nothing queued) for STALL_MS: the client is stalling. */
static int stalled(conn *c, u64 t) {
    struct work *w = c->w;
    if (!w || c->dead || c->nused || w->q2c.len || w->q2b.len || c->b_cont ||
        w->bin.have || !(c->c_cont || w->cin.have || (w->cin.pre_have && w->cin.pre_have != 24))) {
        c->stall_t = 0;
        return 0;
    }
    if (!c->stall_t) { c->stall_t = t; return 0; }
    return t - c->stall_t >= STALL_MS;
}

static void free_conn(conn *c) {
    conn **slot = fab_table_get(&conn_by_sid, c->sid);
    if (slot) fab_table_del(&conn_by_sid, slot);
    if (c->w) {  /* closed while busy: empty the block for its next user */
        for (u32 i = 0; i < NSTREAMS; i++) c->w->st[i].flags = 0;
        c->w->q2c.len = c->w->q2b.len = 0;
        put_work(c);
    }
    c->used = 0;
    c->dirty = 0;
    if (c->waiting) n_waiting--;
    c->waiting = 0;
}

static int wants_up(conn *c) {
    struct work *w = c->w;
    if (!w) return 0;
    for (u32 i = 0; i < NSTREAMS; i++) {
        strm *s = &w->st[i];
        if (is_open(s) && (s->flags & F_QUEUED_UP) && !(s->flags & F_SENT_UP)) return 1;
    }
    return 0;
}

/* The client connection and its upstream are done: close both. */
static void close_conn(conn *c) {
    /* the upstream first: after downstream_close the host has forgotten the stream, and
     * an action for it would be counted a bad one */
    if (c->up == UP_OPEN || c->up == UP_CONNECTING) fab_upstream_close(c->sid);
    fab_close(c->sid);
    free_conn(c);
}

/* Connections refused past max_connections, and those closed for a protocol error after
 * their GOAWAY, linger (their bytes read and dropped) until the client closes or a second
 * has passed: closing a socket with unread bytes is a TCP reset, which can destroy the
 * GOAWAY before the client reads it (a client still writing when it erred always has
 * unread bytes). */
#define NREFUSED 256
FAB_TABLE(refused, u64, NREFUSED);  /* sid -> the time it was refused (0: before a tick) */

static void linger(u32 sid) {
    u64 *t = fab_table_add(&refused, sid);
    if (t) *t = have_now ? fab_now() + 1 : 0;  /* 0: before a tick (on_tick stamps it) */
    else fab_close(sid);
}

/* RFC 9113 8.1: a server "MAY request that the client abort transmission of a request
 * without error by sending a RST_STREAM with an error code of NO_ERROR after sending a
 * complete response"; Go's server, grpc-go, Apache httpd and nghttpd --early-response
 * do, and curl 7.88 waits for ever without it when the backend reads no more of the
 * body. So a response that ended (F_EARLY) before its request did, and that the backend
 * did not reset
 * itself by now (then its RST_STREAM is relayed instead), gets RST_STREAM(NO_ERROR)
 * queued behind it toward the client, and the backend RST_STREAM(CANCEL): the rest of
 * the body will not come. Body bytes queued toward the backend are dropped and the
 * client credited for them; DATA the client sent before it read the reset is dropped
 * and credited on the connection (cli_frame: the stream is closed and reset by us). */
static void stop_uploads(conn *c) {
    struct work *w = c->w;
    c->early = 0;
    for (u32 i = 0; w && i < NSTREAMS; i++) {
        strm *s = &w->st[i];
        if (!(s->flags & F_EARLY)) continue;
        s->flags &= ~F_EARLY;
        if (!is_open(s) || (s->flags & (F_CLI_END | F_LOCAL))) continue;
        purge_to_backend(c, s);
        if ((s->flags & F_SENT_UP) && c->up == UP_OPEN) rst2b(c, s, s->id, FAB_H2_CANCEL);
        rst2c(c, s, s->id, FAB_H2_NO_ERROR);
        s->flags |= F_RESET;
        counts[C_EARLY]++;
    }
}

/* Write what this connection may send to each side; 0 when deferred for lack of room. */
static int flush_conn(conn *c) {
    if (!room(6)) return 0;
    u32 avail = fab_room() + FAB_REC_HDR;
    if (avail < 4096) return 0;
    u32 cap = (avail - 1024) / 2;
    if (cap > SCR_CAP) cap = SCR_CAP;
    dlen = ulen = 0;
    c->dirty = 0;
    if (c->dead) {
        u32 sid = c->sid;
        dlen = fab_h2_goaway(D, c->max_cid, c->dead - 1);
        fab_send(sid, D, dlen);
        if (c->up == UP_OPEN || c->up == UP_CONNECTING || c->up_close)
            fab_upstream_close(sid);
        if (c->waiting) fab_resume(sid);  /* read (and drop) what it still sends */
        logmsg(FAB_INFO, "http2: client connection error, GOAWAY sent");
        free_conn(c);
        linger(sid);
        return 1;
    }
    if (c->up == UP_NONE && backend_state != 2 && wants_up(c) && fab_room() >= 6) {
        fab_connect(c->sid, 0);  /* port 0: the target port */
        c->up = UP_CONNECTING;
    }
    if (c->up == UP_OPEN && c->up_preface) {
        /* HEADER_TABLE_SIZE 512: the backend's table toward us stays small enough to
         * keep in the connection while idle (the work block goes back to the pool),
         * big enough for the fields every response repeats */
        static const u32 settings[] = {FAB_H2_SETTINGS_HEADER_TABLE_SIZE, BTABLE,
                                       FAB_H2_SETTINGS_ENABLE_PUSH, 0,
                                       FAB_H2_SETTINGS_MAX_CONCURRENT_STREAMS, 100};
        fab_copy(U, FAB_H2_PREFACE, 24);
        ulen = 24 + fab_h2_settings(U + 24, settings, 3);
        c->up_preface = 0;
        c->b_tsu = 1;
    }
    if (c->early) stop_uploads(c);
    if (c->w) flush_q(c, 1, D, cap, &dlen);
    if (c->w && c->up == UP_OPEN) flush_q(c, 0, U, cap, &ulen);
    /* Credit each peer for what was handed on or consumed, once, and only when the peer
     * is down to half its window: one WINDOW_UPDATE per half window, not one per call.
     * No stall: a peer below half a window always gets what it is owed. */
    if (c->c_credit && LOW(c->c_recv) && cap - dlen >= 13) {
        put_wu(D, cap, &dlen, 0, c->c_credit);
        c->c_recv += c->c_credit;
        c->c_credit = 0;
    }
    struct work *w = c->w;
    for (u32 i = 0; w && i < NSTREAMS; i++) {
        strm *s = &w->st[i];
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
    if (c->up_close && cap - ulen >= 17) ulen += fab_h2_goaway(U + ulen, 0, c->up_close - 1);
    if (dlen) {
        fab_send(c->sid, D, dlen);
        if (c->cli_fin) c->fin_t = fab_now();
        c->stuck_t = 0;
    }
    if (ulen) fab_upstream_send(c->sid, U, ulen);
    if (c->up_close) {
        fab_upstream_close(c->sid);
        c->up_close = 0;
    }
    /* forget finished streams */
    for (u32 i = 0; w && i < NSTREAMS; i++) {
        strm *s = &w->st[i];
        if ((s->flags & F_USED) && !is_open(s) && !s->qc && !s->qb) {
            s->flags = 0;
            c->nused--;
        }
    }
    if ((c->ga == 2 || c->cli_goaway || c->cli_fin) && !open_count(c) &&
        !(c->w && c->w->q2c.len))
        close_conn(c);
    else
        maybe_idle(c);
    return 1;
}

/* ---- connections ---- */
static conn *find_conn(u32 sid) {
    conn **slot = fab_table_get(&conn_by_sid, sid);
    return slot ? *slot : 0;
}

/* No work block for c: stop reading from the client until one frees (serve_waiters);
 * what was read already waits in the inbox. */
static void start_wait(conn *c) {
    if (c->waiting) return;
    c->waiting = ++wait_seq;
    n_waiting++;
    counts[C_WORK_WAITS]++;
    fab_pause(c->sid);
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
    conn **slot = fab_table_add(&conn_by_sid, sid);
    if (!slot) return 0;
    *slot = c;
    /* reset the bookkeeping, not the table */
    fab_zero(c, (u32)((u8 *)&c->dec - (u8 *)c));
    fab_hpack_decoder_init(&c->dec);
    c->bdec_max = FAB_HPACK_TABLE_SIZE;
    c->sid = sid;
    c->used = 1;
    c->c_send = c->b_send = c->c_recv = c->b_recv = WIN0;
    c->c_init = c->b_init = WIN0;
    c->c_maxf = c->b_maxf = MAXF;
    c->c_tsu = 1;
    c->b_last = 0x7fffffff;
    c->b_maxcs = 0xffffffff;  /* until the backend's SETTINGS say (none is sent before) */
    c->b_maxhl = 0xffffffff;
    c->rst_tokens = RST_BURST;
    c->rst_t = fab_now();
    /* the server preface: MAX_HEADER_LIST_SIZE says where 431 starts (RFC 9113 6.5.2) */
    u8 s[12];
    fab_h2_put_setting(s, FAB_H2_SETTINGS_MAX_CONCURRENT_STREAMS, MAX_OPEN);
    fab_h2_put_setting(s + 6, FAB_H2_SETTINGS_MAX_HEADER_LIST_SIZE, HLIST_ANNOUNCED);
    if (get_work(c)) {
        push2c(c, 0, FAB_H2_SETTINGS, 0, 0, s, 12);
    } else {
        u8 f[FAB_H2_HDR + 12];  /* the server preface at once; the rest waits for a block */
        u32 fl = 0;
        fab_h2_put_frame(f, sizeof f, &fl, FAB_H2_SETTINGS, 0, 0, s, 12);
        fab_send(sid, f, fl);
        start_wait(c);
    }
    c->dirty = 1;
    return c;
}

/* A queue past half its size is written out at once, not at the end of the call. */
static void event_done(conn *c) {
    if (c->used && (c->dead || (c->w && (c->w->q2c.len > Q_CAP / 2 || c->w->q2b.len > Q_CAP / 2))))
        flush_conn(c);
}

/* ---- the handlers (fabricd.h's event loop) ---- */
static int on_init(struct fab_json cfg) {
    hold_timeout_ms = fab_cfg_u32(cfg, "hold_timeout_ms", 30000);
    reopen_upstream = fab_cfg_bool(cfg, "reopen_upstream", 0);
    max_conns = fab_cfg_u32(cfg, "max_connections", MAX_CONNS);
    if (max_conns == 0 || max_conns > MAX_CONNS) max_conns = MAX_CONNS;
    u32 mem = fab_cfg_u32(cfg, "memory_limit", DEFAULT_MEMORY);
    if (mem < DEFAULT_MEMORY) {  /* idle connections scale down with a smaller cap */
        u32 fitc = (u32)((u64)MAX_CONNS * mem / DEFAULT_MEMORY);
        if (max_conns > fitc) max_conns = fitc ? fitc : 1;
    }
    /* Work blocks: MAX_WORK fit the default 16 MiB beside 1,024 idle connections; what a
     * larger memory_limit (the port's activator_memory_mib) adds is all theirs. */
    u32 fit = MAX_WORK;
    if (mem > DEFAULT_MEMORY) {
        fit += (mem - DEFAULT_MEMORY) / (u32)sizeof(struct work);
    } else {
        u32 less = (DEFAULT_MEMORY - mem + (u32)sizeof(struct work) - 1) / (u32)sizeof(struct work);
        fit = less < MAX_WORK ? MAX_WORK - less : 1;
    }
    if (fit > max_conns) fit = max_conns;
    max_work = fab_cfg_u32(cfg, "max_busy_connections", fit);
    if (max_work == 0 || max_work > fit) max_work = fit;
    build_replies();
    for (u32 i = 0; i < NCOUNT; i++) count_len[i] = fab_strlen(COUNT_NAME[i]);
    return 0;
}

static void on_batch_begin(void) {
    u32 live = 0;
    for (u32 i = 0; i < nconns_alloc; i++) live += conns[i]->used;
    budget = fab_action_budget(live);
}

/* Past max_connections a connection is refused the RFC 9113 way: the server preface
 * (SETTINGS, MAX_CONCURRENT_STREAMS 0) and GOAWAY(last stream 0, NO_ERROR): nothing was
 * processed, every request is safe to retry elsewhere (8.7), and NO_ERROR is not taken
 * for abuse (grpc reads ENHANCE_YOUR_CALM as "too many pings"). The connection then stays
 * open, its bytes read and dropped, until the client closes it or a second passes: a
 * close with unread bytes would be a TCP reset, which can destroy the GOAWAY before the
 * client reads it. */

static void refuse(u32 sid) {
    u8 b[32];
    static const u32 settings[] = {FAB_H2_SETTINGS_MAX_CONCURRENT_STREAMS, 0};
    u32 n = fab_h2_settings(b, settings, 1);
    n += fab_h2_goaway(b + n, 0, FAB_H2_NO_ERROR);
    fab_send(sid, b, n);
    counts[C_CONN_REFUSED]++;
    linger(sid);
    logmsg(FAB_WARNING, "http2: connection limit reached, connection refused (GOAWAY)");
}

static int refused_event(u32 sid, int closing) {
    u64 *t = fab_table_get(&refused, sid);
    if (!t) return 0;
    if (closing) {
        fab_close(sid);
        fab_table_del(&refused, t);
    }
    return 1;
}

static void on_tick(u64 t) {
    have_now = 1;
    u64 *rt;
    for (u32 it = 0; fab_table_count(&refused) && (rt = fab_table_next(&refused, &it));) {
        if (!*rt) *rt = t;
        else if (t - *rt >= 1000) refused_event(fab_table_key(&refused, rt), 1);
    }
    if (backend_state == 2 && t - last_retry >= 1000) {
        backend_state = 0;  /* retry once a second in case an availability event was missed */
        last_retry = t;
    }
    for (u32 i = 0; i < nconns_alloc; i++) {
        conn *c = conns[i];
        if (!c->used) continue;
        /* no client preface (magic and SETTINGS) PREFACE_MS after it connected: a client
         * that connects and sends nothing, or trickles its preface, takes a connection slot
         * of the port's max_connections; one waiting for a work block is not counted */
        if (!c->cli_settings && !c->waiting && !c->dead) {
            if (!c->pre_t) {
                c->pre_t = t;
            } else if (t - c->pre_t >= PREFACE_MS) {
                counts[C_PREFACE_TIMEOUTS]++;
                close_conn(c);
                continue;
            }
        }
        struct work *w = c->w;
        for (u32 k = 0; w && k < NSTREAMS; k++) {
            strm *s = &w->st[k];
            if (!(s->flags & F_USED)) continue;
            if (!(s->flags & F_TSET)) { s->t0 = t; s->flags |= F_TSET; continue; }
            if (!is_open(s) || (s->flags & (F_LOCAL | F_RESP))) continue;
            /* held (queued, not sent), or sent to a backend that never answered (frozen
             * and never thawed): the same deadline, from the request's arrival */
            u32 sent = (s->flags & F_SENT_UP) != 0;
            if (!sent && !(s->flags & F_QUEUED_UP)) continue;
            u64 age = t - s->t0;
            u32 grpc_expired = (s->flags & F_GRPC) && s->gto && s->gto < hold_timeout_ms &&
                               age >= s->gto;
            if (age >= hold_timeout_ms || grpc_expired) {
                if (sent) {
                    purge_to_backend(c, s);
                    if (c->up == UP_OPEN) rst2b(c, s, s->id, FAB_H2_CANCEL);
                    counts[C_UP_TIMEOUTS]++;
                }
                local_reply(c, s, !(s->flags & F_GRPC) ? LR_503
                                  : grpc_expired ? LR_GRPC_DEADLINE : LR_GRPC_UNAVAILABLE);
                if (sent) s->flags |= F_RESET;  /* late backend frames: decoded, dropped */
                c->dirty = 1;
                counts[C_HOLD_TIMEOUTS]++;
            }
        }
        if ((c->w && (c->w->q2c.len || c->w->q2b.len)) || c->c_credit || c->b_credit)
            c->dirty = 1;
        if (c->up == UP_NONE && backend_state != 2 && c->w) c->dirty = 1;
        /* the two-step GOAWAY's PING unanswered for GOAWAY_WAIT_MS: the final GOAWAY
         * anyway (the PING only measures a round trip; a client that never answers it
         * must not keep the connection forever) */
        if (c->ga == 1 && !c->ga_t) c->ga_t = t;
        if (c->ga == 1 && t - c->ga_t >= GOAWAY_WAIT_MS && get_work(c)) {
            goaway2c(c, c->max_cid, FAB_H2_NO_ERROR);
            c->ga = 2;
            c->dirty = 1;
        }
        /* half-closed, and nothing could be sent for twice the hold: the client is gone
         * (a reset, or it never reads); drop the connection rather than keep it forever */
        if (stalled(c, t)) {
            counts[C_STALLED]++;
            c->dead = FAB_H2_ENHANCE_YOUR_CALM + 1;
            c->dirty = 1;
            continue;
        }
        /* frames queued toward a client that takes none of them (a zero window it never
         * opens: a slow read) for twice the hold: closed, as the half-closed one below;
         * such a connection keeps its work block, and 18 of them paused the port */
        if (c->w && c->w->q2c.len && !c->cli_fin) {
            if (!c->stuck_t) c->stuck_t = t;
            else if (t - c->stuck_t >= 2ull * hold_timeout_ms) {
                counts[C_SEND_TIMEOUTS]++;
                close_conn(c);
                continue;
            }
        } else {
            c->stuck_t = 0;
        }
        if (c->cli_fin && !c->fin_t) c->fin_t = t;
        if (c->cli_fin && t - c->fin_t >= 2ull * hold_timeout_ms) close_conn(c);
    }
}

static void on_backend_available(void) {
    backend_state = 1;
    for (u32 i = 0; i < nconns_alloc; i++)
        if (conns[i]->used && conns[i]->up == UP_NONE) conns[i]->dirty = 1;
}

static void on_backend_unavailable(void) {
    backend_state = 2;
    last_retry = fab_now();
}

static void on_open(u32 sid, u32 port) {
    (void)port;
    if (find_conn(sid) || refused_event(sid, 0)) return;
    if (!open_conn(sid)) refuse(sid);
}

static void on_data(u32 sid, const u8 *p, u32 n) {
    conn *c = find_conn(sid);
    if (!c || c->cli_fin) { refused_event(sid, 0); return; }
    c->dirty = 1;
    if (!c->w && !c->waiting && !get_work(c)) start_wait(c);
    if (!c->w) {
        /* paused, waiting for a block: keep what was read already (the host reads once
         * more at most); past the inbox, give up on the connection gracefully */
        if (n > INBOX_CAP - c->inbox_len) {
            if (!c->dead) { c->dead = FAB_H2_NO_ERROR + 1; counts[C_CONN_REFUSED]++; }
            return;
        }
        fab_copy(c->inbox + c->inbox_len, p, n);
        c->inbox_len += n;
        return;
    }
    if (c->inbox_len) {  /* a partial preface or frame kept when the block went back */
        u32 k = c->inbox_len;
        c->inbox_len = 0;
        cli_input(c, c->inbox, k);
    }
    cli_input(c, p, n);
    event_done(c);
}

/* The client will send no more (FIN, reset or error). A FIN after the last request is
 * a half-close: streams whose request is complete still get their responses, then the
 * connection is closed (flush_conn); a request the client had not finished never will
 * be, so it is cancelled toward the backend. After a reset the host drops what is sent,
 * and the same path only costs the backend work already asked for. */
static void apply_fin(conn *c) {
    for (u32 i = 0; c->w && i < NSTREAMS; i++) {
        strm *s = &c->w->st[i];
        if (!is_open(s) || (s->flags & F_CLI_END)) continue;
        purge_to_backend(c, s);
        if ((s->flags & F_SENT_UP) && c->up == UP_OPEN) rst2b(c, s, s->id, FAB_H2_CANCEL);
        purge_to_client(c, s);
        s->flags |= F_RESET;
    }
    /* Nothing open and nothing queued: closed now. Frames still queued toward the client
     * (a response completed in this call, or one its window just let go) are written
     * first: flush_conn closes once the queue is empty (c->dirty is set). Closing here
     * dropped them with the work block. */
    if (!open_count(c) && !(c->w && c->w->q2c.len)) close_conn(c);
}

static void on_close(u32 sid) {
    conn *c = find_conn(sid);
    if (!c) { refused_event(sid, 1); return; }
    c->cli_fin = 1;
    c->fin_t = fab_now();
    c->dirty = 1;
    if (!c->waiting) apply_fin(c);  /* a waiting one: once its inbox has been read */
}

/* Blocks freed (or still to allocate): to the connections waiting, oldest first. */
static void serve_waiters(void) {
    for (;;) {
        conn *c = 0;
        for (u32 i = 0; i < nconns_alloc; i++) {
            conn *x = conns[i];
            if (x->used && x->waiting && !x->dead && (!c || x->waiting < c->waiting)) c = x;
        }
        if (!c || !get_work(c)) return;
        c->waiting = 0;
        n_waiting--;
        fab_resume(c->sid);
        if (c->inbox_len) {
            u32 n = c->inbox_len;
            c->inbox_len = 0;
            cli_input(c, c->inbox, n);
        }
        if (c->cli_fin) apply_fin(c);
        if (c->used) flush_conn(c);
    }
}

static void on_upstream_result(u32 sid, int ok) {
    conn *c = find_conn(sid);
    if (!c) return;
    c->dirty = 1;
    if (c->up == UP_CONNECTING) {
        if (ok) {
            c->up = UP_OPEN;
            c->up_preface = 1;
            backend_state = 1;
        } else {
            c->up = UP_NONE;
            backend_state = 2;
            last_retry = fab_now();
        }
    }
    event_done(c);
}

static void on_upstream_data(u32 sid, const u8 *p, u32 n) {
    conn *c = find_conn(sid);
    if (!c) return;
    c->dirty = 1;
    if (c->up == UP_OPEN && !get_work(c)) {
        /* an idle connection whose backend speaks, and no block: its upstream goes (a
         * new one when a request comes), or, by default, the connection, gracefully */
        if (reopen_upstream) drop_upstream(c);
        else if (!c->dead) { c->dead = FAB_H2_NO_ERROR + 1; counts[C_CONN_REFUSED]++; }
        return;
    }
    if (c->up == UP_OPEN) b_input(c, p, n);
    event_done(c);
}

static void on_upstream_close(u32 sid) {
    conn *c = find_conn(sid);
    if (!c) return;
    c->dirty = 1;
    if (c->up == UP_OPEN || c->up == UP_CONNECTING) {
        if (reopen_upstream && !in_flight(c, 0x7fffffff)) {
            /* closed before its SETTINGS: taken for a failed connect (a server going down
             * that still accepts), so held requests retry once a second, not at once */
            if (c->up == UP_OPEN && !c->b_settings) {
                backend_state = 2;
                last_retry = fab_now();
            }
            drop_upstream(c);  /* idle (no block needed) or nothing sent unfinished */
            event_done(c);
            return;
        }
        if (!get_work(c)) {
            if (!c->dead) { c->dead = FAB_H2_NO_ERROR + 1; counts[C_CONN_REFUSED]++; }
            return;
        }
        backend_gone(c);
        fab_upstream_close(sid);
    }
    event_done(c);
}

static void on_batch_end(void) {
    for (u32 i = 0; i < nconns_alloc; i++)
        if (conns[i]->used && conns[i]->dirty) flush_conn(conns[i]);
    if (n_waiting) serve_waiters();
    u32 need = FAB_NEED_NONE;
    for (u32 i = 0; i < nconns_alloc && need == FAB_NEED_NONE; i++)
        if (conns[i]->used && open_count(conns[i])) need = FAB_NEED_ACTIVE;
    if (fab_action_count() < budget) fab_need(need);
    for (u32 i = 0; i < NCOUNT; i++) {
        if (!counts[i] || fab_action_count() >= budget) continue;
        if (fab_room() < 4 + count_len[i]) break;
        fab_count(COUNT_NAME[i], counts[i]);
        counts[i] = 0;
    }
}

static const struct fab_handlers H = {
    .init = on_init,
    .batch_begin = on_batch_begin,
    .backend_available = on_backend_available,
    .backend_unavailable = on_backend_unavailable,
    .tick = on_tick,
    .stream_open = on_open,
    .stream_data = on_data,
    .stream_close = on_close,
    .upstream_result = on_upstream_result,
    .upstream_data = on_upstream_data,
    .upstream_close = on_upstream_close,
    .batch_end = on_batch_end,
};

FAB_STREAM_ACTIVATOR(H)
