/* fab_pg.h - a PostgreSQL wire-protocol (v3) codec for fabricd activators.
 *
 * Why: an activator in front of a PostgreSQL port must tell the startup packets apart
 * (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage, a direct-TLS ClientHello),
 * frame the typed messages that follow across any split of the byte stream, and answer
 * some of them itself with the exact bytes a server sends. Those are the same for every
 * such activator, so they live here; the policy (what to answer, what to hold) stays in
 * the activator. activators/postgres/postgres.c is built on it; a minimal responder is
 * activators/sdk/c/examples/pgping.c.
 *
 * How ("answer SELECT 1" on a session whose startup is done; the startup itself, with
 * fab_pg_startup_peek, is startup() in examples/pgping.c):
 *
 *     #include "fabricd.h"
 *     #include "fab_pg.h"
 *     struct sess { struct fab_pg_framer fr; struct fab_buf msg; u8 store[1024]; };
 *     FAB_TABLE(sessions, struct sess, 256);
 *     ... in stream_open:
 *           fab_pg_framer_init(&s->fr, 4 + sizeof s->store, FAB_PG_FRONTEND_TYPES);
 *           fab_buf_init(&s->msg, s->store, sizeof s->store);
 *     static void on_data(u32 sid, const u8 *d, u32 n) {
 *         struct sess *s = fab_table_get(&sessions, sid);
 *         struct fab_pg_msg m;
 *         i32 r;
 *         while ((r = fab_pg_read(&s->fr, &s->msg, &d, &n, &m)) == FAB_PG_MSG) {
 *             u8 out[FAB_PG_ANSWER_MAX];
 *             u32 k = m.type == 'Q' ? fab_pg_keepalive_query(m.body, m.len) : 0;
 *             if (k) fab_send(sid, out, fab_pg_answer_query(out, k));
 *             fab_buf_take(&s->msg, s->msg.len);
 *         }
 *         if (r < 0) { u8 e[FAB_PG_ERROR_MAX];      a framing error: answer, close
 *             fab_send(sid, e, fab_pg_error(e, "FATAL", "08P01", "invalid message"));
 *             fab_close(sid); }
 *     }
 *
 * Pieces:
 *   - startup phase: fab_pg_startup_peek() classifies the first bytes of a connection
 *     (protocol 3.0 and 3.2 StartupMessage, SSLRequest, GSSENCRequest, CancelRequest with
 *     4-256-byte keys as 3.2 allows, direct TLS: first byte 0x16); fab_pg_startup_param()
 *     and fab_pg_cancel_key() read a complete packet;
 *   - regular phase: struct fab_pg_framer cuts a byte stream into messages (type byte +
 *     big-endian length) incrementally: a header split over reads, bodies streamed in
 *     pieces without buffering (fab_pg_next), or whole messages gathered in a bounded
 *     fab_buf (fab_pg_read). Lengths below 4 or above the framer's bound and type bytes
 *     outside its set are errors, never a trap;
 *   - frontend message readers (Parse, Bind, Describe/Close, Execute) that check every
 *     length against the message's end;
 *   - backend message builders: ErrorResponse, ReadyForQuery, CommandComplete,
 *     RowDescription, DataRow, ParameterDescription, the header-only ones (ParseComplete,
 *     BindComplete, CloseComplete, NoData, EmptyQueryResponse), AuthenticationOk,
 *     ParameterStatus, BackendKeyData; fab_pg_answer_query() writes what PostgreSQL 15
 *     answers to a keep-alive simple Query, byte for byte;
 *   - the keep-alive classifier: `SELECT 1` (any case, any whitespace or comments,
 *     optional `;`), `;`, the empty query and a text of comments alone (pgx's `-- ping`).
 *
 * Limits: protocol 3 only (major version 3, any minor); builders write into memory the
 * caller provides and trust the caller for room (each says its size; FAB_PG_*_MAX);
 * ErrorResponse fields are cut at FAB_PG_FIELD_MAX bytes; no authentication exchange
 * beyond AuthenticationOk (trust), no COPY sub-protocol helpers. Nothing allocates.
 */
#ifndef FAB_PG_H
#define FAB_PG_H

#ifndef FABRICD_H
#error "include fabricd.h before fab_pg.h"
#endif

/* ------------------------------------------------------------------ startup phase */

