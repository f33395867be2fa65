/* postgres.c - the PostgreSQL stream activator (activators/ABI.md, "Streams").
 *
 * Owns the client side of every PostgreSQL connection to the service port so that a
 * database can sleep under open, idle sessions:
 *   - SSLRequest / GSSENCRequest are answered 'N' (or, with "ssl": "passthrough", the
 *     request is forwarded to a woken backend and the pair spliced at its first byte:
 *     TLS end to end); PG 17 direct TLS (first byte 0x16) is always passed through that
 *     way; a backend that never answers gets the client a 57P03 (direct TLS: a close);
 *   - the StartupMessage is held while a backend wakes, then relayed untouched
 *     (protocol 3.0 and 3.2 alike; the authentication exchange is relayed too); until
 *     the backend takes it (its first AuthenticationRequest) a copy is kept, and a FATAL
 *     57P03 (starting up, in recovery, shutting down) is not relayed: the startup goes
 *     again on a new connection, 100 ms doubling to 1 s, within hold_timeout_ms;
 *   - a CancelRequest is forwarded when a backend is up, the connection closed otherwise;
 *   - on an established session whose last ReadyForQuery said 'I' and with nothing in
 *     flight, keep-alive queries (SELECT 1, ';', the empty query, with SQL comments or
 *     comments alone as pgx's "-- ping"; simple and extended protocol) are answered
 *     locally with the bytes a real PostgreSQL 15 sends; so is asyncpg's pool reset query
 *     on a session the backend has heard nothing from since its startup or its last
 *     completed reset (the reset then has nothing to undo);
 *   - need is "active" while any session has a query in flight, is inside a
 *     transaction, waits for a backend or is spliced (TLS: unseen), and "none" otherwise;
 *   - a real query while no backend is up is held (bounded; the client is paused at the
 *     bound) and relayed in order once one is; when the hold runs out the client gets
 *     ErrorResponse 57P03 (FATAL before the session is established, ERROR plus
 *     ReadyForQuery inside one); a startup relayed to a backend that sends nothing back
 *     within hold_timeout_ms (frozen, never thawed) gets the same FATAL 57P03 and a close.
 *   - a CancelRequest goes to the replica running the session it names (the session's
 *     BackendKeyData is noted as it goes by; upstream_connect_like, ABI.md);
 *   - malformed client input is answered as PostgreSQL 15 answers the same bytes (its
 *     FATAL, or a close without a word where it only logs), without waking anything for
 *     itself; what came before it is answered first, by the backend when it has a stake
 *     (then it gets the bad header behind the rest and ends the session itself).
 * Framing is checked in both directions; a backend stream that does not parse is
 * spliced (a plain relay).
 *
 * Config (JSON, all optional): ssl ("passthrough" or anything else = answer 'N'),
 * hold_timeout_ms (30000), startup_timeout_ms (60000: a connection that has not sent its
 * startup packet by then is closed), hold_bytes (all held bytes of the port, <= 6 MiB),
 * stream_hold_bytes (one stream's held bytes before it is paused, 65536),
 * max_message_bytes (largest client message, 1 GiB - 1 like PostgreSQL),
 * local_keepalive (1 answers keep-alives locally, 0 relays them; default 1),
 * need_debounce (1: "none" is reported at the next tick, not at once; default 1).
 *
 * Written with the C SDK: fabricd.h (event loop, stream table, actions, config) and
 * fab_pg.h (startup packets, the message framer both ways, the frontend message readers,
 * the backend message builders, the keep-alive classifier). The held bytes stay in
 * chunk chains of this file: all streams share one pool of 4 KiB chunks taken from the
 * heap only as holding needs them (6 MiB at most), which neither fab_buf (one flat
 * bounded buffer per owner) nor FAB_POOL (blocks reserved in the module's memory up
 * front) gives.
 */
#define FAB_OUT_CAP (1000u * 1024u)
#include "../sdk/c/fabricd.h"
#include "../sdk/c/fab_pg.h"

#define MAX_STREAMS 4096
#define CHUNK 4096
#define MAX_CHUNKS 1536 /* 6 MiB of held bytes at most */
#define CAND_MAX 8192   /* a keep-alive candidate group is at most this many bytes */
#define CAND_MSGS 64    /* ... and this many messages (a pipeline of 15 P/B/D/E + S) */
#define MAX_STMTS 4     /* locally known prepared statements per session */
#define NAME_CAP 64     /* statement names up to 63 bytes are tracked */
#define BACKEND_LEN_MAX 0x40000000u
#define RETRY_MS 1000
#define STARTUP_RETRY_MIN_MS 100  /* first delay before a startup is resent after a 57P03 */
#define STARTUP_RETRY_MAX_MS 1000 /* ... doubling up to this */
#define BPEND_MAX 16384           /* backend bytes held before the startup is taken */
#define NIL FAB_NIL

enum { PH_FREE, PH_INIT, PH_WAIT_STARTUP, PH_STARTUP, PH_SESSION, PH_PASSTHRU, PH_CANCEL,
       PH_SPLICED };
enum { R_FORWARD = 1, R_HOLD, R_CAND, R_DISCARD, R_LOCAL };
#define K_NONE FAB_PG_KA_NONE
#define K_SELECT1 FAB_PG_KA_SELECT1

struct buf {
    u32 head, tail; /* chunk indices, NIL when empty */
    u32 off;        /* read offset in head */
    u32 fill;       /* bytes used in tail */
    u32 len;
};

#define MAXP 4 /* declared parameter types of a keep-alive statement */
struct stmt {
    u8 kind, mat, nlen, np;
    u32 oids[MAXP]; /* its declared parameter types (a Bind must supply np values) */
    u8 name[NAME_CAP];
};

struct stream {
    u32 id;
    u8 phase, status, connected, inflight, paused, busy, work, holding;
    u8 ssl_seen, gss_seen, unsynced, swallow, discard_sync, mat_pending, mat_unnamed;
    u8 mat_mask, hold_quiescent, t0_set, unnamed_kind, nstmt, cand_msgs;
    u8 route;             /* where the current client message goes (R_*) */
    u8 bdrop, bz;         /* backend: the current message is swallowed; its RFQ status */
    u8 unp;               /* the unnamed keep-alive statement's declared types ... */
    u32 uoids[MAXP];      /* ... (its kind is unnamed_kind) */
    u8 bunnamed;          /* the backend may hold an unnamed statement (a relayed Parse) */
    u8 kill_unnamed;      /* a local Query/Parse/Close dropped it: Close it upstream first */
    u8 mat_kill;          /* ... pending with the held prefix (mat_pending) */
    u8 bcopy;             /* the backend sent CopyInResponse: it ignores Syncs until c/f */
    u8 copy_syncs;        /* Syncs relayed since the last Query/Execute */
    u16 cand_sent;        /* bytes of the group's local answer sent at a Flush ... */
    u16 cand_sent_msgs;   /* ... and how many messages they were */
    u16 bskip;            /* backend answers to drop: those the client had from us */
    u8 doomed;            /* client input stopped parsing (BAD_TYPE/BAD_LEN, below): what it
                           * sent later is dropped; the backend was handed the bad header */
    u8 term;              /* a Terminate was relayed or held: later client bytes are dropped */
    u8 kset;              /* the backend's BackendKeyData went by: kpid, khash are its */
    u8 has_like;          /* a CancelRequest for the session on stream `like` */
    u8 banswered;         /* a backend byte came after the startup was relayed */
    u8 clean;             /* nothing reached the backend since the startup or since a reset
                           * query it completed: asyncpg's reset query is then a no-op */
    u8 resetting;         /* the reset query relayed alone from an idle session */
    u8 acked;             /* the backend took the startup (an 'R', or an answer relayed) */
    u8 retries;           /* startups resent after a 57P03 (starting up, shutting down) */
    u16 retry_delay;      /* ms before the next one: 100, doubling to 1000 */
    u16 kpos;             /* bytes of BackendKeyData's body seen */
    u32 kpid, khash;      /* its process id, a hash of its secret key (any length, 3.2) */
    u32 like;
    u32 bnames[8];        /* hashes of statement names the backend may have (a Bloom bit set) */
    u32 pending;
    u64 t0, connect_at;
    u64 st0, retry_at;    /* when the startup packet came; when to connect again */
    struct buf hold, cand;
    struct buf replay;    /* the StartupMessage, kept until the backend takes it */
    struct buf bpend;     /* the backend's first messages, held until they say which */
    struct buf blast;     /* the last 57P03 answer, relayed when the retries run out */
    struct fab_pg_framer fr;  /* client messages */
    struct fab_pg_framer bfr; /* backend messages */
    struct stmt stmts[MAX_STMTS];
};

FAB_TABLE(streams, struct stream, MAX_STREAMS);

static u8 *chunk_mem[MAX_CHUNKS];
static u32 chunk_next[MAX_CHUNKS];
static u32 chunk_free = NIL;
static u32 nchunks_made, nchunks_used, max_chunks = MAX_CHUNKS;

static int ssl_passthrough;
static int local_keepalive = 1;
static u32 hold_timeout_ms = 30000;
static u32 startup_timeout_ms = 60000;
static u32 stream_hold_bytes = 65536;
static u32 max_message_bytes = FAB_PG_LEN_MAX;
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
       C_PROTOCOL_ERRORS, C_CANCELS_FORWARDED, C_CANCELS_CLOSED, C_STATEMENTS_RECREATED,
       C_CANCELS_MATCHED, C_STARTUP_TIMEOUTS, C_STARTUP_RETRIES, NCOUNT };
static const char *const count_names[NCOUNT] = {
    "keepalives_answered", "wake_startup", "wake_query", "wake_tls", "hold_timeouts",
    "protocol_errors", "cancels_forwarded", "cancels_closed", "statements_recreated",
    "cancels_matched", "startup_timeouts", "startup_retries"};
static u32 counts[NCOUNT];
static u32 counted; /* a bit per counter with something to send (batch_end) */
#define COUNT(c) (counts[c]++, counted |= 1u << (c))

