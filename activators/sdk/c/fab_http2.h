/* fab_http2.h - HTTP/2 frames (RFC 9113) for fabricd stream activators.
 *
 * Why: an activator that speaks HTTP/2 to its clients (h2c with prior knowledge: gRPC,
 * h2load, nghttp, curl --http2-prior-knowledge) needs the same few pieces every time: the
 * client preface, a frame reader that copes with frames split across reads, padding and
 * priority fields stripped, the fixed frame sizes checked, and the control frames built
 * (SETTINGS and its ACK, PING ACK, GOAWAY, RST_STREAM, WINDOW_UPDATE). With this header,
 * "answer PING locally" is:
 *
 *     #include "fabricd.h"
 *     #include "fab_http2.h"
 *     static struct fab_h2_reader rd;                      one per connection
 *     static void on_open(u32 sid, u32 port) {
 *         (void)port;
 *         u8 s[9]; fab_send(sid, s, fab_h2_settings(s, 0, 0));   the server preface
 *         fab_h2_reader_init(&rd, 1);
 *     }
 *     static void on_data(u32 sid, const u8 *p, u32 n) {
 *         struct fab_h2_frame f; u8 o[17]; i32 r;
 *         while ((r = fab_h2_next(&rd, &p, &n, &f)) > 0) {
 *             if (f.type == FAB_H2_PING && !(f.flags & FAB_H2_ACK) && f.len == 8)
 *                 fab_send(sid, o, fab_h2_ping_ack(o, f.payload));
 *             else if (f.type == FAB_H2_SETTINGS && !(f.flags & FAB_H2_ACK))
 *                 fab_send(sid, o, fab_h2_settings_ack(o));
 *         }
 *         if (r < 0) { fab_send(sid, o, fab_h2_goaway(o, 0, -r)); fab_close(sid); }
 *     }
 *
 * (activators/sdk/c/examples/h2ping.c is that, complete; activators/http2/http2.c the
 * whole activator.) Header blocks: fab_hpack.h.
 *
 * Limits: the reader takes frames up to FAB_H2_MAX_FRAME payload bytes (16,384, the
 * SETTINGS_MAX_FRAME_SIZE default: announce no more unless you define it larger before
 * the include) and buffers at most one partial frame (~16 KiB per reader); a longer
 * frame is FRAME_SIZE_ERROR. Builders write into buffers you size (the sizes are given
 * per builder; fab_h2_put_frame and fab_h2_put_block check a cap). Nothing here traps or
 * reads outside its input, whatever the bytes.
 */
#ifndef FAB_HTTP2_H
#define FAB_HTTP2_H

#ifndef FAB_H2_MAX_FRAME
#define FAB_H2_MAX_FRAME 16384
#endif
#define FAB_H2_HDR 9
#define FAB_H2_DEFAULT_WINDOW 65535
#define FAB_H2_MAX_WINDOW 0x7fffffff

/* frame types */
#define FAB_H2_DATA 0
#define FAB_H2_HEADERS 1
#define FAB_H2_PRIORITY 2
#define FAB_H2_RST_STREAM 3
#define FAB_H2_SETTINGS 4
#define FAB_H2_PUSH_PROMISE 5
#define FAB_H2_PING 6
#define FAB_H2_GOAWAY 7
#define FAB_H2_WINDOW_UPDATE 8
#define FAB_H2_CONTINUATION 9

/* flags */
#define FAB_H2_END_STREAM 0x1
#define FAB_H2_ACK 0x1
#define FAB_H2_END_HEADERS 0x4
#define FAB_H2_PADDED 0x8
#define FAB_H2_PRIORITY_FLAG 0x20

/* settings */
#define FAB_H2_SETTINGS_HEADER_TABLE_SIZE 1
#define FAB_H2_SETTINGS_ENABLE_PUSH 2
#define FAB_H2_SETTINGS_MAX_CONCURRENT_STREAMS 3
#define FAB_H2_SETTINGS_INITIAL_WINDOW_SIZE 4
#define FAB_H2_SETTINGS_MAX_FRAME_SIZE 5
#define FAB_H2_SETTINGS_MAX_HEADER_LIST_SIZE 6

/* error codes (RST_STREAM, GOAWAY) */
#define FAB_H2_NO_ERROR 0x0
#define FAB_H2_PROTOCOL_ERROR 0x1
#define FAB_H2_INTERNAL_ERROR 0x2
#define FAB_H2_FLOW_CONTROL_ERROR 0x3
#define FAB_H2_SETTINGS_TIMEOUT 0x4
#define FAB_H2_STREAM_CLOSED 0x5
#define FAB_H2_FRAME_SIZE_ERROR 0x6
#define FAB_H2_REFUSED_STREAM 0x7
#define FAB_H2_CANCEL 0x8
#define FAB_H2_COMPRESSION_ERROR 0x9
#define FAB_H2_CONNECT_ERROR 0xa
#define FAB_H2_ENHANCE_YOUR_CALM 0xb
#define FAB_H2_INADEQUATE_SECURITY 0xc
#define FAB_H2_HTTP_1_1_REQUIRED 0xd