#define FAB_PG_PROTO_30 0x00030000u
#define FAB_PG_PROTO_32 0x00030002u
#define FAB_PG_CODE_CANCEL 80877102u
#define FAB_PG_CODE_SSL 80877103u
#define FAB_PG_CODE_GSSENC 80877104u
#define FAB_PG_STARTUP_MAX 10000u /* PostgreSQL's MAX_STARTUP_PACKET_LENGTH (without the length word) */
#define FAB_PG_CANCEL_MIN 16u     /* length, code, pid, a 4-byte key (3.0) */
#define FAB_PG_CANCEL_MAX 268u    /* ... a 256-byte key (3.2) */

/* What the first bytes of a connection are (fab_pg_startup_peek). */
enum {
    FAB_PG_MORE = 0,       /* not enough bytes yet */
    FAB_PG_STARTUP,        /* a complete StartupMessage (version in st->code) */
    FAB_PG_SSL,            /* SSLRequest (8 bytes) */
    FAB_PG_GSSENC,         /* GSSENCRequest (8 bytes) */
    FAB_PG_CANCEL,         /* a complete CancelRequest */
    FAB_PG_TLS,            /* a TLS record (direct TLS, PG 17 sslnegotiation=direct) */
    FAB_PG_BAD_LENGTH,     /* answer FATAL 08P01 "invalid length of startup packet" */
    FAB_PG_BAD_PROTOCOL,   /* answer FATAL 0A000 "unsupported frontend protocol" */
    FAB_PG_BAD_CANCEL,     /* close without an answer (the server says nothing either) */
};

struct fab_pg_startup {
    u32 len;  /* the packet's length field (the whole packet) */
    u32 code; /* protocol version or request code */
};

/* Classify a connection's first packet. `head` holds its first min(have, 8) bytes and
 * `have` is how many bytes of the connection have arrived (the packet may be longer than
 * `head`). FAB_PG_MORE until the kind is known and, for a StartupMessage or a
 * CancelRequest, until all `st->len` bytes are there. */
static FAB_UNUSED u32 fab_pg_startup_peek(const u8 *head, u32 have, struct fab_pg_startup *st) {
    if (!have) return FAB_PG_MORE;
    if (head[0] == 0x16) return FAB_PG_TLS;
    if (have < 8) return FAB_PG_MORE;
    u32 len = fab_be32(head), code = fab_be32(head + 4);
    st->len = len;
    st->code = code;
    if (code == FAB_PG_CODE_SSL || code == FAB_PG_CODE_GSSENC) {
        if (len != 8) return FAB_PG_BAD_LENGTH;
        return code == FAB_PG_CODE_SSL ? FAB_PG_SSL : FAB_PG_GSSENC;
    }
    if (code == FAB_PG_CODE_CANCEL) {
        if (len < FAB_PG_CANCEL_MIN || len > FAB_PG_CANCEL_MAX) return FAB_PG_BAD_CANCEL;
        return have < len ? FAB_PG_MORE : FAB_PG_CANCEL;
    }
    /* the server's bound is on the length less its own 4 bytes (10004 in all) */
    if (len < 8 || len - 4 > FAB_PG_STARTUP_MAX) return FAB_PG_BAD_LENGTH;
    if ((code >> 16) != 3) return FAB_PG_BAD_PROTOCOL;
    return have < len ? FAB_PG_MORE : FAB_PG_STARTUP;
}

/* A NUL-terminated string at p (before end): its length, or -1 when unterminated. */
FAB_INLINE i32 fab_pg_cstr(const u8 *p, const u8 *end) {
    for (const u8 *q = p; q < end; q++) if (!*q) return (i32)(q - p);
    return -1;
}

/* The value of parameter `name` ("user", "database", "application_name", ...) in a
 * complete StartupMessage `pkt` of `n` bytes: its length (value at *val), or -1. */
static FAB_UNUSED i32 fab_pg_startup_param(const u8 *pkt, u32 n, const char *name,
                                           const u8 **val) {
    if (n < 8) return -1;
    u32 nl = fab_strlen(name);
    const u8 *p = pkt + 8, *end = pkt + n;
    while (p < end && *p) {
        i32 kl = fab_pg_cstr(p, end);
        if (kl < 0) return -1;
        const u8 *v = p + kl + 1;
        i32 vl = fab_pg_cstr(v, end);
        if (vl < 0) return -1;
        if ((u32)kl == nl && fab_memeq(p, name, nl)) { *val = v; return vl; }
        p = v + vl + 1;
    }
    return -1;
}