static u8 scratch[CAND_MAX + 16];
static u8 startup_pkt[FAB_PG_STARTUP_MAX + 8]; /* a StartupMessage being checked, NUL after it */
static u8 resp[8192];
static u32 resp_len;

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
        u32 k = fab_min(n, CHUNK - b->fill);
        fab_copy(chunk_mem[b->tail] + b->fill, p, k);
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
        u32 k = fab_min(n, CHUNK - pos);
        fab_copy(dst, chunk_mem[c] + pos, k);
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

/* One SDK action within the call's budget: it counts only when it was written (then
 * `acted` is 1; the answer's room shrinks with every action written). */
static int acted;
#define ACT(call)                                                                          \
    do {                                                                                   \
        acted = 0;                                                                         \
        if (budget) {                                                                      \
            u32 room_ = fab_room();                                                        \
            call;                                                                          \
            if (fab_room() != room_) { budget--; acted = 1; }                              \
        }                                                                                  \
    } while (0)

/* Bytes to one side of a stream, appended to the previous action when that was the
 * same send to the same stream (one send per stream and side per answer, ABI.md). */
static void send_bytes(u32 kind, u32 sid, const u8 *d, u32 n) {
    if (!n || fab_append(kind, sid, d, n) == 0) return;
    if (kind == FAB_ACT_UPSTREAM_SEND) ACT(fab_upstream_send(sid, d, n));
    else ACT(fab_send(sid, d, n));
}

static void send_up(struct stream *s, const u8 *d, u32 n) { send_bytes(FAB_ACT_UPSTREAM_SEND, s->id, d, n); }
static void send_down(struct stream *s, const u8 *d, u32 n) { send_bytes(FAB_ACT_DOWNSTREAM_SEND, s->id, d, n); }

static void logmsg(u32 level, const char *a, const char *b) {
    ACT(fab_logf(level, "%s%s", a, b ? b : ""));
}

/* ---------------------------------------------------------------- streams */

static void update(struct stream *s);

static struct stream *stream_new(u32 id) {
    struct stream *s = fab_table_add(&streams, id);
    if (!s) return 0;
    s->id = id;
    s->phase = PH_INIT;
    s->status = 'I';
    s->clean = 1;
    buf_init(&s->hold);
    buf_init(&s->cand);
    buf_init(&s->replay);
    buf_init(&s->bpend);
    buf_init(&s->blast);
    fab_pg_framer_init(&s->fr, max_message_bytes, FAB_PG_FRONTEND_TYPES);
    fab_pg_framer_init(&s->bfr, BACKEND_LEN_MAX, 0);
    return s;
}

static void stream_free(struct stream *s) {
    buf_consume(&s->hold, s->hold.len);
    buf_consume(&s->cand, s->cand.len);
    buf_consume(&s->replay, s->replay.len);
    buf_consume(&s->bpend, s->bpend.len);
    buf_consume(&s->blast, s->blast.len);
    s->phase = PH_FREE;
    update(s);
    fab_table_del(&streams, s);
}

/* Idle with nothing in flight either way: a local answer cannot be out of order (nor
 * land inside a backend message still arriving, e.g. a NotificationResponse). */
static int quiescent(const struct stream *s) {
    return s->phase == PH_SESSION && !s->pending && !s->unsynced && s->status == 'I'
           && !s->swallow && !s->hold.len && !s->discard_sync && !s->bskip
           && fab_pg_between(&s->bfr);
}