/* The client connection preface (RFC 9113 3.4), before its first SETTINGS. */
static const u8 FAB_H2_PREFACE[24] = {'P', 'R', 'I', ' ', '*', ' ', 'H', 'T', 'T', 'P', '/', '2',
                                      '.', '0', '\r', '\n', '\r', '\n', 'S', 'M', '\r', '\n',
                                      '\r', '\n'};

/* ------------------------------------------------------------------ reading */

/* One frame: its payload is valid until the next fab_h2_next on the same reader (it points
 * into your input or into the reader's buffer). */
struct fab_h2_frame {
    u32 len;
    u32 type;
    u32 flags;
    u32 sid; /* the reserved bit cleared */
    const u8 *payload;
};

/* The 9-byte header at p (the caller has 9 bytes). */
FAB_INLINE void fab_h2_frame_header_parse(const u8 *p, struct fab_h2_frame *f) {
    f->len = fab_be24(p);
    f->type = p[3];
    f->flags = p[4];
    f->sid = fab_be32(p + 5) & 0x7fffffff;
    f->payload = p + FAB_H2_HDR;
}

/* A whole frame at the start of p[0..n): FAB_H2_HDR + its length when all of it is there
 * (f filled), 0 when more bytes are needed, -FAB_H2_FRAME_SIZE_ERROR when its length is
 * over `max`. */
FAB_INLINE i32 fab_h2_frame_parse(const u8 *p, u32 n, u32 max, struct fab_h2_frame *f) {
    if (n < FAB_H2_HDR) return 0;
    u32 len = fab_be24(p);
    if (len > max) return -FAB_H2_FRAME_SIZE_ERROR;
    if (n - FAB_H2_HDR < len) return 0;
    fab_h2_frame_header_parse(p, f);
    return (i32)(FAB_H2_HDR + len);
}

/* Frames out of a byte stream that arrives in pieces: a bounded buffer for the one frame
 * that straddles two reads, and the client preface checked first if asked. */
struct fab_h2_reader {
    u32 have;     /* bytes of a partial frame in buf */
    u32 pre_have; /* preface bytes seen (24: done) */
    u8 buf[FAB_H2_HDR + FAB_H2_MAX_FRAME];
};

/* expect_preface: 1 on the server side of a connection (the client sends the preface). */
FAB_INLINE void fab_h2_reader_init(struct fab_h2_reader *r, int expect_preface) {
    r->have = 0;
    r->pre_have = expect_preface ? 0 : 24;
}

/* The next frame from *p (n bytes, both advanced past what was used): 1 with f filled; 0
 * when everything was consumed (a partial frame is kept); or -code, a connection error
 * (-FAB_H2_PROTOCOL_ERROR: not the preface; -FAB_H2_FRAME_SIZE_ERROR: over the maximum).
 * Frames that arrive whole in the input are not copied.
 *
 *     while ((r = fab_h2_next(&rd, &p, &n, &f)) > 0) handle(&f);
 *     if (r < 0) GOAWAY(-r), close
 */
FAB_INLINE i32 fab_h2_next(struct fab_h2_reader *r, const u8 **pp, u32 *pn,
                            struct fab_h2_frame *f) {
    const u8 *p = *pp;
    u32 n = *pn;
    i32 res = 0;
    while (n) {
        if (r->pre_have < 24) {
            u32 take = 24 - r->pre_have;
            if (take > n) take = n;
            if (!fab_memeq(p, FAB_H2_PREFACE + r->pre_have, take)) {
                res = -FAB_H2_PROTOCOL_ERROR;
                break;
            }
            r->pre_have += take;
            p += take;
            n -= take;
            continue;
        }
        if (!r->have && n >= FAB_H2_HDR) {
            u32 fl = fab_be24(p);
            if (fl > FAB_H2_MAX_FRAME) { res = -FAB_H2_FRAME_SIZE_ERROR; break; }
            if (n - FAB_H2_HDR >= fl) {
                fab_h2_frame_header_parse(p, f);
                p += FAB_H2_HDR + fl;
                n -= FAB_H2_HDR + fl;
                res = 1;
                break;
            }
        }
        if (r->have < FAB_H2_HDR) {
            u32 take = FAB_H2_HDR - r->have;
            if (take > n) take = n;
            fab_copy(r->buf + r->have, p, take);
            r->have += take;
            p += take;
            n -= take;
            if (r->have < FAB_H2_HDR) break;
            if (fab_be24(r->buf) > FAB_H2_MAX_FRAME) { res = -FAB_H2_FRAME_SIZE_ERROR; break; }
        }
        u32 total = FAB_H2_HDR + fab_be24(r->buf), take = total - r->have;
        if (take > n) take = n;
        fab_copy(r->buf + r->have, p, take);
        r->have += take;
        p += take;
        n -= take;
        if (r->have == total) {
            r->have = 0;
            fab_h2_frame_header_parse(r->buf, f);
            res = 1;
            break;
        }
    }
    *pp = p;
    *pn = n;
    return res;
}