/* Check a complete protocol-3 StartupMessage as PostgreSQL 15 does (ProcessStartupPacket):
 * name/value pairs up to a terminating NUL that is the packet's last byte, then a
 * non-empty "user". 0 when it is good, FAB_PG_BAD_LAYOUT (answer FATAL 08P01 "invalid
 * startup packet layout: expected terminator as last byte") or FAB_PG_NO_USER (FATAL
 * 28000 "no PostgreSQL user name specified in startup packet"). `pkt` must have one
 * readable byte past its `n`, set to 0 (the server reads its strings that way too). */
#define FAB_PG_BAD_LAYOUT 1
#define FAB_PG_NO_USER 2
static FAB_UNUSED u32 fab_pg_startup_check(const u8 *pkt, u32 n) {
    const u8 *b = pkt + 4; /* the server's buffer: after the length word */
    u32 len = n - 4, off = 4, user = 0;
    while (off < len) {
        if (!b[off]) break;
        u32 kl = 0;
        while (b[off + kl]) kl++;
        u32 voff = off + kl + 1;
        if (voff >= len) break;
        u32 vl = 0;
        while (b[voff + vl]) vl++;
        if (kl == 4 && fab_memeq(b + off, "user", 4)) user = vl;
        off = voff + vl + 1;
    }
    if (off != len - 1) return FAB_PG_BAD_LAYOUT;
    return user ? 0 : FAB_PG_NO_USER;
}

/* The process id and secret key of a complete CancelRequest: the key's length (4..256),
 * or -1 when `pkt` is not one. */
static FAB_UNUSED i32 fab_pg_cancel_key(const u8 *pkt, u32 n, u32 *pid, const u8 **key) {
    if (n < FAB_PG_CANCEL_MIN || n > FAB_PG_CANCEL_MAX || fab_be32(pkt) != n
        || fab_be32(pkt + 4) != FAB_PG_CODE_CANCEL) return -1;
    *pid = fab_be32(pkt + 8);
    *key = pkt + 12;
    return (i32)(n - 12);
}

/* ------------------------------------------------------------------ the framer */

/* Type bytes a client may send after the startup (protocol 3.0-3.2). */
#define FAB_PG_FRONTEND_TYPES "BCdcfDEHFPpQSX"
#define FAB_PG_LEN_MAX 0x3fffffffu /* PostgreSQL's own limit on a message, 1 GiB - 1 */

/* What fab_pg_next found. Negative values are framing errors: the framer stays in
 * error, the stream should be answered (08P01) and closed. */
enum {
    /* FAB_PG_MORE (0): all input consumed, within a message or between two */
    FAB_PG_HEADER = 1, /* a header is complete: fr->type, fr->len, fr->left */
    FAB_PG_BODY = 2,   /* body bytes: *piece, *piece_len (a part of the input) */
    FAB_PG_END = 3,    /* the message is complete */
    FAB_PG_MSG = 4,    /* (fab_pg_read) a whole message in the buffer */
    FAB_PG_BAD_TYPE = -1,
    FAB_PG_BAD_LEN = -2,
    FAB_PG_TOO_BIG = -3, /* (fab_pg_read) the message does not fit in the buffer */
};

struct fab_pg_framer {
    u8 hdr[5];         /* the current message's type byte and length */
    u8 have;           /* header bytes seen: 5 once in the body */
    u8 carried;        /* at FAB_PG_HEADER: header bytes from earlier input (0..4) */
    u8 type;
    u8 bad;
    u32 len;           /* the length field (body + 4) */
    u32 left;          /* body bytes still to come */
    u32 max;           /* the largest accepted length field */
    u64 types[2];      /* accepted type bytes (0-127), a bit each */
};

/* `max`: the largest length field accepted (FAB_PG_LEN_MAX like PostgreSQL); `types`:
 * the accepted type bytes (FAB_PG_FRONTEND_TYPES for a client), or 0 for any. */