/* Recompute the stream's flags and the port-wide counters they feed. */
static void update(struct stream *s) {
    u8 busy = 0, work = 0, holding = 0;
    switch (s->phase) {
    case PH_INIT: /* timed: a client that never completes its startup packet is closed */
        holding = 1;
        break;
    case PH_WAIT_STARTUP:
        busy = 1; work = 1; holding = 1;
        break;
    case PH_PASSTHRU: /* timed until the backend's first byte (then spliced) */
        busy = 1; work = !s->connected; holding = 1;
        break;
    case PH_STARTUP:
        /* timed until the backend says anything (a frozen one never does); once resent
         * after a 57P03, until it takes the startup. Work: a connect again, or client
         * bytes held until the backend took the startup. */
        busy = 1;
        holding = !s->banswered || (s->retries && !s->acked);
        work = !s->connected || (s->acked && s->hold.len);
        break;
    case PH_SPLICED: /* TLS end to end: a query may be in flight, unseen; never freeze it */
        busy = 1;
        break;
    case PH_SESSION:
        busy = s->pending || s->unsynced || s->status != 'I' || s->swallow || s->hold.len
               || s->doomed;
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
    if (s->connected) ACT(fab_upstream_close(s->id));
    ACT(fab_close(s->id));
    stream_free(s);
}

static void fatal(struct stream *s, const char *code, const char *text) {
    u8 m[FAB_PG_ERROR_MAX];
    if (code[0] == '0' && code[1] == '8') COUNT(C_PROTOCOL_ERRORS);
    /* not inside a backend message still arriving: then the close says it */
    if (fab_pg_between(&s->bfr)) send_down(s, m, fab_pg_error(m, "FATAL", code, text));
    logmsg(FAB_WARNING, "postgres activator: closing a client connection: ", text);
    close_stream(s);
}

/* A message text with a protocol version in it ("... 1234.5679: ..."), as the server
 * formats it; at most 127 bytes. */
static const char *version_text(char *o, const char *head, u32 code, const char *tail) {
    u32 at = 0;
    for (const char *p = head; *p; p++) o[at++] = *p;
    at = fab__fmt_u(o, at, 100, code >> 16, 10);
    o[at++] = '.';
    at = fab__fmt_u(o, at, 100, code & 0xffff, 10);
    for (const char *p = tail; *p && at < 126; p++) o[at++] = *p;
    o[at] = 0;
    return o;
}

/* What PostgreSQL 15 answers to a startup packet of a protocol it does not speak (any
 * major version but 3, a second SSLRequest): FATAL 0A000; to a major version below 3 in
 * the old protocol's format ('E', then the text), which such a client reads. */
static void refuse_version(struct stream *s, u32 code) {
    char t[128];
    COUNT(C_PROTOCOL_ERRORS);
    version_text(t, "unsupported frontend protocol ", code, ": server supports 3.0 to 3.0");
    if ((code >> 16) < 3) {
        u8 m[160];
        u32 n = 0;
        m[n++] = 'E';
        for (const char *p = "FATAL:  "; *p; p++) m[n++] = (u8)*p;
        for (const char *p = t; *p; p++) m[n++] = (u8)*p;
        m[n++] = '\n';
        m[n++] = 0;
        send_down(s, m, n);
    } else {
        u8 m[FAB_PG_ERROR_MAX];
        send_down(s, m, fab_pg_error(m, "FATAL", "0A000", t));
    }
    logmsg(FAB_WARNING, "postgres activator: closing a client connection: ", t);
    close_stream(s);
}

/* A protocol violation the server answers by closing without a word (COMMERROR: logged
 * on its side only): counted and logged here, and the connection closed. */
static void drop_silently(struct stream *s, const char *why) {
    COUNT(C_PROTOCOL_ERRORS);
    logmsg(FAB_WARNING, "postgres activator: closing a client connection: ", why);
    close_stream(s);
}

static void try_connect(struct stream *s) {
    if (s->inflight || s->connected) return;
    if (s->phase == PH_CANCEL && s->has_like) ACT(fab_connect_like(s->id, 0, s->like));
    else ACT(fab_connect(s->id, 0));
    if (!acted) return;
    s->inflight = 1;
    s->connect_at = now_ms;
}

static void pause_if_full(struct stream *s) {
    u32 n = s->hold.len + s->cand.len;
    if (!s->paused && (n >= stream_hold_bytes || nchunks_used * 4 >= max_chunks * 3)) {
        ACT(fab_pause(s->id));
        s->paused = 1;
        update(s);
    }
}

static void resume(struct stream *s) {
    ACT(fab_resume(s->id));
    s->paused = 0;
}

static int hold_bytes_in(struct stream *s, const u8 *p, u32 n) {
    if (!s->hold.len && s->phase == PH_SESSION && !backend_up) COUNT(C_WAKE_QUERY);
    if (buf_append(&s->hold, p, n) < 0) {
        fatal(s, "53200", "out of memory holding the connection's bytes");
        return -1;
    }
    pause_if_full(s);
    return 0;
}

/* ---------------------------------------------------------------- keep-alive matching */

static int contains_ci(const u8 *q, u32 n, const char *w) {
    u32 l = fab_strlen(w);
    for (u32 i = 0; i + l <= n; i++)
        if (fab_memeq_ci(q + i, w, l)) return 1;
    return 0;
}

/* asyncpg's reset query (Connection.get_reset_query against PostgreSQL 15), sent as a
 * simple Query by every pool release: on a clean session (above) it changes nothing and
 * PostgreSQL 15 answers it with these bytes (captured; a ParameterStatus only comes when a
 * reported setting was changed, which a clean session has not done). */
static const char reset_query[] =
    "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;";
static const u8 reset_answer[] = {
    'T', 0, 0, 0, 47, 0, 1, 'p', 'g', '_', 'a', 'd', 'v', 'i', 's', 'o', 'r', 'y', '_',
    'u', 'n', 'l', 'o', 'c', 'k', '_', 'a', 'l', 'l', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0xe6,
    0, 4, 0xff, 0xff, 0xff, 0xff, 0, 0,
    'D', 0, 0, 0, 10, 0, 1, 0, 0, 0, 0,
    'C', 0, 0, 0, 13, 'S', 'E', 'L', 'E', 'C', 'T', ' ', '1', 0,
    'C', 0, 0, 0, 21, 'C', 'L', 'O', 'S', 'E', ' ', 'C', 'U', 'R', 'S', 'O', 'R', ' ', 'A',
    'L', 'L', 0,
    'C', 0, 0, 0, 13, 'U', 'N', 'L', 'I', 'S', 'T', 'E', 'N', 0,
    'C', 0, 0, 0, 10, 'R', 'E', 'S', 'E', 'T', 0,
    'Z', 0, 0, 0, 5, 'I'};

/* Whether a Query's body (n bytes with its NUL) is exactly that reset query. */
static int is_reset(const u8 *b, u32 n) {
    return n == sizeof reset_query && fab_memeq(b, reset_query, n);
}

static int name_eq(const struct stmt *t, const u8 *name, u32 n) {
    return t->nlen == n && fab_memeq(t->name, name, n);
}

/* Named statements the backend may have, as bits of a 256-bit set: a keep-alive Parse of
 * such a name is relayed (the server answers 42P05, and a Bind runs its statement). A
 * false positive only relays a keep-alive; bits are never cleared. */
static u32 name_bit(const u8 *name, u32 n) {
    u32 h = 2166136261u;
    for (u32 i = 0; i < n; i++) h = (h ^ name[i]) * 16777619u;
    return (h ^ (h >> 16)) & 255;
}
static void bname_add(struct stream *s, const u8 *name, u32 n) {
    u32 b = name_bit(name, n);
    s->bnames[b >> 5] |= 1u << (b & 31);
}
static int bname_has(const struct stream *s, const u8 *name, u32 n) {
    u32 b = name_bit(name, n);
    return (int)((s->bnames[b >> 5] >> (b & 31)) & 1);
}
static void bname_all(struct stream *s) { __builtin_memset(s->bnames, 0xff, sizeof s->bnames); }

/* Forget the tracked statements; those the backend was given stay in bnames. */
static void forget_all(struct stream *s) {
    for (u32 i = 0; i < s->nstmt; i++)
        if (s->stmts[i].mat) bname_add(s, s->stmts[i].name, s->stmts[i].nlen);
    s->nstmt = 0;
}

/* ---------------------------------------------------------------- declared parameters */

/* Types a keep-alive may declare for its (unused) parameters: those whose input we can
 * check exactly as PostgreSQL 15 does (any other, or 0 = infer, is the server's to answer). */
#define OID_INT8 20u
#define OID_INT2 21u
#define OID_INT4 23u
#define OID_TEXT 25u
#define OID_VARCHAR 1043u
static int param_type_ok(u32 oid) {
    return oid == OID_INT8 || oid == OID_INT2 || oid == OID_INT4 || oid == OID_TEXT
           || oid == OID_VARCHAR;
}

/* Whether the server accepts value v (n bytes) for a parameter of type oid in format
 * fmt; when unsure, no (then the backend answers, with its error if any). Text: an
 * optional sign and 1..19 decimal digits within the type's range (no spaces, no PG 16
 * underscores or prefixes); printable ASCII for text/varchar (valid in every encoding).
 * Binary: the type's width, or printable ASCII. */
static int param_ok(u32 oid, u32 fmt, const u8 *v, u32 n) {
    if (oid == OID_TEXT || oid == OID_VARCHAR) {
        for (u32 i = 0; i < n; i++) if (v[i] < 0x20 || v[i] > 0x7e) return 0;
        return 1;
    }
    u32 width = oid == OID_INT2 ? 2 : oid == OID_INT4 ? 4 : 8;
    if (fmt) return n == width;
    u32 i = 0, neg = 0;
    if (i < n && (v[i] == '-' || v[i] == '+')) neg = v[i++] == '-';
    if (i == n || n - i > 19) return 0;
    u64 x = 0;
    for (; i < n; i++) {
        if (v[i] < '0' || v[i] > '9') return 0;
        x = x * 10 + (v[i] - '0');
    }
    u64 max = width == 2 ? 32767u : width == 4 ? 2147483647u : 9223372036854775807ull;
    return x <= max + neg;
}

/* A Bind's parameters for a statement declaring np types: as many values as types, each
 * one the server accepts (NULL always is), format codes 0 or 1 (none, one for all, or
 * one each). */
static int params_ok(const struct fab_pg_bind *m, u32 np, const u32 *oids) {
    u32 nf = m->nparam_formats;
    if (m->nparams != np || (nf > 1 && nf != np)) return 0;
    for (u32 i = 0; i < nf; i++) if (fab_be16(m->param_formats + 2 * i) > 1) return 0;
    const u8 *x = m->params; /* checked against the message's end by fab_pg_bind_msg */
    for (u32 i = 0; i < np; i++) {
        u32 l = fab_be32(x);
        x += 4;
        if (l == 0xffffffffu) continue;
        u32 fmt = nf == 0 ? 0 : fab_be16(m->param_formats + 2 * (nf == 1 ? 0 : i));
        if (!param_ok(oids[i], fmt, x, l)) return 0;
        x += l;
    }
    return 1;
}

/* ---------------------------------------------------------------- candidate groups */

struct portal { const u8 *name; u32 nlen; u8 kind, fmt, done; };

static struct stmt gstmts[MAX_STMTS];
static u32 gnstmt;
static u8 gunnamed;
static u8 gunp;
static u32 guoids[MAXP];
static u8 gtouch; /* the group replaced or dropped the unnamed statement */

static i32 gfind(const u8 *name, u32 n) {
    for (u32 i = 0; i < gnstmt; i++) if (name_eq(&gstmts[i], name, n)) return (i32)i;
    return -1;
}

static struct portal *portal_find(struct portal *portals, u32 nportals, const u8 *name, u32 n) {
    struct portal *found = 0;
    for (u32 i = 0; i < nportals; i++)
        if (portals[i].nlen == n && fab_memeq(portals[i].name, name, n)) found = &portals[i];
    return found;
}

/* Evaluate the buffered group (one simple Query, or extended messages up to a Sync).
 * Returns 1 when every message can be answered locally; with final, also writes the
 * answers to resp and commits the session's statement table. */
static int group_eval(struct stream *s, int final) {
    u32 n = s->cand.len;
    if (n > CAND_MAX) return 0;
    buf_copy(&s->cand, 0, scratch, n);
    fab_copy(gstmts, s->stmts, sizeof gstmts);
    gnstmt = s->nstmt;
    gunnamed = s->unnamed_kind;
    gunp = s->unp;
    fab_copy(guoids, s->uoids, sizeof guoids);
    gtouch = 0;
    struct portal portals[CAND_MSGS];
    u32 nportals = 0;
    resp_len = 0;
    for (u32 off = 0; off + 5 <= n;) {
        u8 t = scratch[off];
        u32 len = fab_be32(scratch + off + 1);
        const u8 *b = scratch + off + 5;
        u32 blen = len - 4;
        off += 1 + len;
        if (resp_len + 128 > sizeof resp) return 0;
        u8 *r = resp + resp_len;
        if (t == 'Q' && s->clean && is_reset(b, blen)) {
            fab_copy(r, reset_answer, sizeof reset_answer);
            resp_len += sizeof reset_answer;
            gunnamed = K_NONE;
            gtouch = 1;
        } else if (t == 'Q') {
            u32 k = fab_pg_keepalive_query(b, blen);
            if (k == K_NONE) return 0;
            resp_len += fab_pg_answer_query(r, k);
            gunnamed = K_NONE; /* a simple Query drops the unnamed statement */
            gtouch = 1;
        } else if (t == 'P') {
            struct fab_pg_parse m;
            if (fab_pg_parse_msg(b, blen, &m) < 0 || m.name_len >= NAME_CAP
                || m.nparams > MAXP) return 0;
            u32 k = fab_pg_keepalive(m.query, m.query_len);
            if (k == K_NONE) return 0;
            u32 oids[MAXP];
            for (u32 i = 0; i < m.nparams; i++) {
                oids[i] = fab_be32(m.param_oids + 4 * i);
                if (!param_type_ok(oids[i])) return 0; /* 0: the server cannot infer it */
            }
            if (!m.name_len) {
                gunnamed = (u8)k;
                gunp = (u8)m.nparams;
                fab_copy(guoids, oids, sizeof oids);
                gtouch = 1;
            } else {
                if (gfind(m.name, m.name_len) >= 0 || gnstmt >= MAX_STMTS
                    || bname_has(s, m.name, m.name_len)) return 0;
                struct stmt *e = &gstmts[gnstmt++];
                e->kind = (u8)k; e->mat = 0; e->nlen = (u8)m.name_len;
                e->np = (u8)m.nparams;
                fab_copy(e->oids, oids, sizeof oids);
                fab_copy(e->name, m.name, m.name_len);
            }
            resp_len += fab_pg_parse_complete(r);
        } else if (t == 'B') {
            struct fab_pg_bind m;
            if (fab_pg_bind_msg(b, blen, &m) < 0 || m.nresult_formats > 1) return 0;
            u32 fmt = m.nresult_formats ? fab_be16(m.result_formats) : 0;
            if (fmt > 1) return 0;
            u32 kind, np;
            const u32 *oids;
            if (!m.stmt_len) { kind = gunnamed; np = gunp; oids = guoids; }
            else {
                i32 gi = gfind(m.stmt, m.stmt_len);
                if (gi < 0) return 0;
                kind = gstmts[gi].kind; np = gstmts[gi].np; oids = gstmts[gi].oids;
            }
            if (kind == K_NONE || !params_ok(&m, np, oids)) return 0;
            struct portal *pt = portal_find(portals, nportals, m.portal, m.portal_len);
            if (pt && m.portal_len) return 0; /* named portal exists */
            if (!pt) {
                if (nportals >= CAND_MSGS) return 0;
                pt = &portals[nportals++];
            }
            pt->name = m.portal; pt->nlen = m.portal_len;
            pt->kind = (u8)kind; pt->fmt = (u8)fmt; pt->done = 0;
            resp_len += fab_pg_bind_complete(r);
        } else if (t == 'D' || t == 'E' || t == 'C') {
            struct fab_pg_target m;
            if (fab_pg_target_msg(t, b, blen, &m) < 0) return 0;
            if (m.what == 'S') {
                i32 gi = m.name_len ? gfind(m.name, m.name_len) : -1;
                u32 kind = m.name_len ? (gi < 0 ? K_NONE : gstmts[gi].kind) : gunnamed;
                if (kind == K_NONE) return 0;
                if (t == 'D') {
                    u32 np = m.name_len ? gstmts[gi].np : gunp;
                    const u32 *oids = m.name_len ? gstmts[gi].oids : guoids;
                    r[0] = 't';
                    fab_put_be32(r + 1, 6 + 4 * np);
                    fab_put_be16(r + 5, np);
                    for (u32 i = 0; i < np; i++) fab_put_be32(r + 7 + 4 * i, oids[i]);
                    resp_len += 7 + 4 * np;
                    r = resp + resp_len;
                    resp_len += kind == K_SELECT1 ? fab_pg_select1_row_description(r, 0)
                                                  : fab_pg_no_data(r);
                } else { /* Close of a statement only this session has seen */
                    if (!m.name_len) { gunnamed = K_NONE; gtouch = 1; }
                    else {
                        if (gstmts[gi].mat) return 0; /* the backend has it too */
                        gstmts[gi] = gstmts[--gnstmt];
                    }
                    resp_len += fab_pg_close_complete(r);
                }
            } else if (m.what == 'P') {
                struct portal *pt = portal_find(portals, nportals, m.name, m.name_len);
                if (!pt) return 0;
                if (t == 'D') {
                    resp_len += pt->kind == K_SELECT1 ? fab_pg_select1_row_description(r, pt->fmt)
                                                      : fab_pg_no_data(r);
                } else if (t == 'E') {
                    if (pt->done) return 0;
                    pt->done = 1;
                    if (pt->kind == K_SELECT1) {
                        resp_len += fab_pg_select1_row(r, pt->fmt);
                        /* max_rows 1 (asyncpg's fetchval): the row fills it, PortalSuspended */
                        resp_len += m.max_rows == 1 ? fab_pg_bare(resp + resp_len, 's')
                                                    : fab_pg_select1_done(resp + resp_len);
                    } else {
                        resp_len += fab_pg_empty_query(r);
                    }
                } else {
                    *pt = portals[--nportals];
                    resp_len += fab_pg_close_complete(r);
                }
            } else {
                return 0;
            }
        } else if (t == 'S') {
            if (blen) return 0;
            resp_len += fab_pg_ready(r, 'I');
            nportals = 0;
        } else if (t == 'H') {
            if (blen) return 0; /* answered at its place by msg_end */
        } else {
            return 0;
        }
    }
    if (final) {
        fab_copy(s->stmts, gstmts, sizeof gstmts);
        s->nstmt = (u8)gnstmt;
        s->unnamed_kind = gunnamed;
        s->unp = gunp;
        fab_copy(s->uoids, guoids, sizeof guoids);
        if (gtouch && s->bunnamed) s->kill_unnamed = 1;
    }
    return 1;
}

/* ---------------------------------------------------------------- relaying client bytes */

/* A Parse of the statement `name` for a keep-alive of `kind` with its declared types. */
static u32 msg_parse(u8 *p, const u8 *name, u32 nlen, u32 kind, u32 np, const u32 *oids) {
    const char *q = kind == K_SELECT1 ? "SELECT 1" : "";
    u32 ql = fab_strlen(q), n = 5;
    p[0] = 'P';
    fab_copy(p + n, name, nlen); n += nlen; p[n++] = 0;
    fab_copy(p + n, q, ql); n += ql; p[n++] = 0;
    fab_put_be16(p + n, np); n += 2;
    for (u32 i = 0; i < np; i++) { fab_put_be32(p + n, oids[i]); n += 4; }
    fab_put_be32(p + 1, n - 1);
    return n;
}

/* The backend must learn the statements this session answered for itself before it
 * sees anything that may use them: Parse each, then Sync; the answers are swallowed. */
static void emit_prefix(struct stream *s, u32 mask, u32 unnamed, u32 kill) {
    u8 m[NAME_CAP + 32 + 4 * MAXP];
    if (kill && !unnamed) { /* a Parse of the unnamed statement replaces it anyway */
        m[0] = 'C'; fab_put_be32(m + 1, 6); m[5] = 'S'; m[6] = 0; /* Close 'S' "" */
        send_up(s, m, 7);
        s->bunnamed = 0;
    }
    if (unnamed) s->bunnamed = 1;
    for (u32 i = 0; i < s->nstmt; i++)
        if (mask & (1u << i)) {
            const struct stmt *t = &s->stmts[i];
            send_up(s, m, msg_parse(m, t->name, t->nlen, t->kind, t->np, t->oids));
        }
    if (unnamed) send_up(s, m, msg_parse(m, (const u8 *)"", 0, unnamed, s->unp, s->uoids));
    send_up(s, m, fab_pg_bare(m, 'S'));
    s->swallow++;
    COUNT(C_STATEMENTS_RECREATED);
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
    u32 kill = replaces_unnamed ? 0 : s->kill_unnamed;
    s->unnamed_kind = K_NONE;
    s->kill_unnamed = 0;
    if (!mask && !unnamed && !kill) return;
    if (route == R_FORWARD) {
        emit_prefix(s, mask, unnamed, kill);
    } else {
        s->mat_pending = 1;
        s->mat_mask = (u8)mask;
        s->mat_unnamed = (u8)unnamed;
        s->mat_kill = (u8)kill;
    }
    for (u32 i = 0; i < s->nstmt; i++) s->stmts[i].mat = 1;
}

static void drop_stmt(struct stream *s, const u8 *name, u32 n) {
    for (u32 i = 0; i < s->nstmt; i++)
        if (name_eq(&s->stmts[i], name, n)) { s->stmts[i] = s->stmts[--s->nstmt]; return; }
}

/* Account a client message relayed (or held for relaying) to the backend. In copy-in
 * mode the server ignores Syncs (and answers no ReadyForQuery to them): those relayed
 * since the COPY's Query/Execute are taken back at CopyDone/CopyFail, and a COPY started
 * by an Execute then waits for its Sync (libpq sends one after CopyDone). */
static void count_msg(struct stream *s, u8 t) {
    s->clean = 0;
    s->resetting = 0;
    if (t == 'Q' || t == 'S' || t == 'F') s->pending++;
    if (t == 'S') {
        s->unsynced = 0;
        if (s->copy_syncs < 255) s->copy_syncs++;
    } else if (t == 'P' || t == 'B' || t == 'D' || t == 'E' || t == 'C' || t == 'H') {
        s->unsynced = 1;
    }
    if (t == 'Q' || t == 'E') s->copy_syncs = 0;
    if ((t == 'c' || t == 'f') && s->bcopy) {
        u32 k = fab_min(s->copy_syncs, s->pending);
        s->pending -= k;
        if (k) s->unsynced = 1;
        s->bcopy = 0;
        s->copy_syncs = 0;
    }
}

/* Whether a Query's text (NUL-terminated, n bytes with it) is exactly DEALLOCATE [PREPARE]
 * ALL or DISCARD ALL (any case, whitespace, an optional ';'): every prepared statement
 * gone (neither is transactional; DISCARD ALL fails inside a transaction block). */
static int drops_all_statements(const u8 *q, u32 n, u8 status) {
    if (!n || q[n - 1] || status == 'E') return 0;
    n--;
    u32 i = 0, w;
    while (i < n && fab_pg_space(q[i])) i++;
    if (i + 10 <= n && fab_memeq_ci(q + i, "deallocate", 10)) {
        i += 10;
        w = i;
        while (i < n && fab_pg_space(q[i])) i++;
        if (i == w) return 0;
        if (i + 7 <= n && fab_memeq_ci(q + i, "prepare", 7)) {
            i += 7;
            w = i;
            while (i < n && fab_pg_space(q[i])) i++;
            if (i == w) return 0;
        }
    } else if (i + 7 <= n && fab_memeq_ci(q + i, "discard", 7)) {
        i += 7;
        w = i;
        while (i < n && fab_pg_space(q[i])) i++;
        if (i == w || status == 'T') return 0;
    } else {
        return 0;
    }
    if (i + 3 > n || !fab_memeq_ci(q + i, "all", 3)) return 0;
    i += 3;
    while (i < n && fab_pg_space(q[i])) i++;
    if (i < n && q[i] == ';') i++;
    while (i < n && fab_pg_space(q[i])) i++;
    return i == n;
}

/* What a relayed message tells about the backend's statements; `b` holds the first
 * `n` bytes of its body (maybe not all of it). */
static void note_relayed(struct stream *s, u8 t, const u8 *b, u32 n) {
    if (t == 'Q') {
        s->bunnamed = 0;
        if (drops_all_statements(b, n, s->status)) { /* psycopg then reuses its names */
            fab_zero(s->bnames, sizeof s->bnames);
            s->nstmt = 0;
        }
    } else if (t == 'P') {
        i32 l = fab_pg_cstr(b, b + n);
        if (l < 0) { s->bunnamed = 1; bname_all(s); }
        else if (!l) s->bunnamed = 1;
        else bname_add(s, b, (u32)l);
    } else if (t == 'C' && n >= 2 && b[0] == 'S' && !b[1]) {
        s->bunnamed = 0;
    }
}

static int route_bytes(struct stream *s, u32 route, const u8 *p, u32 n) {
    if (route == R_FORWARD && s->phase == PH_STARTUP) {
        /* until the backend takes the startup, what follows it stays here: a 57P03 makes
         * the startup go again, on a new connection, and these after it */
        if (!s->connected || !s->acked || s->hold.len) return hold_bytes_in(s, p, n);
        send_up(s, p, n);
    } else if (route == R_FORWARD) {
        if (s->hold.len || !backend_ready(s)) {
            /* A message already partly relayed: a timeout cannot answer it cleanly. */
            if (!s->hold.len && p != s->fr.hdr) s->hold_quiescent = 0;
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
        i32 l = fab_pg_cstr(b, end);
        if (l < 0) { forget_all(s); return; }
        drop_stmt(s, b, (u32)l);
    } else if (t == 'C') {
        i32 l = n ? fab_pg_cstr(b + 1, end) : -1;
        if (l < 0) { forget_all(s); return; }
        if (b[0] == 'S') drop_stmt(s, b + 1, (u32)l);
        return;
    }
    if (contains_ci(b, n, "deallocate") || contains_ci(b, n, "discard")) forget_all(s);
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
    s->bskip = (u16)(s->bskip + s->cand_sent_msgs);
    s->cand_sent = s->cand_sent_msgs = 0;
    for (u32 off = 0; off + 5 <= n;) {
        u8 t = scratch[off];
        u32 len = fab_be32(scratch + off + 1);
        if (off + 1 + len > n) break;
        const u8 *b = scratch + off + 5;
        off += 1 + len;
        count_msg(s, t);
        note_relayed(s, t, b, len - 4);
        if (s->nstmt && (t == 'P' || t == 'C' || t == 'Q')) forget_stmts(s, t, b, len - 4);
    }
    return route_bytes(s, route, scratch, n);
}

static void answer_locally(struct stream *s) {
    send_down(s, resp + s->cand_sent, resp_len - s->cand_sent);
    COUNT(C_KEEPALIVES);
    buf_consume(&s->cand, s->cand.len);
    s->cand_msgs = 0;
    s->cand_sent = s->cand_sent_msgs = 0;
}

/* A Flush inside an answerable group (asyncpg prepares with Parse/Describe/Flush and
 * waits): send what the server would have sent by now; the group stays buffered, so
 * that if it turns out not to be all keep-alives, spill relays all of it and the
 * backend's answers to this part are dropped (bskip). */
static void flush_answers(struct stream *s) {
    send_down(s, resp + s->cand_sent, resp_len - s->cand_sent);
    u32 k = 0;
    for (u32 off = 0; off + 5 <= resp_len; off += 1 + fab_be32(resp + off + 1)) k++;
    s->cand_sent = (u16)resp_len;
    s->cand_sent_msgs = (u16)k;
}

/* Fast path for the first message of a would-be group when its whole body is in this
 * read (the common case): a Query or Parse that is no keep-alive is relayed without
 * being buffered, a keep-alive Query is answered at once. 0: no decision. */
static int peek_decide(struct stream *s, const u8 *b, u32 n) {
    u8 t = s->fr.type;
    u32 len = s->fr.left;
    if (s->cand.len || n < len || !len || b[len - 1]) return 0;
    if (t == 'Q') {
        u32 k = fab_pg_keepalive(b, len - 1);
        int reset = s->clean && is_reset(b, len);
        if (k == K_NONE && !reset) return 1;
        if (reset) send_down(s, reset_answer, sizeof reset_answer);
        else send_down(s, resp, fab_pg_answer_query(resp, k));
        COUNT(C_KEEPALIVES);
        s->unnamed_kind = K_NONE; /* a simple Query drops the unnamed statement */
        if (s->bunnamed) s->kill_unnamed = 1;
        return 2;
    }
    if (t == 'P') {
        i32 nl = fab_pg_cstr(b, b + len);
        if (nl < 0) return 0;
        i32 ql = fab_pg_cstr(b + nl + 1, b + len);
        if (ql < 0) return 0;
        return fab_pg_keepalive(b + nl + 1, (u32)ql) == K_NONE ? 1 : 0;
    }
    return 0;
}

static void drop_cand(struct stream *s) {
    buf_consume(&s->cand, s->cand.len);
    s->cand_msgs = 0;
    s->cand_sent = s->cand_sent_msgs = 0;
}

/* A client message header is complete (s->fr): choose where its bytes go; p/n are the
 * rest of this read. Returns 0 when the stream was closed. */
static int msg_begin(struct stream *s, const u8 *p, u32 n) {
    u8 t = s->fr.type;
    u32 len = s->fr.len;
    if (s->phase == PH_STARTUP) {
        s->route = R_FORWARD;
        if (t != 'p') s->clean = s->resetting = 0; /* pipelined behind the startup */
    } else if (s->discard_sync && t == 'X') {
        close_stream(s); /* the group being skipped never reached a backend */
        return 0;
    } else if (s->discard_sync) {
        s->route = R_DISCARD;
    } else {
        /* A Terminate ends the session where it stands: an unsynced group buffered for a
         * local answer is never answered (the server sends nothing for it either) */
        if (t == 'X' && s->cand.len) drop_cand(s);
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
            int idle = !s->pending && !s->unsynced && s->status == 'I';
            count_msg(s, t);
            /* the reset query alone: once the backend completes it, the session is clean */
            if (t == 'Q' && idle && n >= s->fr.left && is_reset(p, s->fr.left)) s->resetting = 1;
            note_relayed(s, t, p, fab_min(n, s->fr.left));
            if (s->nstmt && (t == 'P' || t == 'C' || t == 'Q')) {
                if (n >= s->fr.left) forget_stmts(s, t, p, s->fr.left); /* body at hand */
                else forget_all(s);
            }
        }
    }
    return route_bytes(s, s->route, s->fr.hdr, 5) == 0;
}

static int msg_end(struct stream *s) {
    if (s->fr.type == 'X') s->term = 1; /* the server reads nothing after it */
    if (s->route == R_LOCAL) return 1;
    if (s->route == R_DISCARD) {
        if (s->fr.type == 'S' && s->discard_sync) {
            u8 m[8];
            s->discard_sync = 0;
            send_down(s, m, fab_pg_ready(m, s->status));
        }
        return 1;
    }
    if (s->route != R_CAND) return 1;
    u8 t = s->fr.type;
    if (t == 'H' && s->cand.len == 5) { /* a lone Flush: nothing to flush */
        buf_consume(&s->cand, 5);
        s->cand_msgs = 0;
        return 1;
    }
    int final = t == 'Q' || t == 'S';
    /* a backend message arriving meanwhile (a NotificationResponse) must not be cut by
     * our answer: then the backend, which is up, answers the group instead */
    if (((final || t == 'H') && !fab_pg_between(&s->bfr)) || !group_eval(s, final))
        return spill(s) == 0;
    if (final) answer_locally(s);
    else if (t == 'H') flush_answers(s);
    return 1;
}

/* ---------------------------------------------------------------- client framing errors */

/* The message types PostgreSQL reads with its small limit (PQ_SMALL_MESSAGE_LIMIT): a
 * longer one ends the session like a length below 4. */
#define SMALL_MSG_MAX 10000u
static int small_type(u8 t) {
    return t == 'C' || t == 'D' || t == 'E' || t == 'H' || t == 'S' || t == 'X' || t == 'c'
           || t == 'f';
}

enum { BAD_TYPE = 1, BAD_LEN, BAD_OWN_LIMIT };

/* Whether the backend has a stake in the session's next bytes: answers still owed
 * (to relayed messages, or to held ones it is to get), a message of it half relayed,
 * the authentication under way. */
static int owes(const struct stream *s) {
    return s->phase == PH_STARTUP || s->pending || s->unsynced || s->swallow || s->bskip
           || s->hold.len || s->bcopy || s->mat_pending || !fab_pg_between(&s->bfr);
}

/* What PostgreSQL 15 does at a header it cannot take, said by us when the backend has
 * no stake: an unknown type is FATAL 08P01 "invalid frontend message type N"; a length
 * below 4 or over its limit ends the session without a word (COMMERROR). */
static void bad_local(struct stream *s, u32 why, u8 type) {
    if (why == BAD_TYPE && fab_pg_between(&s->bfr)) {
        char t[64];
        u32 at = 0;
        for (const char *q = "invalid frontend message type "; *q; q++) t[at++] = *q;
        at = fab__fmt_u(t, at, 60, type, 10);
        t[at] = 0;
        u8 m[FAB_PG_ERROR_MAX];
        send_down(s, m, fab_pg_error(m, "FATAL", "08P01", t));
    }
    close_stream(s);
}

/* The client's bytes stopped parsing (why: BAD_*). Everything before the bad header is
 * answered first, as the server does, then the session ends the server's way. If the
 * backend has a stake, it is handed the bad header after the rest (held with it while
 * none is up) and answers it itself: its FATAL, or its close; a length only our
 * max_message_bytes refuses goes as length 0, which the server refuses silently too.
 * Later client bytes are dropped. Returns 0 when the stream was closed. */
static int client_bad(struct stream *s, u32 why) {
    u8 h[5];
    fab_copy(h, s->fr.hdr, 5);
    COUNT(C_PROTOCOL_ERRORS);
    ACT(fab_logf(FAB_WARNING, "postgres activator: a client sent %s (type %u, length %u); ending its session",
                 why == BAD_TYPE ? "an invalid message type" : "an invalid message length",
                 (u32)h[0], fab_be32(h + 1)));
    if (s->phase == PH_SESSION && s->cand.len) {
        if (group_eval(s, 0)) {
            /* the server flushes what it answered with its FATAL (a silent end flushes nothing) */
            if (why == BAD_TYPE) send_down(s, resp + s->cand_sent, resp_len - s->cand_sent);
            drop_cand(s);
        } else if (spill(s) < 0) {
            return 0;
        }
    }
    if (!owes(s)) {
        bad_local(s, why, h[0]);
        return 0;
    }
    if (why == BAD_OWN_LIMIT) fab_put_be32(h + 1, 0);
    s->doomed = (u8)why;
    if (route_bytes(s, R_FORWARD, h, 5) < 0) return 0;
    return 1;
}

/* Client bytes of an established (or establishing) session. Returns 0 if closed. */
static int client_feed(struct stream *s, const u8 *p, u32 n) {
    const u8 *piece;
    u32 k;
    i32 r;
    if (s->doomed || s->term) return 1; /* nothing after it is read */
    while ((r = fab_pg_next(&s->fr, &p, &n, &piece, &k)) != FAB_PG_MORE) {
        if (r == FAB_PG_HEADER) {
            if (s->fr.len > SMALL_MSG_MAX && s->phase == PH_SESSION && small_type(s->fr.type)) {
                s->fr.bad = 2;
                return client_bad(s, BAD_LEN);
            }
            if (!msg_begin(s, p, n)) return 0;
        } else if (r == FAB_PG_BODY) {
            if (route_bytes(s, s->route, piece, k) < 0) return 0;
        } else if (r == FAB_PG_END) {
            if (!msg_end(s)) return 0;
            if (s->term) return 1;
        } else {
            u32 why = r == FAB_PG_BAD_TYPE ? BAD_TYPE
                      : s->fr.len >= 4 && s->fr.len <= FAB_PG_LEN_MAX ? BAD_OWN_LIMIT : BAD_LEN;
            return client_bad(s, why);
        }
    }
    return 1;
}

/* ---------------------------------------------------------------- startup */

static void start_wait(struct stream *s, u32 phase) {
    if (!backend_up) COUNT(phase == PH_PASSTHRU ? C_WAKE_TLS : C_WAKE_STARTUP);
    s->phase = (u8)phase;
    s->t0_set = 0; /* the hold starts now, not when the connection opened */
    s->st0 = now_ms;
    update(s);
    try_connect(s);
}

/* ---------------------------------------------------------------- cancel routing */

static u32 key_hash(u32 h, const u8 *p, u32 n) {
    for (u32 i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

/* BackendKeyData body bytes (in pieces, as they are relayed): the pid, then the key. */
static void key_feed(struct stream *s, const u8 *p, u32 n) {
    for (; n && s->kpos < 4; p++, n--, s->kpos++) s->kpid = s->kpid << 8 | *p;
    s->khash = key_hash(s->khash, p, n);
    s->kpos = (u16)fab_min(s->kpos + n, 0xffffu);
}

/* A CancelRequest (a new connection, whose backend the host would choose by the
 * client's address) goes to the backend of the session whose BackendKeyData it carries:
 * with several replicas, any other has never heard of that process and drops it. */
static void match_cancel(struct stream *s, u32 len) {
    u8 pkt[FAB_PG_CANCEL_MAX];
    u32 pid;
    const u8 *key;
    buf_copy(&s->hold, 0, pkt, len);
    i32 kl = fab_pg_cancel_key(pkt, len, &pid, &key);
    if (kl < 0) return;
    u32 h = key_hash(2166136261u, key, (u32)kl);
    struct stream *o;
    for (u32 it = 0; (o = fab_table_next(&streams, &it));) {
        if (o != s && o->kset && o->connected && o->kpid == pid && o->khash == h) {
            s->like = o->id;
            s->has_like = 1;
            COUNT(C_CANCELS_MATCHED);
            return;
        }
    }
}

/* Bytes before the session: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage or
 * a TLS ClientHello (direct TLS). They accumulate in hold until one is complete. */
static void init_feed(struct stream *s) {
    while (s->phase == PH_INIT && s->hold.len) {
        u8 h[8];
        struct fab_pg_startup st;
        buf_copy(&s->hold, 0, h, fab_min(8, s->hold.len));
        if (s->hold.len >= 4 && h[0] != 0x16
            && (fab_be32(h) < 8 || fab_be32(h) - 4 > FAB_PG_STARTUP_MAX)) {
            /* the server judges the length word alone, before it reads on */
            drop_silently(s, "invalid length of startup packet");
            return;
        }
        u32 kind = fab_pg_startup_peek(h, s->hold.len, &st);
        if (kind == FAB_PG_BAD_LENGTH && (st.code == FAB_PG_CODE_SSL || st.code == FAB_PG_CODE_GSSENC)
            && st.len >= 8 && st.len - 4 <= FAB_PG_STARTUP_MAX) {
            /* the server takes the code, whatever the length: an SSLRequest of 12 bytes is
             * answered 'N' like one of 8 */
            if (s->hold.len < st.len) return;
            kind = st.code == FAB_PG_CODE_SSL ? FAB_PG_SSL : FAB_PG_GSSENC;
        }
        switch (kind) {
        case FAB_PG_MORE:
            return;
        case FAB_PG_TLS:
            start_wait(s, PH_PASSTHRU);
            return;
        case FAB_PG_SSL:
        case FAB_PG_GSSENC: {
            int ssl = st.code == FAB_PG_CODE_SSL;
            u8 *seen = ssl ? &s->ssl_seen : &s->gss_seen;
            /* a second one is no request to the server but a protocol version 1234.5679 */
            if (*seen) { refuse_version(s, st.code); return; }
            *seen = 1;
            if (ssl_passthrough) { start_wait(s, PH_PASSTHRU); return; }
            buf_consume(&s->hold, st.len);
            send_down(s, (const u8 *)"N", 1);
            if (s->hold.len) {
                /* sent before our answer: the server refuses it (it may have been injected
                 * by a man in the middle, in clear text ahead of the TLS it asked for) */
                u8 m[FAB_PG_ERROR_MAX];
                COUNT(C_PROTOCOL_ERRORS);
                send_down(s, m, fab_pg_error(m, "FATAL", "08P01", ssl
                    ? "received unencrypted data after SSL request"
                    : "received unencrypted data after GSSAPI encryption request"));
                logmsg(FAB_WARNING, "postgres activator: closing a client connection: ",
                       "data after an SSL or GSSAPI encryption request, before the answer");
                close_stream(s);
                return;
            }
            continue;
        }
        case FAB_PG_CANCEL:
            s->phase = PH_CANCEL; /* the host answers at once when no backend is ready */
            match_cancel(s, st.len);
            try_connect(s);
            return;
        case FAB_PG_BAD_CANCEL: /* the server closes without a word too */
            drop_silently(s, "invalid length of cancel request packet");
            return;
        case FAB_PG_BAD_PROTOCOL:
            refuse_version(s, st.code);
            return;
        case FAB_PG_STARTUP: {
            /* refused here as the server would, before anything wakes for it */
            buf_copy(&s->hold, 0, startup_pkt, st.len);
            startup_pkt[st.len] = 0;
            u32 bad = fab_pg_startup_check(startup_pkt, st.len);
            if (bad == FAB_PG_BAD_LAYOUT) {
                fatal(s, "08P01", "invalid startup packet layout: expected terminator as last byte");
                return;
            }
            if (bad == FAB_PG_NO_USER) {
                COUNT(C_PROTOCOL_ERRORS);
                fatal(s, "28000", "no PostgreSQL user name specified in startup packet");
                return;
            }
            start_wait(s, PH_WAIT_STARTUP);
            return;
        }
        default: /* FAB_PG_BAD_LENGTH: the server closes without a word (COMMERROR) */
            drop_silently(s, "invalid length of startup packet");
            return;
        }
    }
}

/* Send up to max bytes of the stream's hold upstream (one coalesced action). */
static void send_hold(struct stream *s, u32 max) {
    u32 n = fab_min(s->hold.len, max);
    while (n) {
        u32 k = fab_min(n, CHUNK - s->hold.off);
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
        emit_prefix(s, s->mat_mask, s->mat_unnamed, s->mat_kill);
    }
    u32 room = fab_room() + FAB_REC_HDR;
    if (room > 128 * 1024) send_hold(s, fab_min(room - 128 * 1024, 256 * 1024));
    update(s);
}

static u8 refeed[CAND_MAX];
static void send_replay(struct stream *s);

static void on_connected(struct stream *s) {
    u8 h[4];
    if (s->phase == PH_CANCEL) {
        buf_copy(&s->hold, 0, h, 4);
        send_hold(s, fab_be32(h));
        COUNT(C_CANCELS_FORWARDED);
        close_stream(s);
        return;
    }
    if (s->phase == PH_PASSTHRU) {
        /* Spliced at the backend's first byte, not now: a frozen postmaster accepts (its
         * kernel does) and never answers, and a splice would leave the client there. */
        send_hold(s, s->hold.len);
        s->t0_set = 0; /* the backend has hold_timeout_ms from now to answer */
        if (s->paused) resume(s);
        update(s);
        return;
    }
    if (s->phase == PH_STARTUP) { /* the startup again, after a 57P03 */
        send_replay(s);
        s->t0_set = 0;
        update(s);
        return;
    }
    if (s->phase != PH_WAIT_STARTUP) return;
    buf_copy(&s->hold, 0, h, 4);
    {
        /* kept until the backend takes it: one that is starting up or shutting down
         * answers 57P03, and the startup goes again (no copy, no retry) */
        u32 len = fab_be32(h);
        buf_copy(&s->hold, 0, startup_pkt, len);
        if (buf_append(&s->replay, startup_pkt, len) < 0) buf_consume(&s->replay, s->replay.len);
    }
    send_hold(s, fab_be32(h));
    s->phase = PH_STARTUP;
    s->t0_set = 0; /* the backend has hold_timeout_ms from now to answer the startup */
    /* Whatever followed the startup packet is typed messages: parse it as such. */
    struct buf rest = s->hold;
    buf_init(&s->hold);
    int alive = 1;
    while (alive && rest.len) {
        u32 k = fab_min(rest.len, CAND_MAX);
        buf_copy(&rest, 0, refeed, k);
        buf_consume(&rest, k);
        alive = client_feed(s, refeed, k);
    }
    buf_consume(&rest, rest.len);
    if (alive) {
        if (s->paused) resume(s);
        update(s);
    }
}

/* ---------------------------------------------------------------- backend bytes */

static void bmsg_end(struct stream *s) {
    if (s->bfr.type == 'K') s->kset = s->kpos >= 8; /* a pid and a key of 4 bytes or more */
    if (s->bfr.type == 'Z') {
        if (s->bdrop) {
            if (s->swallow) s->swallow--;
        } else {
            if (s->pending) s->pending--;
            s->status = s->bz;
            if (s->resetting) {
                if (!s->pending && s->bz == 'I') s->clean = 1;
                s->resetting = 0;
            }
            s->bcopy = 0;
            if (s->phase == PH_STARTUP) {
                s->phase = PH_SESSION;
                /* a password message only in the authentication exchange: later the
                 * server answers it FATAL 08P01 "invalid frontend message type 112" */
                s->fr.types['p' >> 6] &= ~(1ull << ('p' & 63));
            }
        }
    }
    s->bdrop = 0;
}

static void backend_broken(struct stream *s, const u8 *p, u32 n) {
    logmsg(FAB_WARNING, "postgres activator: backend stream does not parse; relaying it raw", 0);
    send_down(s, p, n);
    if (s->hold.len) flush_hold(s);
    ACT(fab_splice(s->id));
    s->phase = PH_SPLICED;
    if (s->paused) resume(s);
}

/* Backend bytes go to the client as they are, in runs as long as the read allows; only
 * the answers to statements recreated for the backend (swallow) are cut out. */
static void backend_feed(struct stream *s, const u8 *p, u32 n) {
    struct fab_pg_framer *f = &s->bfr;
    const u8 *seg = p, *end = p + n, *piece;
    u32 k, pre = f->have < 5 ? f->have : 0; /* header bytes carried into this read */
    i32 r;
    while ((r = fab_pg_next(f, &p, &n, &piece, &k)) != FAB_PG_MORE) {
        if (r == FAB_PG_BODY) {
            if (f->type == 'Z' && f->left + k == 1) s->bz = piece[0];
            if (f->type == 'K') key_feed(s, piece, k);
            if (s->bdrop) {
                send_down(s, seg, (u32)(piece - seg));
                seg = piece + k;
            }
            continue;
        }
        if (r == FAB_PG_END) {
            bmsg_end(s);
            pre = 0;
            continue;
        }
        /* a header (or a bad one): where this read's part of it starts */
        const u8 *start = p - (5 - f->carried);
        if (r < 0 || (f->type == 'Z' && f->len != 5)) {
            send_down(s, seg, (u32)(start - seg));
            if (f->carried) send_down(s, f->hdr, f->carried);
            backend_broken(s, start, (u32)(end - start));
            return;
        }
        u8 t = f->type;
        if (t == 'K') { s->kset = 0; s->kpos = 0; s->kpid = 0; s->khash = 2166136261u; }
        s->bdrop = s->swallow && t != 'N' && t != 'S' && t != 'A';
        if (!s->swallow && s->bskip && t != 'N' && t != 'S' && t != 'A') {
            if (t == 'E' || t == 'Z') s->bskip = 0; /* it did not go as answered: relay */
            else { s->bdrop = 1; s->bskip--; }
        }
        if (t == 'G' && !s->bdrop) s->bcopy = 1;
        if (t == 'E' && !s->bdrop) s->resetting = 0; /* it failed: not known to be clean */
        if (s->bdrop) {
            send_down(s, seg, (u32)(start - seg));
            seg = p;
        } else if (f->carried) {
            send_down(s, seg, (u32)(start - seg));
            send_down(s, f->hdr, f->carried);
            seg = start;
        }
        s->bz = 'I';
    }
    if (f->have && f->have < 5) end -= f->have - pre; /* a header still arriving */
    send_down(s, seg, (u32)(end - seg));
}

/* ---------------------------------------------------------------- startup retries */

/* A chain's bytes to the client (it stays as it is). */
static void buf_send_down(struct stream *s, const struct buf *b) {
    u32 off = 0;
    while (off < b->len) {
        u32 k = fab_min(b->len - off, (u32)sizeof refeed);
        buf_copy(b, off, refeed, k);
        send_down(s, refeed, k);
        off += k;
    }
}

static void send_replay(struct stream *s) {
    u32 n = s->replay.len;
    buf_copy(&s->replay, 0, startup_pkt, n);
    send_up(s, startup_pkt, n);
}

/* The backend took the startup, or answered it for good: relay what it said so far
 * (held in bpend) and from now on all it says; the client bytes held meanwhile go. */
static void startup_relay(struct stream *s) {
    s->acked = 1;
    buf_consume(&s->replay, s->replay.len);
    buf_consume(&s->blast, s->blast.len);
    struct buf b = s->bpend;
    buf_init(&s->bpend);
    while (b.len) {
        u32 k = fab_min(b.len, (u32)sizeof refeed);
        buf_copy(&b, 0, refeed, k);
        buf_consume(&b, k);
        if (s->phase == PH_SPLICED) send_down(s, refeed, k); /* it did not parse */
        else backend_feed(s, refeed, k);
    }
    if (s->phase == PH_STARTUP && s->hold.len) flush_hold(s);
}

/* A 57P03 before the startup was taken: close this upstream and connect again after a
 * delay (do_work), the startup resent (on_connected). The answer is kept in blast. */
static int startup_retry(struct stream *s) {
    u32 d = s->retry_delay ? s->retry_delay * 2 : STARTUP_RETRY_MIN_MS;
    if (d > STARTUP_RETRY_MAX_MS) d = STARTUP_RETRY_MAX_MS;
    u64 end = s->st0 + hold_timeout_ms, at = now_ms + d; /* the last try: 100 ms before it */
    if (at + STARTUP_RETRY_MIN_MS > end) at = end - STARTUP_RETRY_MIN_MS;
    if (!s->replay.len || now_ms + STARTUP_RETRY_MIN_MS >= end || budget < 4) return 0;
    ACT(fab_upstream_close(s->id));
    if (!acted) return 0;
    s->connected = 0;
    s->banswered = 0;
    buf_consume(&s->blast, s->blast.len);
    s->blast = s->bpend;
    buf_init(&s->bpend);
    s->retry_delay = (u16)d;
    s->retry_at = at;
    if (s->retries < 255) s->retries++;
    COUNT(C_STARTUP_RETRIES);
    if (s->retries == 1)
        logmsg(FAB_INFO, "postgres activator: the backend is not accepting connections yet"
               " (57P03); resending the startup", 0);
    return 1;
}

/* Whether an ErrorResponse body (n bytes) has SQLSTATE 57P03 (cannot connect now). */
static int is_57p03(const u8 *b, u32 n) {
    const u8 *end = b + n;
    while (b < end && *b) {
        u8 tag = *b++;
        i32 l = fab_pg_cstr(b, end);
        if (l < 0) return 0;
        if (tag == 'C') return l == 5 && fab_memeq(b, "57P03", 5);
        b += l + 1;
    }
    return 0;
}

/* Backend bytes before it took the startup. A postmaster that is starting up, in
 * recovery or shutting down answers the startup with FATAL 57P03 and closes; for a 3.2
 * startup PostgreSQL 15 sends NegotiateProtocolVersion ('v') first. So whole 'v' and 'E'
 * messages are held, and an 'E' of 57P03 is retried while the hold lasts; anything else
 * (an 'R', another error, what does not parse) is relayed with what was held. */
static void startup_answer(struct stream *s, const u8 *d, u32 n) {
    u32 had = s->bpend.len;
    if (buf_append(&s->bpend, d, n) < 0) { /* no room to hold: relay, nothing lost */
        u32 took = s->bpend.len - had;
        startup_relay(s);
        if (s->phase == PH_SPLICED) send_down(s, d + took, n - took);
        else backend_feed(s, d + took, n - took);
        return;
    }
    if (s->bpend.len > BPEND_MAX) {
        startup_relay(s);
        return;
    }
    u32 off = 0;
    for (;;) {
        u8 h[5];
        if (s->bpend.len - off < 5) return;
        buf_copy(&s->bpend, off, h, 5);
        u32 len = fab_be32(h + 1);
        if ((h[0] != 'v' && h[0] != 'E') || len < 4 || len > CAND_MAX) break;
        if (s->bpend.len - off - 1 < len) return; /* the rest is still coming */
        if (h[0] == 'E') {
            buf_copy(&s->bpend, off + 5, scratch, len - 4);
            if (is_57p03(scratch, len - 4) && s->bpend.len == off + 1 + len
                && startup_retry(s)) return;
            break;
        }
        off += 1 + len;
    }
    startup_relay(s);
}

/* ---------------------------------------------------------------- hold timeouts */

/* The held messages of an established session will never reach a backend: answer each
 * the way PostgreSQL answers a failed one, and skip the rest of an unfinished group. */
static void session_timeout(struct stream *s) {
    u8 err[FAB_PG_ERROR_MAX], m[8];
    u32 elen = fab_pg_error(err, "ERROR", "57P03", "the database system is not available (hold timeout)");
    u8 st = s->status == 'I' ? 'I' : 'E';
    s->bskip = 0; /* a group answered up to a Flush is held: it never reaches a backend */
    if (s->mat_pending) {
        for (u32 i = 0; i < s->nstmt; i++) if (s->mat_mask & (1u << i)) s->stmts[i].mat = 0;
        s->unnamed_kind = s->mat_unnamed;
        s->kill_unnamed = s->mat_kill;
        s->mat_pending = 0;
    }
    /* a doomed session's hold ends with the bad header it got (client_bad) */
    u32 off = 0, in_group = 0, total = s->hold.len - (s->doomed && s->hold.len >= 5 ? 5 : 0);
    while (off + 5 <= total) {
        u8 h[5];
        buf_copy(&s->hold, off, h, 5);
        u32 len = fab_be32(h + 1);
        if (off + 1 + len > total) break; /* the message still arriving */
        off += 1 + len;
        if (h[0] == 'Q' || h[0] == 'F') {
            send_down(s, err, elen);
            send_down(s, m, fab_pg_ready(m, st));
        } else if (h[0] == 'S') {
            if (!in_group) send_down(s, err, elen);
            send_down(s, m, fab_pg_ready(m, st));
            in_group = 0;
        } else if (h[0] == 'X') {
            close_stream(s);
            return;
        } else if (!in_group) {
            send_down(s, err, elen);
            in_group = 1;
        }
    }
    int partial = !s->doomed && fab_pg_in_body(&s->fr) && s->route != R_CAND;
    if (partial) {
        u8 h[1];
        buf_copy(&s->hold, off, h, 1);
        if (h[0] == 'Q' || h[0] == 'F') {
            send_down(s, err, elen);
            send_down(s, m, fab_pg_ready(m, st));
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
    if (s->paused) resume(s);
    COUNT(C_HOLD_TIMEOUTS);
    logmsg(FAB_INFO, "postgres activator: hold timed out; answered 57P03", 0);
    if (s->doomed) { bad_local(s, s->doomed, s->fr.hdr[0]); return; } /* ... then the bad header */
    update(s);
}

static void check_timeouts(void) {
    struct stream *s;
    for (u32 it = 0; nholding && (s = fab_table_next(&streams, &it));) {
        if (!s->holding) continue;
        if (!s->t0_set) { s->t0 = now_ms; s->t0_set = 1; continue; }
        if (s->phase == PH_INIT) {
            /* PostgreSQL's authentication_timeout: it closes without a word too */
            if (now_ms - s->t0 >= startup_timeout_ms && budget >= 6) close_stream(s);
            continue;
        }
        /* a startup resent after a 57P03 has hold_timeout_ms from the client's startup */
        u64 since = s->phase == PH_STARTUP && s->retries ? now_ms - s->st0 : now_ms - s->t0;
        if (since < hold_timeout_ms) continue;
        if (budget < 6) return;
        if (s->phase == PH_WAIT_STARTUP || s->phase == PH_PASSTHRU) {
            u8 m[FAB_PG_ERROR_MAX];
            /* connected: the backend accepted and never answered (frozen, never thawed) */
            COUNT(s->connected ? C_STARTUP_TIMEOUTS : C_HOLD_TIMEOUTS);
            if (s->phase == PH_PASSTHRU && !s->ssl_seen && !s->gss_seen) {
                if (s->connected)
                    logmsg(FAB_INFO, "postgres activator: the backend did not answer a direct"
                           " TLS ClientHello within the hold timeout; closed", 0);
                close_stream(s); /* direct TLS: no plaintext answer is possible */
            } else {
                /* libpq takes an 'E' for the answer to its SSLRequest and reports it */
                send_down(s, m, fab_pg_error(m, "FATAL", "57P03",
                                             "the database system is not available (hold timeout)"));
                logmsg(FAB_INFO, s->connected
                       ? "postgres activator: the backend did not answer a forwarded encryption"
                         " request within the hold timeout; answered 57P03"
                       : "postgres activator: hold timed out before the session; answered 57P03", 0);
                close_stream(s);
            }
        } else if (s->phase == PH_STARTUP && s->retries) {
            /* still 57P03 (or nothing) when the hold ran out: the backend's last word */
            u8 m[FAB_PG_ERROR_MAX];
            if (s->blast.len) buf_send_down(s, &s->blast);
            else send_down(s, m, fab_pg_error(m, "FATAL", "57P03",
                                              "the database system is not available (hold timeout)"));
            COUNT(s->connected && !s->banswered ? C_STARTUP_TIMEOUTS : C_HOLD_TIMEOUTS);
            logmsg(FAB_INFO, "postgres activator: the backend did not take a startup within the"
                   " hold timeout; relayed its 57P03", 0);
            close_stream(s);
        } else if (s->phase == PH_STARTUP) {
            /* Relayed, and not a byte back: a backend that accepts connections but never
             * runs (a SIGSTOPped postmaster still completes TCP handshakes, so the
             * readiness probe passed). Without this the client would wait for ever. */
            u8 m[FAB_PG_ERROR_MAX];
            send_down(s, m, fab_pg_error(m, "FATAL", "57P03",
                                         "the database system is not available (hold timeout)"));
            logmsg(FAB_WARNING, "postgres activator: the backend did not answer a relayed startup"
                   " within the hold timeout; answered 57P03", 0);
            COUNT(C_STARTUP_TIMEOUTS);
            close_stream(s);
        } else if (s->phase == PH_SESSION) {
            if (!fab_pg_between(&s->bfr)) close_stream(s); /* no answer fits in there */
            else if (s->hold_quiescent) session_timeout(s);
            else { COUNT(C_HOLD_TIMEOUTS); fatal(s, "57P03", "the database system is not available (hold timeout)"); }
        }
    }
}

/* Connects, flushes and resumes that waited for a backend or for buffer space. */
static void do_work(void) {
    struct stream *s;
    for (u32 it = 0; nwork && budget > 4 && (s = fab_table_next(&streams, &it));) {
        if (!s->work) continue;
        int waits = s->phase == PH_WAIT_STARTUP || s->phase == PH_PASSTHRU
                    || (s->phase == PH_STARTUP && now_ms >= s->retry_at);
        if (waits && !s->connected && !s->inflight
            && (backend_up || (ticked && now_ms - s->connect_at >= RETRY_MS)))
            try_connect(s);
        if ((s->phase == PH_SESSION || (s->phase == PH_STARTUP && s->acked)) && s->hold.len)
            flush_hold(s);
        if (s->paused && s->hold.len + s->cand.len < stream_hold_bytes / 2
            && nchunks_used * 2 < max_chunks && (s->phase == PH_SESSION || s->phase == PH_STARTUP
                                                 || s->phase == PH_INIT)) {
            resume(s);
            update(s);
        }
    }
}

/* ---------------------------------------------------------------- events */

static void on_open(u32 id, u32 port) {
    (void)port;
    struct stream *old = fab_table_get(&streams, id);
    if (old) stream_free(old); /* the host reuses ids of streams it has ended */
    struct stream *s = stream_new(id);
    if (!s) {
        logmsg(FAB_WARNING, "postgres activator: stream table full or id reused; closing", 0);
        ACT(fab_close(id));
        return;
    }
    update(s);
}

static void on_data(u32 id, const u8 *d, u32 n) {
    struct stream *s = fab_table_get(&streams, id);
    if (!s) return;
    switch (s->phase) {
    case PH_INIT:
        if (hold_bytes_in(s, d, n) < 0) return;
        init_feed(s);
        return;
    case PH_PASSTHRU:
        if (s->connected) { send_up(s, d, n); return; } /* TLS: the backend's to read */
        hold_bytes_in(s, d, n);
        return;
    case PH_WAIT_STARTUP:
    case PH_CANCEL:
        hold_bytes_in(s, d, n);
        return;
    case PH_STARTUP:
    case PH_SESSION:
        if (client_feed(s, d, n)) update(s); /* doomed or terminated: dropped there */
        return;
    default:
        return;
    }
}

static void on_client_close(u32 id) {
    struct stream *s = fab_table_get(&streams, id);
    if (!s) return;
    if (s->phase == PH_SPLICED) stream_free(s); /* the host has ended the pair */
    else close_stream(s);
}

static void on_connect_result(u32 id, int ok) {
    struct stream *s = fab_table_get(&streams, id);
    if (!s || !s->inflight) return;
    s->inflight = 0;
    if (ok) {
        s->connected = 1;
        backend_up = 1;
        on_connected(s);
        return;
    }
    if (s->phase == PH_CANCEL) { COUNT(C_CANCELS_CLOSED); close_stream(s); return; }
    backend_up = 0;
}

static void on_upstream_data(u32 id, const u8 *d, u32 n) {
    struct stream *s = fab_table_get(&streams, id);
    if (!s || !s->connected) return;
    if (s->phase == PH_PASSTHRU && n) {
        /* the answer to the SSLRequest, or the ServerHello: TLS end to end from here */
        send_down(s, d, n);
        ACT(fab_splice(s->id));
        s->phase = PH_SPLICED;
        if (s->paused) resume(s);
        update(s);
        return;
    }
    if (s->phase == PH_STARTUP || s->phase == PH_SESSION) {
        if (n) s->banswered = 1;
        if (s->phase == PH_STARTUP && !s->acked) startup_answer(s, d, n);
        else backend_feed(s, d, n);
        update(s);
    }
}

static void on_upstream_close(u32 id) {
    struct stream *s = fab_table_get(&streams, id);
    if (!s || !s->connected) return;
    s->connected = 0;
    if (s->phase == PH_STARTUP && !s->acked) buf_send_down(s, &s->bpend); /* its last word */
    ACT(fab_close(s->id));
    stream_free(s);
}

static void on_backend_available(void) { backend_up = 1; }
static void on_backend_unavailable(void) { backend_up = 0; }

static void on_tick(u64 now) {
    now_ms = now;
    ticked = 1;
    ticked_now = 1;
    if (nholding) check_timeouts();
}

static int init(struct fab_json cfg) {
    u8 ssl[16];
    i32 sl = fab_cfg_str(cfg, "ssl", ssl, sizeof ssl);
    ssl_passthrough = sl == 11 && fab_memeq(ssl, "passthrough", 11);
    local_keepalive = fab_cfg_u32(cfg, "local_keepalive", 1) != 0;
    need_debounce = fab_cfg_u32(cfg, "need_debounce", 1) != 0;
    hold_timeout_ms = fab_cfg_u32(cfg, "hold_timeout_ms", 30000);
    startup_timeout_ms = fab_cfg_u32(cfg, "startup_timeout_ms", 60000);
    stream_hold_bytes = fab_cfg_u32(cfg, "stream_hold_bytes", 65536);
    if (stream_hold_bytes < 1024) stream_hold_bytes = 1024;
    u32 hb = fab_cfg_u32(cfg, "hold_bytes", MAX_CHUNKS * CHUNK);
    max_chunks = hb / CHUNK;
    if (max_chunks > MAX_CHUNKS) max_chunks = MAX_CHUNKS;
    if (max_chunks < 16) max_chunks = 16;
    max_message_bytes = fab_cfg_u32(cfg, "max_message_bytes", FAB_PG_LEN_MAX);
    if (max_message_bytes < 1024) max_message_bytes = 1024;
    fab_table_clear(&streams);
    nbusy = nwork = nholding = 0;
    backend_up = 0;
    last_need = 0xff;
    return 0;
}

static void batch_begin(void) {
    ticked_now = 0;
    /* ABI: 4 per event + 16 + 8 per live stream are read; one kept for the need, and
     * the live-stream share taken at 6 (the host may already have ended some). */
    budget = 4 * fab_batch_events() + 16 + 6 * fab_table_count(&streams) - 1 - NCOUNT;
}

static void batch_end(void) {
    if (nwork) do_work();
    budget += NCOUNT;
    while (counted) { /* in counter order; most calls have none */
        u32 i = (u32)__builtin_ctz(counted);
        ACT(fab_count(count_names[i], counts[i]));
        if (!acted) break;
        counts[i] = 0;
        counted &= counted - 1;
    }
    u32 need = nbusy ? FAB_NEED_ACTIVE : FAB_NEED_NONE;
    /* active at once; none only at a tick (within 100 ms), so that 20 clients taking
     * turns do not flip the port's level (a cross-thread post in the host) per query */
    if (need == FAB_NEED_NONE && last_need == FAB_NEED_ACTIVE && need_debounce && !ticked_now)
        need = FAB_NEED_ACTIVE;
    if (need != last_need) {
        budget++;
        ACT(fab_set_need(need));
        if (acted) last_need = need;
    }
}

static const struct fab_handlers H = {
    .init = init,
    .batch_begin = batch_begin,
    .backend_available = on_backend_available,
    .backend_unavailable = on_backend_unavailable,
    .tick = on_tick,
    .stream_open = on_open,
    .stream_data = on_data,
    .stream_close = on_client_close,
    .upstream_result = on_connect_result,
    .upstream_data = on_upstream_data,
    .upstream_close = on_upstream_close,
    .batch_end = batch_end,
};
FAB_STREAM_ACTIVATOR(H)
