/* pgping.c - a PostgreSQL port that answers `SELECT 1` by itself, with the C SDK.
 *
 * An example for activator authors (fabricd.h + fab_pg.h): the guest alone answers every
 * connection, no database behind it: SSLRequest/GSSENCRequest 'N'; a StartupMessage with
 * AuthenticationOk (trust), a few ParameterStatus, BackendKeyData and ReadyForQuery;
 * keep-alive queries (`SELECT 1` in any case, `;`, the empty query, SQL comments around
 * or alone, as pgx's `-- ping`) with the bytes PostgreSQL 15 sends; `SHOW server_version` (built with the generic row builders);
 * Terminate with a close; a CancelRequest with a close; any other query with ERROR 0A000 and
 * ReadyForQuery (an extended-protocol group gets its error at its Sync). So health
 * checks (`psql -c 'SELECT 1'`, pg_isready, a pool's validation query) succeed and the
 * need level stays "none". activators/postgres/postgres.c does the real thing: it relays
 * the rest to a woken backend. Tested in tests/unit/test_pg_sdk.py.
 */
#include "../fabricd.h"
#include "../fab_pg.h"

struct sess {
    u8 started, failed;
    struct fab_pg_framer fr;
    struct fab_buf in; /* the startup packet, then the current message */
    u8 store[1024];
};
FAB_TABLE(sessions, struct sess, 256);

static void bye(u32 sid, struct sess *s, const char *code, const char *text) {
    u8 m[FAB_PG_ERROR_MAX];
    if (code) fab_send(sid, m, fab_pg_error(m, "FATAL", code, text));
    fab_close(sid);
    fab_table_del(&sessions, s);
}

static void greet(u32 sid) {
    u8 *o = fab_send_reserve(sid, 256), *p = o;
    if (!p) return;
    p += fab_pg_auth_ok(p);
    p += fab_pg_parameter_status(p, "server_version", "15.0");
    p += fab_pg_parameter_status(p, "client_encoding", "UTF8");
    p += fab_pg_parameter_status(p, "standard_conforming_strings", "on");
    p += fab_pg_parameter_status(p, "integer_datetimes", "on");
    p += fab_pg_backend_key(p, sid, 0);
    p += fab_pg_ready(p, 'I');
    fab_shrink(4 + (u32)(p - o));
}

/* Gather and answer the packets before the session; 1 once it is established. */
static int startup(u32 sid, struct sess *s, const u8 **d, u32 *n) {
    for (;;) {
        struct fab_pg_startup st;
        u32 kind = fab_pg_startup_peek(s->in.data, s->in.len, &st);
        if (kind == FAB_PG_MORE) {
            u32 want = s->in.len < 8 ? 8 - s->in.len : st.len - s->in.len, k = fab_min(want, *n);
            if (!k) return 0;
            if (fab_buf_put(&s->in, *d, k) < 0) { bye(sid, s, "08P01", "startup packet too long"); return 0; }
            *d += k;
            *n -= k;
        } else if (kind == FAB_PG_SSL || kind == FAB_PG_GSSENC) {
            fab_send(sid, "N", 1);
            fab_buf_take(&s->in, 8);
        } else if (kind == FAB_PG_STARTUP) {
            const u8 *user;
            if (fab_pg_startup_param(s->in.data, s->in.len, "user", &user) <= 0) {
                bye(sid, s, "28000", "no PostgreSQL user name specified in startup packet");
                return 0;
            }
            greet(sid);
            fab_buf_take(&s->in, s->in.len);
            return s->started = 1;
        } else if (kind == FAB_PG_CANCEL) {
            u32 pid;
            const u8 *key;
            if (fab_pg_cancel_key(s->in.data, s->in.len, &pid, &key) >= 0) fab_count("cancels", 1);
            bye(sid, s, 0, 0); /* nothing runs here to cancel */
            return 0;
        } else {
            bye(sid, s, kind == FAB_PG_BAD_PROTOCOL ? "0A000" : kind == FAB_PG_BAD_LENGTH ? "08P01" : 0,
                "unsupported startup packet");
            return 0;
        }
    }
}

static void on_open(u32 sid, u32 port) {
    (void)port;
    struct sess *s = fab_table_add(&sessions, sid);
    if (!s) { fab_close(sid); return; }
    fab_pg_framer_init(&s->fr, 4 + sizeof s->store, FAB_PG_FRONTEND_TYPES);
    fab_buf_init(&s->in, s->store, sizeof s->store);
}

static void on_data(u32 sid, const u8 *d, u32 n) {
    struct sess *s = fab_table_get(&sessions, sid);
    if (!s || (!s->started && !startup(sid, s, &d, &n))) return;
    struct fab_pg_msg m;
    i32 r;
    while ((r = fab_pg_read(&s->fr, &s->in, &d, &n, &m)) == FAB_PG_MSG) {
        u8 out[FAB_PG_ERROR_MAX + 8];
        u32 k = m.type == 'Q' ? fab_pg_keepalive_query(m.body, m.len) : FAB_PG_KA_NONE, len = 0;
        if (m.type == 'X') { bye(sid, s, 0, 0); return; }
        if (k) {
            len = fab_pg_answer_query(out, k);
            fab_count("keepalives_answered", 1);
        } else if (m.type == 'Q' && m.len == 20 && fab_memeq_ci(m.body, "show server_version", 20)) {
            struct fab_pg_col col = {"server_version", 0, 0, FAB_PG_TEXT, -1, -1, 0};
            const u8 *v = (const u8 *)"15.0";
            u32 vl = 4;
            len = fab_pg_row_description(out, 1, &col);
            len += fab_pg_data_row(out + len, 1, &v, &vl);
            len += fab_pg_command_complete(out + len, "SHOW");
            len += fab_pg_ready(out + len, 'I');
        } else if (m.type == 'Q' || (m.type == 'S' && s->failed)) {
            len = fab_pg_error(out, "ERROR", "0A000", "pgping answers only SELECT 1");
            len += fab_pg_ready(out + len, 'I');
        } else if (m.type == 'S') {
            len = fab_pg_ready(out, 'I');
        }
        if (m.type != 'H') s->failed = m.type != 'Q' && m.type != 'S';
        if (len) fab_send(sid, out, len);
        fab_buf_take(&s->in, s->in.len);
    }
    if (r < 0) bye(sid, s, "08P01", "invalid message");
}

static void on_close(u32 sid) {
    struct sess *s = fab_table_get(&sessions, sid);
    if (s) fab_table_del(&sessions, s);
}

static const struct fab_handlers H = {.stream_open = on_open, .stream_data = on_data, .stream_close = on_close};
FAB_STREAM_ACTIVATOR(H)