static FAB_UNUSED void fab_pg_framer_init(struct fab_pg_framer *f, u32 max, const char *types) {
    fab_zero(f, sizeof *f);
    f->max = max;
    if (!types) {
        f->types[0] = f->types[1] = ~0ull;
        return;
    }
    for (u32 i = 0; types[i]; i++)
        if ((u8)types[i] < 128) f->types[(u8)types[i] >> 6] |= 1ull << ((u8)types[i] & 63);
}

/* Whether the framer is inside a message's body (its header seen, bytes to come). */
FAB_INLINE int fab_pg_in_body(const struct fab_pg_framer *f) {
    return f->have == 5 && f->left;
}
/* Whether the framer is between messages (nothing of a next one seen yet). */
FAB_INLINE int fab_pg_between(const struct fab_pg_framer *f) { return f->have == 0; }

FAB_INLINE int fab__pg_type_ok(const struct fab_pg_framer *f, u8 t) {
    if (t >= 128) return f->types[0] == ~0ull && f->types[1] == ~0ull;
    return (int)((f->types[t >> 6] >> (t & 63)) & 1);
}

/* Step through input *p / *n: consumes what it reports and returns it (see the enum).
 *
 *     while ((r = fab_pg_next(&fr, &p, &n, &piece, &k)) > 0) switch (r) { ... }
 *
 * At FAB_PG_HEADER the rest of the input is still at *p (e.g. to look at a body that
 * arrived whole); the header's bytes are in fr->hdr, fr->carried of them came with
 * earlier input. A zero-length body gives FAB_PG_HEADER then FAB_PG_END. */
FAB_INLINE i32 fab_pg_next(struct fab_pg_framer *f, const u8 **p, u32 *n, const u8 **piece,
                           u32 *piece_len) {
    if (f->bad) return -(i32)f->bad;
    if (f->have == 5 && !f->left) { f->have = 0; return FAB_PG_END; }
    if (!*n) return FAB_PG_MORE;
    if (f->have < 5) {
        u32 prev = f->have, k = fab_min(*n, 5u - prev);
        fab_copy(f->hdr + prev, *p, k);
        f->have = (u8)(prev + k);
        *p += k;
        *n -= k;
        if (f->have < 5) return FAB_PG_MORE;
        f->carried = (u8)prev;
        f->type = f->hdr[0];
        f->len = fab_be32(f->hdr + 1);
        if (!fab__pg_type_ok(f, f->type)) { f->bad = 1; return FAB_PG_BAD_TYPE; }
        if (f->len < 4 || f->len > f->max) { f->bad = 2; return FAB_PG_BAD_LEN; }
        f->left = f->len - 4;
        return FAB_PG_HEADER;
    }
    u32 k = fab_min(*n, f->left);
    *piece = *p;
    *piece_len = k;
    *p += k;
    *n -= k;
    f->left -= k;
    return FAB_PG_BODY;
}

/* A whole message (fab_pg_read): type, body, body length (no header). */
struct fab_pg_msg {
    u8 type;
    const u8 *body;
    u32 len;
};

/* Gather whole messages into `b` (bounded: FAB_PG_TOO_BIG when a body does not fit).
 * Returns FAB_PG_MSG with *m set (its body is b->data; empty b with fab_buf_take before
 * the next call), FAB_PG_MORE when the input is used up, or a negative error. */
static FAB_UNUSED i32 fab_pg_read(struct fab_pg_framer *f, struct fab_buf *b, const u8 **p,
                                  u32 *n, struct fab_pg_msg *m) {
    for (;;) {
        const u8 *piece;
        u32 k;
        i32 r = fab_pg_next(f, p, n, &piece, &k);
        if (r <= 0) return r;
        if (r == FAB_PG_HEADER) {
            if (f->left > b->cap - b->len) { f->bad = 3; return FAB_PG_TOO_BIG; }
        } else if (r == FAB_PG_BODY) {
            fab_buf_put(b, piece, k);
        } else if (r == FAB_PG_END) {
            m->type = f->type;
            m->body = b->data;
            m->len = b->len;
            return FAB_PG_MSG;
        }
    }
}

/* ------------------------------------------------------------------ frontend messages */

/* Parse: statement name, query text, declared parameter types. 0, or -1 if malformed. */
struct fab_pg_parse {
    const u8 *name;
    u32 name_len;
    const u8 *query;
    u32 query_len;
    u32 nparams;
    const u8 *param_oids; /* nparams big-endian u32 */
};