/* The frame's content without its padding (DATA, HEADERS with PADDED) and HEADERS'
 * priority fields: 0 with *data, *len set (the flow-controlled bytes not in them,
 * for a DATA frame: f->len - *len); or -1 when the padding is longer than the frame
 * (PROTOCOL_ERROR). */
FAB_INLINE int fab_h2_strip(const struct fab_h2_frame *f, const u8 **data, u32 *len) {
    u32 off = 0, pad = 0;
    if ((f->flags & FAB_H2_PADDED) && (f->type == FAB_H2_DATA || f->type == FAB_H2_HEADERS)) {
        if (f->len < 1) return -1;
        pad = f->payload[0];
        off = 1;
    }
    if (f->type == FAB_H2_HEADERS && (f->flags & FAB_H2_PRIORITY_FLAG)) off += 5;
    if (off + pad > f->len) return -1;
    *data = f->payload + off;
    *len = f->len - off - pad;
    return 0;
}

/* Whether a frame breaks its type's fixed size (RFC 9113 6.x): FRAME_SIZE_ERROR. */
FAB_INLINE int fab_h2_bad_size(const struct fab_h2_frame *f) {
    switch (f->type) {
    case FAB_H2_PRIORITY: return f->len != 5;
    case FAB_H2_RST_STREAM: return f->len != 4;
    case FAB_H2_SETTINGS: return (f->flags & FAB_H2_ACK) ? f->len != 0 : f->len % 6 != 0;
    case FAB_H2_PING: return f->len != 8;
    case FAB_H2_GOAWAY: return f->len < 8;
    case FAB_H2_WINDOW_UPDATE: return f->len != 4;
    default: return 0;
    }
}

/* SETTINGS entries: for (u32 i = 0; fab_h2_setting(&f, &i, &id, &v);) ... */
FAB_INLINE int fab_h2_setting(const struct fab_h2_frame *f, u32 *i, u32 *id, u32 *value) {
    if (*i + 6 > f->len) return 0;
    *id = fab_be16(f->payload + *i);
    *value = fab_be32(f->payload + *i + 2);
    *i += 6;
    return 1;
}

/* A setting's value out of range: the connection error code (RFC 9113 6.5.2), or 0. */
FAB_INLINE u32 fab_h2_setting_error(u32 id, u32 v) {
    if (id == FAB_H2_SETTINGS_ENABLE_PUSH && v > 1) return FAB_H2_PROTOCOL_ERROR;
    if (id == FAB_H2_SETTINGS_INITIAL_WINDOW_SIZE && v > FAB_H2_MAX_WINDOW)
        return FAB_H2_FLOW_CONTROL_ERROR;
    if (id == FAB_H2_SETTINGS_MAX_FRAME_SIZE && (v < 16384 || v > 16777215))
        return FAB_H2_PROTOCOL_ERROR;
    return 0;
}

/* ------------------------------------------------------------------ writing */

/* A frame header; returns FAB_H2_HDR. */
FAB_INLINE u32 fab_h2_frame_header(u8 *out, u32 len, u32 type, u32 flags, u32 sid) {
    fab_put_be24(out, len);
    out[3] = (u8)type;
    out[4] = (u8)flags;
    fab_put_be32(out + 5, sid);
    return FAB_H2_HDR;
}

/* Append a frame to out[*ol .. cap): 1, or 0 when it does not fit (nothing written). */
FAB_INLINE int fab_h2_put_frame(u8 *out, u32 cap, u32 *ol, u32 type, u32 flags, u32 sid,
                                const u8 *p, u32 n) {
    if (cap - *ol < FAB_H2_HDR + n) return 0;
    u8 *f = out + *ol;
    fab_h2_frame_header(f, n, type, flags, sid);
    if (n) fab_copy(f + FAB_H2_HDR, p, n);
    *ol += FAB_H2_HDR + n;
    return 1;
}

