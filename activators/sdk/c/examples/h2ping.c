/* h2ping.c - an example: an HTTP/2 (h2c) activator that answers PING locally.
 *
 * Written with the C SDK (fabricd.h, fab_http2.h, fab_hpack.h) to show how little an
 * HTTP/2 activator needs: per connection a frame reader and the client's HPACK table in a
 * FAB_TABLE; SETTINGS are ACKed, PINGs answered, and every request gets `:status 503` at
 * once (its header block decoded, so the client's dynamic table stays in step); it never
 * wakes a backend. Built by activators/build.py; tests/unit/test_h2ping_example.py drives
 * it with python h2. For the whole protocol (holds, relay, flow control) see
 * activators/http2/http2.c.
 */
#include "../fabricd.h"
#include "../fab_http2.h"
#include "../fab_hpack.h"

struct conn {
    struct fab_h2_reader rd;
    struct fab_hpack_table hp; /* the client's encoder table, as our decoder sees it */
};
FAB_TABLE(conns, struct conn, 16);

static void ignore(void *ctx, const struct fab_hpack_field *f) { (void)ctx; (void)f; }

static void on_open(u32 sid, u32 port) {
    (void)port;
    struct conn *c = fab_table_add(&conns, sid);
    if (!c) { fab_close(sid); return; }
    fab_h2_reader_init(&c->rd, 1);
    fab_hpack_decoder_init(&c->hp);
    u8 s[9];
    fab_send(sid, s, fab_h2_settings(s, 0, 0)); /* the server preface: empty SETTINGS */
}

/* A connection error: GOAWAY with its code, then close. */
static void fail(u32 sid, struct conn *c, u32 code) {
    u8 o[17];
    fab_send(sid, o, fab_h2_goaway(o, 0, code));
    fab_close(sid);
    fab_table_del(&conns, c);
}

static void answer_503(u32 sid, const struct fab_h2_frame *f) {
    u8 hb[16], out[64];
    struct fab_hpack_out o = {hb, 0, sizeof hb};
    u32 n = 0;
    fab_hpack_encode_header(&o, ":status", "503");
    fab_h2_put_block(out, sizeof out, &n, FAB_H2_END_STREAM, f->sid, -1, hb, o.len, 16384);
    fab_send(sid, out, n);
}

static void on_data(u32 sid, const u8 *p, u32 n) {
    struct conn *c = fab_table_get(&conns, sid);
    struct fab_h2_frame f;
    const u8 *block;
    u32 len;
    u8 o[17];
    i32 r;
    if (!c) return;
    while ((r = fab_h2_next(&c->rd, &p, &n, &f)) > 0) {
        if (fab_h2_bad_size(&f)) { fail(sid, c, FAB_H2_FRAME_SIZE_ERROR); return; }
        if (f.type == FAB_H2_PING && !(f.flags & FAB_H2_ACK)) {
            fab_send(sid, o, fab_h2_ping_ack(o, f.payload)); /* answered here, never woken */
            fab_count("pings_answered", 1);
        } else if (f.type == FAB_H2_SETTINGS && !(f.flags & FAB_H2_ACK)) {
            fab_send(sid, o, fab_h2_settings_ack(o));
        } else if (f.type == FAB_H2_HEADERS) {
            if (!(f.flags & FAB_H2_END_HEADERS) || fab_h2_strip(&f, &block, &len)) {
                fail(sid, c, FAB_H2_PROTOCOL_ERROR); /* CONTINUATION: not in this example */
                return;
            }
            if (fab_hpack_decode(&c->hp, block, len, ignore, 0)) {
                fail(sid, c, FAB_H2_COMPRESSION_ERROR);
                return;
            }
            answer_503(sid, &f);
        }
    }
    if (r < 0) fail(sid, c, (u32)-r);
}

static void on_close(u32 sid) {
    struct conn *c = fab_table_get(&conns, sid);
    if (c) fab_table_del(&conns, c);
    fab_close(sid);
}

static const struct fab_handlers H = {.stream_open = on_open, .stream_data = on_data,
                                     .stream_close = on_close};
FAB_STREAM_ACTIVATOR(H)