static FAB_UNUSED int fab_pg_parse_msg(const u8 *b, u32 n, struct fab_pg_parse *out) {
    const u8 *end = b + n;
    i32 nl = fab_pg_cstr(b, end);
    if (nl < 0) return -1;
    const u8 *q = b + nl + 1;
    i32 ql = fab_pg_cstr(q, end);
    if (ql < 0) return -1;
    const u8 *t = q + ql + 1;
    if (end - t < 2) return -1;
    u32 np = fab_be16(t);
    if ((u32)(end - t - 2) != 4 * np) return -1;
    out->name = b;
    out->name_len = (u32)nl;
    out->query = q;
    out->query_len = (u32)ql;
    out->nparams = np;
    out->param_oids = t + 2;
    return 0;
}

/* Bind: portal, statement, parameter formats, parameter values, result formats. */
struct fab_pg_bind {
    const u8 *portal;
    u32 portal_len;
    const u8 *stmt;
    u32 stmt_len;
    u32 nparam_formats;
    const u8 *param_formats;  /* big-endian u16 each */
    u32 nparams;
    const u8 *params;         /* each: i32 length (-1: NULL), bytes */
    u32 nresult_formats;
    const u8 *result_formats; /* big-endian u16 each */
};

static FAB_UNUSED int fab_pg_bind_msg(const u8 *b, u32 n, struct fab_pg_bind *out) {
    const u8 *end = b + n;
    i32 pl = fab_pg_cstr(b, end);
    if (pl < 0) return -1;
    const u8 *sn = b + pl + 1;
    i32 sl = fab_pg_cstr(sn, end);
    if (sl < 0) return -1;
    const u8 *x = sn + sl + 1;
    if (end - x < 2) return -1;
    u32 nf = fab_be16(x);
    x += 2;
    if ((u32)(end - x) < 2 * nf + 2) return -1;
    out->param_formats = x;
    x += 2 * nf;
    u32 np = fab_be16(x);
    x += 2;
    out->params = x;
    for (u32 i = 0; i < np; i++) {
        if (end - x < 4) return -1;
        u32 l = fab_be32(x);
        x += 4;
        if (l == 0xffffffffu) continue;
        if ((u32)(end - x) < l) return -1;
        x += l;
    }
    if (end - x < 2) return -1;
    u32 nr = fab_be16(x);
    x += 2;
    if ((u32)(end - x) != 2 * nr) return -1;
    out->portal = b;
    out->portal_len = (u32)pl;
    out->stmt = sn;
    out->stmt_len = (u32)sl;
    out->nparam_formats = nf;
    out->nparams = np;
    out->nresult_formats = nr;
    out->result_formats = x;
    return 0;
}

/* Describe ('D') or Close ('C'): 'S' (statement) or 'P' (portal) and a name. Execute
 * ('E'): a portal and max_rows. 0, or -1 if malformed. */
struct fab_pg_target {
    u8 what;      /* 'S' or 'P' as sent ('P' for Execute); not checked */
    const u8 *name;
    u32 name_len;
    u32 max_rows; /* Execute only: 0 = all */
};

static FAB_UNUSED int fab_pg_target_msg(u8 type, const u8 *b, u32 n, struct fab_pg_target *out) {
    const u8 *end = b + n, *nm = b;
    out->what = 'P';
    out->max_rows = 0;
    if (type != 'E') {
        if (n < 1) return -1;
        out->what = b[0];
        nm = b + 1;
    }
    i32 l = fab_pg_cstr(nm, end);
    if (l < 0) return -1;
    const u8 *after = nm + l + 1;
    if (end - after != (type == 'E' ? 4 : 0)) return -1;
    if (type == 'E') out->max_rows = fab_be32(after);
    out->name = nm;
    out->name_len = (u32)l;
    return 0;
}

/* ------------------------------------------------------------------ keep-alives */

#define FAB_PG_KA_NONE 0
#define FAB_PG_KA_SELECT1 1 /* SELECT 1 */
#define FAB_PG_KA_EMPTY 2   /* ";", the empty query, or comments alone */