/* A header block as HEADERS + CONTINUATION frames of at most maxf bytes, whole or not at
 * all (nothing may come between them): 1, or 0 when it does not fit (or maxf is 0). flags: END_STREAM
 * or 0 (END_HEADERS is set on the last frame). prefix >= 0 is one byte put before the
 * block (fab_hpack_size_update0), -1 none. */
static FAB_UNUSED int fab_h2_put_block(u8 *out, u32 cap, u32 *ol, u32 flags, u32 sid,
                                       i32 prefix, const u8 *p, u32 n, u32 maxf) {
    if (!maxf) return 0;
    u32 total = n + (prefix >= 0), frames = total ? (total + maxf - 1) / maxf : 1;
    if (cap - *ol < total + FAB_H2_HDR * frames) return 0;
    u32 done = 0, first = 1;
    do {
        u32 chunk = total - done > maxf ? maxf : total - done;
        u8 *f = out + *ol;
        fab_h2_frame_header(f, chunk, first ? FAB_H2_HEADERS : FAB_H2_CONTINUATION,
                            (first ? flags : 0) | (done + chunk == total ? FAB_H2_END_HEADERS : 0),
                            sid);
        u8 *d = f + FAB_H2_HDR;
        u32 k = chunk;
        if (first && prefix >= 0) { *d++ = (u8)prefix; k--; }
        u32 src = done - (prefix >= 0 && !first ? 1 : 0);
        if (k) fab_copy(d, p + src, k);
        *ol += FAB_H2_HDR + chunk;
        done += chunk;
        first = 0;
    } while (done < total);
    return 1;
}

/* One SETTINGS entry at p (6 bytes); returns 6. */
FAB_INLINE u32 fab_h2_put_setting(u8 *p, u32 id, u32 value) {
    fab_put_be16(p, id);
    fab_put_be32(p + 2, value);
    return 6;
}

/* SETTINGS with `count` entries (id, value pairs) into out (9 + 6 * count bytes). */
static FAB_UNUSED u32 fab_h2_settings(u8 *out, const u32 *pairs, u32 count) {
    fab_h2_frame_header(out, 6 * count, FAB_H2_SETTINGS, 0, 0);
    for (u32 i = 0; i < count; i++)
        fab_h2_put_setting(out + FAB_H2_HDR + 6 * i, pairs[2 * i], pairs[2 * i + 1]);
    return FAB_H2_HDR + 6 * count;
}

/* SETTINGS ACK into out (9 bytes). */
FAB_INLINE u32 fab_h2_settings_ack(u8 *out) {
    return fab_h2_frame_header(out, 0, FAB_H2_SETTINGS, FAB_H2_ACK, 0);
}

/* PING (ack 0) or its ACK (ack 1) with the 8 opaque bytes into out (17 bytes). */
FAB_INLINE u32 fab_h2_ping(u8 *out, const u8 *payload, int ack) {
    fab_h2_frame_header(out, 8, FAB_H2_PING, ack ? FAB_H2_ACK : 0, 0);
    fab_copy(out + FAB_H2_HDR, payload, 8);
    return FAB_H2_HDR + 8;
}
FAB_INLINE u32 fab_h2_ping_ack(u8 *out, const u8 *payload) { return fab_h2_ping(out, payload, 1); }

/* GOAWAY(last stream id, error code) into out (17 bytes). */
FAB_INLINE u32 fab_h2_goaway(u8 *out, u32 last_sid, u32 code) {
    fab_h2_frame_header(out, 8, FAB_H2_GOAWAY, 0, 0);
    fab_put_be32(out + FAB_H2_HDR, last_sid & 0x7fffffff);
    fab_put_be32(out + FAB_H2_HDR + 4, code);
    return FAB_H2_HDR + 8;
}

/* RST_STREAM(sid, code) into out (13 bytes). */
FAB_INLINE u32 fab_h2_rst_stream(u8 *out, u32 sid, u32 code) {
    fab_h2_frame_header(out, 4, FAB_H2_RST_STREAM, 0, sid);
    fab_put_be32(out + FAB_H2_HDR, code);
    return FAB_H2_HDR + 4;
}

/* WINDOW_UPDATE(sid, increment: 1 .. 2^31-1) into out (13 bytes); sid 0: the connection. */
FAB_INLINE u32 fab_h2_window_update(u8 *out, u32 sid, u32 inc) {
    fab_h2_frame_header(out, 4, FAB_H2_WINDOW_UPDATE, 0, sid);
    fab_put_be32(out + FAB_H2_HDR, inc);
    return FAB_H2_HDR + 4;
}

#endif