/* SQL whitespace as PostgreSQL 15's lexer has it (scan.l `space`): no vertical tab, which
 * makes `SELECT\v1` a syntax error there (a text with one is the server's to answer). */
FAB_INLINE int fab_pg_space(u8 c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f';
}

/* Skip whitespace and comments from q[i]: `--` to the end of the line (or the text), and
 * block comments (slash-star to star-slash), which nest in PostgreSQL. Returns the index
 * of the first byte after them, or FAB_NIL when a block comment is not closed (the
 * server's error is then the answer: such a text is never a keep-alive). */
static FAB_UNUSED u32 fab_pg_skip(const u8 *q, u32 n, u32 i) {
    while (i < n) {
        if (fab_pg_space(q[i])) {
            i++;
        } else if (q[i] == '-' && i + 1 < n && q[i + 1] == '-') {
            for (i += 2; i < n && q[i] != '\n' && q[i] != '\r';) i++;
        } else if (q[i] == '/' && i + 1 < n && q[i + 1] == '*') {
            u32 depth = 1;
            for (i += 2; depth;) {
                if (i + 1 >= n) return FAB_NIL;
                if (q[i] == '/' && q[i + 1] == '*') { depth++; i += 2; }
                else if (q[i] == '*' && q[i + 1] == '/') { depth--; i += 2; }
                else i++;
            }
        } else {
            break;
        }
    }
    return i;
}

/* The keep-alive a query text is: c* ["select" c+ "1" c*] [";" c*], any case, where c is
 * whitespace or a comment: pgx's `-- ping` (pgconn.Ping), a block comment alone and
 * `SELECT 1 -- health` are keep-alives (to the server, comments alone are the empty query). */
static FAB_UNUSED u32 fab_pg_keepalive(const u8 *q, u32 n) {
    u32 i = fab_pg_skip(q, n, 0), kind = FAB_PG_KA_EMPTY;
    if (i == FAB_NIL) return FAB_PG_KA_NONE;
    if (i + 6 <= n && fab_lower(q[i]) == 's') {
        if (!fab_memeq_ci(q + i, "select", 6)) return FAB_PG_KA_NONE;
        i += 6;
        u32 w = i;
        i = fab_pg_skip(q, n, i);
        if (i == FAB_NIL || i == w || i >= n || q[i] != '1') return FAB_PG_KA_NONE;
        i = fab_pg_skip(q, n, i + 1);
        if (i == FAB_NIL) return FAB_PG_KA_NONE;
        kind = FAB_PG_KA_SELECT1;
    }
    if (i < n && q[i] == ';') {
        i = fab_pg_skip(q, n, i + 1);
        if (i == FAB_NIL) return FAB_PG_KA_NONE;
    }
    return i == n ? kind : FAB_PG_KA_NONE;
}

/* The keep-alive a simple Query's body (`len` bytes, NUL-terminated text) is. */
FAB_INLINE u32 fab_pg_keepalive_query(const u8 *body, u32 len) {
    if (!len || body[len - 1]) return FAB_PG_KA_NONE;
    return fab_pg_keepalive(body, len - 1);
}

/* ------------------------------------------------------------------ backend messages */

/* Each builder writes one message at p and returns its length. */

/* A message with no body: ParseComplete '1', BindComplete '2', CloseComplete '3',
 * NoData 'n', EmptyQueryResponse 'I', and the frontend's Sync 'S' / Flush 'H'. 5 bytes. */
FAB_INLINE u32 fab_pg_bare(u8 *p, u8 type) { p[0] = type; fab_put_be32(p + 1, 4); return 5; }
FAB_INLINE u32 fab_pg_parse_complete(u8 *p) { return fab_pg_bare(p, '1'); }
FAB_INLINE u32 fab_pg_bind_complete(u8 *p) { return fab_pg_bare(p, '2'); }
FAB_INLINE u32 fab_pg_close_complete(u8 *p) { return fab_pg_bare(p, '3'); }
FAB_INLINE u32 fab_pg_no_data(u8 *p) { return fab_pg_bare(p, 'n'); }
FAB_INLINE u32 fab_pg_empty_query(u8 *p) { return fab_pg_bare(p, 'I'); }

/* ReadyForQuery: 'I' idle, 'T' in a transaction, 'E' in a failed one. 6 bytes. */
FAB_INLINE u32 fab_pg_ready(u8 *p, u8 status) {
    p[0] = 'Z'; fab_put_be32(p + 1, 5); p[5] = status;
    return 6;
}

#define FAB_PG_FIELD_MAX 200u
/* The largest ErrorResponse fab_pg_error writes. */
#define FAB_PG_ERROR_MAX (5u + 4u * (2u + FAB_PG_FIELD_MAX) + 1u)

static FAB_UNUSED u32 fab__pg_field(u8 *p, u32 n, u8 tag, const char *v) {
    u32 l = fab_min(fab_strlen(v), FAB_PG_FIELD_MAX);
    p[n++] = tag;
    fab_copy(p + n, v, l);
    n += l;
    p[n++] = 0;
    return n;
}

/* ErrorResponse with severity (S and V: "ERROR", "FATAL"), SQLSTATE (C) and message (M),
 * the fields a client needs; at most FAB_PG_ERROR_MAX bytes. */
static FAB_UNUSED u32 fab_pg_error(u8 *p, const char *severity, const char *sqlstate,
                                   const char *message) {
    u32 n = 5;
    p[0] = 'E';
    n = fab__pg_field(p, n, 'S', severity);
    n = fab__pg_field(p, n, 'V', severity);
    n = fab__pg_field(p, n, 'C', sqlstate);
    n = fab__pg_field(p, n, 'M', message);
    p[n++] = 0;
    fab_put_be32(p + 1, n - 1);
    return n;
}

/* CommandComplete with `tag` ("SELECT 1", "BEGIN", ...): 6 + strlen(tag) bytes. */
static FAB_UNUSED u32 fab_pg_command_complete(u8 *p, const char *tag) {
    u32 l = fab_strlen(tag);
    p[0] = 'C';
    fab_put_be32(p + 1, 5 + l);
    fab_copy(p + 5, tag, l);
    p[5 + l] = 0;
    return 6 + l;
}

/* One column of a RowDescription. */
struct fab_pg_col {
    const char *name;
    u32 table_oid;  /* 0: not a table's column */
    u32 attnum;     /* 0 */
    u32 type_oid;   /* FAB_PG_INT4, FAB_PG_TEXT, ... */
    i32 type_len;   /* 4 for int4, -1 for varlena */
    i32 typmod;     /* -1 */
    u32 format;     /* 0 text, 1 binary */
};
#define FAB_PG_BOOL 16
#define FAB_PG_INT8 20
#define FAB_PG_INT4 23
#define FAB_PG_TEXT 25

/* RowDescription of `n` columns: 7 + per column 19 + strlen(name) bytes. */
static FAB_UNUSED u32 fab_pg_row_description(u8 *p, u32 n, const struct fab_pg_col *cols) {
    u32 at = 7;
    p[0] = 'T';
    fab_put_be16(p + 5, n);
    for (u32 i = 0; i < n; i++) {
        const struct fab_pg_col *c = &cols[i];
        u32 l = fab_strlen(c->name);
        fab_copy(p + at, c->name, l);
        at += l;
        p[at++] = 0;
        fab_put_be32(p + at, c->table_oid);
        fab_put_be16(p + at + 4, c->attnum);
        fab_put_be32(p + at + 6, c->type_oid);
        fab_put_be16(p + at + 10, (u32)c->type_len);
        fab_put_be32(p + at + 12, (u32)c->typmod);
        fab_put_be16(p + at + 16, c->format);
        at += 18;
    }
    fab_put_be32(p + 1, at - 1);
    return at;
}

/* DataRow of `n` values (lens[i] == FAB_NIL: NULL): 7 + per value 4 + its length. */
static FAB_UNUSED u32 fab_pg_data_row(u8 *p, u32 n, const u8 *const *vals, const u32 *lens) {
    u32 at = 7;
    p[0] = 'D';
    fab_put_be16(p + 5, n);
    for (u32 i = 0; i < n; i++) {
        fab_put_be32(p + at, lens[i]);
        at += 4;
        if (lens[i] == FAB_NIL) continue;
        fab_copy(p + at, vals[i], lens[i]);
        at += lens[i];
    }
    fab_put_be32(p + 1, at - 1);
    return at;
}

/* ParameterDescription of `n` parameter types (big-endian u32 oids as in Parse, or 0 when
 * n is 0): 7 + 4 n bytes. */
static FAB_UNUSED u32 fab_pg_param_description(u8 *p, u32 n, const u8 *oids) {
    p[0] = 't';
    fab_put_be32(p + 1, 6 + 4 * n);
    fab_put_be16(p + 5, n);
    if (n) fab_copy(p + 7, oids, 4 * n);
    return 7 + 4 * n;
}

/* AuthenticationOk (9 bytes), ParameterStatus (7 + both lengths), BackendKeyData with a
 * 4-byte key (13 bytes): the greeting of a trust-authenticated session. */
FAB_INLINE u32 fab_pg_auth_ok(u8 *p) {
    p[0] = 'R'; fab_put_be32(p + 1, 8); fab_put_be32(p + 5, 0);
    return 9;
}
static FAB_UNUSED u32 fab_pg_parameter_status(u8 *p, const char *name, const char *value) {
    u32 a = fab_strlen(name), b = fab_strlen(value);
    p[0] = 'S';
    fab_put_be32(p + 1, 6 + a + b);
    fab_copy(p + 5, name, a);
    p[5 + a] = 0;
    fab_copy(p + 6 + a, value, b);
    p[6 + a + b] = 0;
    return 7 + a + b;
}
FAB_INLINE u32 fab_pg_backend_key(u8 *p, u32 pid, u32 key) {
    p[0] = 'K'; fab_put_be32(p + 1, 12); fab_put_be32(p + 5, pid); fab_put_be32(p + 9, key);
    return 13;
}

/* What PostgreSQL 15 answers to `SELECT 1`, piece by piece: the RowDescription
 * ("?column?", int4, in `format`: 0 text, 1 binary; 34 bytes), the DataRow (12 or 15),
 * CommandComplete "SELECT 1" (14). Constant bytes (what fab_pg_row_description,
 * fab_pg_data_row and fab_pg_command_complete would build), copied: keep-alives are the
 * hot path of an activator that answers them. */
static FAB_UNUSED const u8 fab__pg_select1[] = {
    'T', 0, 0, 0, 33, 0, 1, '?', 'c', 'o', 'l', 'u', 'm', 'n', '?', 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 23, 0, 4, 0xff, 0xff, 0xff, 0xff, 0, 0,
    'D', 0, 0, 0, 11, 0, 1, 0, 0, 0, 1, '1',
    'C', 0, 0, 0, 13, 'S', 'E', 'L', 'E', 'C', 'T', ' ', '1', 0,
    'Z', 0, 0, 0, 5, 'I'};
static FAB_UNUSED const u8 fab__pg_select1_bin_row[] = {'D', 0, 0, 0, 14, 0, 1, 0, 0, 0, 4, 0, 0, 0, 1};
static FAB_UNUSED const u8 fab__pg_empty_answer[] = {'I', 0, 0, 0, 4, 'Z', 0, 0, 0, 5, 'I'};

FAB_INLINE u32 fab_pg_select1_row_description(u8 *p, u32 format) {
    fab_copy(p, fab__pg_select1, 34);
    p[33] = (u8)format;
    return 34;
}
FAB_INLINE u32 fab_pg_select1_row(u8 *p, u32 format) {
    if (format) { fab_copy(p, fab__pg_select1_bin_row, 15); return 15; }
    fab_copy(p, fab__pg_select1 + 34, 12);
    return 12;
}
FAB_INLINE u32 fab_pg_select1_done(u8 *p) { fab_copy(p, fab__pg_select1 + 46, 14); return 14; }

/* The whole answer to a keep-alive simple Query of `kind` (FAB_PG_KA_SELECT1: T, D, C,
 * Z 'I'; FAB_PG_KA_EMPTY: I, Z 'I'): at most FAB_PG_ANSWER_MAX bytes. */
#define FAB_PG_ANSWER_MAX 66u
FAB_INLINE u32 fab_pg_answer_query(u8 *p, u32 kind) {
    if (kind == FAB_PG_KA_SELECT1) {
        fab_copy(p, fab__pg_select1, sizeof fab__pg_select1);
        return sizeof fab__pg_select1;
    }
    fab_copy(p, fab__pg_empty_answer, sizeof fab__pg_empty_answer);
    return sizeof fab__pg_empty_answer;
}

#endif
