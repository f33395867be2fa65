/* fabricd.h - the C SDK for fabricd activators (ABI v1, activators/ABI.md).
 *
 * Why: the ABI is a binary batch format; every activator used to carry the same decoder,
 * action writer and stream table. With this header an activator is a set of handlers:
 *
 *     #include "fabricd.h"
 *     static void on_data(u32 sid, const u8 *d, u32 n) { fab_upstream_send(sid, d, n); }
 *     static const struct fab_handlers H = { .stream_data = on_data };
 *     FAB_STREAM_ACTIVATOR(H)
 *
 * Freestanding (no libc, no imports), one translation unit: include it once, from the
 * activator's .c. Everything here is static, so unused helpers cost no bytes. Build with
 * `fabricd activator build` (or `python -m ziglang cc --target=wasm32-freestanding
 * -nostdlib -mbulk-memory -Wl,--no-entry -Wl,--export-memory ...`, see activators/build.py).
 *
 * Contents: types and byte order; actions (fab_send, fab_need, ...); the event loop
 * (struct fab_handlers, FAB_ACTIVATOR, FAB_STREAM_ACTIVATOR); config (a small JSON reader);
 * fab_table (state per stream or flow, keyed by id); fab_buf (bounded byte buffers) and
 * fab_pool (fixed blocks); fab_logf. Protocol helpers live beside it: fab_tcp.h (IPv4/TCP
 * header view), fab_http2.h + fab_hpack.h, fab_pg.h.
 */
#ifndef FABRICD_H
#define FABRICD_H

/* ------------------------------------------------------------------ types, bytes */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char i8;
typedef short i16;
typedef int i32;
typedef long long i64;

#define FAB_EXPORT(name) __attribute__((export_name(#name), visibility("default")))
#define FAB_UNUSED __attribute__((unused))
#define FAB_INLINE static inline __attribute__((always_inline, unused))
#define FAB_ABI_VERSION 1

/* event kinds (host -> guest) */
#define FAB_EV_BACKEND_AVAILABLE 1
#define FAB_EV_BACKEND_UNAVAILABLE 2
#define FAB_EV_TICK 3
#define FAB_EV_PACKET 4
#define FAB_EV_STREAM_OPEN 16
#define FAB_EV_STREAM_DATA 17
#define FAB_EV_STREAM_CLOSE 18
#define FAB_EV_UPSTREAM_CONNECT_RESULT 32
#define FAB_EV_UPSTREAM_DATA 33
#define FAB_EV_UPSTREAM_CLOSE 34

/* action kinds (guest -> host) */
#define FAB_ACT_SET_BACKEND_NEED 1
#define FAB_ACT_LOG 2
#define FAB_ACT_PACKET_DECISION 3
#define FAB_ACT_REPLAY_PACKET 4
#define FAB_ACT_COUNT 5
#define FAB_ACT_DOWNSTREAM_SEND 16
#define FAB_ACT_DOWNSTREAM_CLOSE 17
#define FAB_ACT_UPSTREAM_CONNECT 32
#define FAB_ACT_UPSTREAM_SEND 33
#define FAB_ACT_UPSTREAM_CLOSE 34
#define FAB_ACT_UPSTREAM_CONNECT_LIKE 35
#define FAB_ACT_PAUSE 48
#define FAB_ACT_RESUME 49
#define FAB_ACT_SPLICE 50

/* set_backend_need levels */
#define FAB_NEED_NONE 0
#define FAB_NEED_TRAFFIC 1
#define FAB_NEED_ACTIVE 2

/* packet verdicts */
#define FAB_HOLD 0
#define FAB_DROP 1
#define FAB_PASS 2

/* log levels */
#define FAB_DEBUG 0
#define FAB_INFO 1
#define FAB_WARNING 2
#define FAB_ERROR 3

#define FAB_REC_HDR 8
#define FAB_NIL 0xffffffffu

/* clang lowers struct copies (and, with -mbulk-memory, __builtin_memcpy) to these or to
 * memory.copy; there is no libc to provide them. */
void *memcpy(void *dst, const void *src, unsigned long n) {
    u8 *d = dst;
    const u8 *s = src;
    while (n--) *d++ = *s++;
    return dst;
}

void *memset(void *dst, int c, unsigned long n) {
    u8 *d = dst;
    while (n--) *d++ = (u8)c;
    return dst;
}

void *memmove(void *dst, const void *src, unsigned long n) {
    u8 *d = dst;
    const u8 *s = src;
    if (d < s) {
        while (n--) *d++ = *s++;
    } else {
        d += n;
        s += n;
        while (n--) *--d = *--s;
    }
    return dst;
}

/* One instruction each with -mbulk-memory; a call to the loops above without it. */
#define fab_copy(d, s, n) __builtin_memcpy((d), (s), (n))
#define fab_move(d, s, n) __builtin_memmove((d), (s), (n))
#define fab_zero(d, n) __builtin_memset((d), 0, (n))

FAB_INLINE u32 fab_le16(const u8 *p) { return (u32)p[0] | ((u32)p[1] << 8); }
FAB_INLINE u32 fab_le32(const u8 *p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}
FAB_INLINE u64 fab_le64(const u8 *p) { return (u64)fab_le32(p) | ((u64)fab_le32(p + 4) << 32); }
FAB_INLINE u32 fab_be16(const u8 *p) { return ((u32)p[0] << 8) | (u32)p[1]; }
FAB_INLINE u32 fab_be24(const u8 *p) { return ((u32)p[0] << 16) | ((u32)p[1] << 8) | p[2]; }
FAB_INLINE u32 fab_be32(const u8 *p) {
    return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | (u32)p[3];
}
FAB_INLINE void fab_put_le16(u8 *p, u32 v) { p[0] = (u8)v; p[1] = (u8)(v >> 8); }
FAB_INLINE void fab_put_le32(u8 *p, u32 v) {
    p[0] = (u8)v; p[1] = (u8)(v >> 8); p[2] = (u8)(v >> 16); p[3] = (u8)(v >> 24);
}
FAB_INLINE void fab_put_be16(u8 *p, u32 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
FAB_INLINE void fab_put_be24(u8 *p, u32 v) { p[0] = (u8)(v >> 16); p[1] = (u8)(v >> 8); p[2] = (u8)v; }
FAB_INLINE void fab_put_be32(u8 *p, u32 v) {
    p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v;
}
FAB_INLINE u32 fab_strlen(const char *s) { u32 n = 0; while (s[n]) n++; return n; }
FAB_INLINE u32 fab_min(u32 a, u32 b) { return a < b ? a : b; }
FAB_INLINE u32 fab_max(u32 a, u32 b) { return a > b ? a : b; }
FAB_INLINE int fab_memeq(const void *a, const void *b, u32 n) {
    const u8 *x = a, *y = b;
    for (u32 i = 0; i < n; i++) if (x[i] != y[i]) return 0;
    return 1;
}
FAB_INLINE u8 fab_lower(u8 c) { return c >= 'A' && c <= 'Z' ? (u8)(c + 32) : c; }
/* ASCII case-insensitive comparison of n bytes. */
FAB_INLINE int fab_memeq_ci(const void *a, const void *b, u32 n) {
    const u8 *x = a, *y = b;
    for (u32 i = 0; i < n; i++) if (fab_lower(x[i]) != fab_lower(y[i])) return 0;
    return 1;
}

/* ------------------------------------------------------------------ memory */

/* fab_alloc: a bump allocator past __heap_base. The host calls it rarely (once, then only
 * when an event batch outgrows its buffer), so never freeing keeps the guest simple. */
extern u8 __heap_base;
static u32 fab__heap_top;

FAB_EXPORT(fab_abi_version) i32 fab_abi_version(void) { return FAB_ABI_VERSION; }

FAB_EXPORT(fab_alloc) u32 fab_alloc(u32 size) {
    if (!fab__heap_top) fab__heap_top = (u32)&__heap_base;
    u32 p = (fab__heap_top + 7u) & ~7u;
    if (size > 0x7fffffffu - p) return 0;
    u32 end = p + size;
    u32 have = (u32)__builtin_wasm_memory_size(0) * 65536u;
    if (end > have) {
        u32 pages = (end - have + 65535u) / 65536u;
        if (__builtin_wasm_memory_grow(0, pages) == (unsigned long)-1) return 0;
    }
    fab__heap_top = end;
    return p;
}

/* ------------------------------------------------------------------ actions */

/* The answer of one fab_process call. Define FAB_OUT_CAP before the include to change its
 * size (the host reads at most 1 MiB; 256 KiB by default). */
#ifndef FAB_OUT_CAP
#define FAB_OUT_CAP (256 * 1024)
#endif
static u8 fab__out[FAB_OUT_CAP];
static u32 fab__out_len = 2;
static u32 fab__out_count;
static u32 fab__out_last; /* offset of the last record, for fab_shrink */
static int fab__out_full;

/* State the loop keeps for every activator. */
static u64 fab__now_ms;
static int fab__backend_ready;
static u32 fab__need_told = FAB_NIL;
static u32 fab__bad_events;

/* The time of the last tick (ms, monotonic; 0 before the first). A stream activator gets
 * a tick before a stream_open whenever its clock is stale, so stamping an open with it
 * is safe; a packet activator gets no ticks before its first packet. */
FAB_INLINE u64 fab_now(void) { return fab__now_ms; }
/* Whether the host said a backend is ready (backend_available, not yet _unavailable). */
FAB_INLINE int fab_backend_ready(void) { return fab__backend_ready; }
/* Whether an action of this call did not fit: the rest of the answer is lost. Packets
 * without a decision stay held by the host; stream bytes not sent are the guest's to
 * retry (keep them until a later call). */
FAB_INLINE int fab_full(void) { return fab__out_full; }
/* Bytes left in this call's answer, for a payload of one more action. */
FAB_INLINE u32 fab_room(void) {
    u32 left = FAB_OUT_CAP - fab__out_len;
    return left > FAB_REC_HDR ? left - FAB_REC_HDR : 0;
}

/* Reserve one action record; returns its payload, or 0 (and fab_full()) when full. */
static FAB_UNUSED u8 *fab_action(u32 kind, u32 payload_len) {
    if (fab__out_count >= 0xffff || FAB_OUT_CAP - fab__out_len < FAB_REC_HDR + payload_len) {
        fab__out_full = 1;
        return 0;
    }
    u8 *r = fab__out + fab__out_len;
    r[0] = (u8)kind;
    r[1] = 0;
    r[2] = 0;
    r[3] = 0;
    fab_put_le32(r + 4, payload_len);
    fab__out_last = fab__out_len;
    fab__out_len += FAB_REC_HDR + payload_len;
    fab__out_count++;
    return r + FAB_REC_HDR;
}

/* Shrink the last reserved action's payload to `payload_len` (build in place with room to
 * spare, then give back what was not written). */
static FAB_UNUSED void fab_shrink(u32 payload_len) {
    u8 *r = fab__out + fab__out_last;
    u32 had = fab_le32(r + 4);
    if (payload_len > had) return;
    fab_put_le32(r + 4, payload_len);
    fab__out_len -= had - payload_len;
}

static FAB_UNUSED void fab_log(u32 level, const char *msg) {
    u32 n = fab_strlen(msg);
    u8 *p = fab_action(FAB_ACT_LOG, 1 + n);
    if (!p) return;
    p[0] = (u8)level;
    fab_copy(p + 1, msg, n);
}

/* Send set_backend_need every time (an L3 activator asks for a wake per new flow). */
static FAB_UNUSED void fab_set_need(u32 need) {
    u8 *p = fab_action(FAB_ACT_SET_BACKEND_NEED, 1);
    if (!p) return;
    p[0] = (u8)need;
    fab__need_told = need;
}

/* The port's need as a level: sent only when it changes (stream activators call it at
 * the end of every batch with what their streams need). */
static FAB_UNUSED void fab_need(u32 need) {
    if (need != fab__need_told) fab_set_need(need);
}

static FAB_UNUSED void fab_decide(u32 packet_id, u32 verdict) {
    u8 *p = fab_action(FAB_ACT_PACKET_DECISION, 5);
    if (!p) return;
    fab_put_le32(p, packet_id);
    p[4] = (u8)verdict;
}
FAB_INLINE void fab_hold(u32 packet_id) { fab_decide(packet_id, FAB_HOLD); }
FAB_INLINE void fab_drop(u32 packet_id) { fab_decide(packet_id, FAB_DROP); }
FAB_INLINE void fab_pass(u32 packet_id) { fab_decide(packet_id, FAB_PASS); }

static FAB_UNUSED void fab_replay(u32 packet_id) {
    u8 *p = fab_action(FAB_ACT_REPLAY_PACKET, 4);
    if (p) fab_put_le32(p, packet_id);
}

/* Add n to the guest's counter `name` (1-32 bytes of [a-z0-9_]; shown per port in
 * /metrics as fabric_service_activator_total{counter="name"}). */
static FAB_UNUSED void fab_count(const char *name, u32 n) {
    u32 len = fab_strlen(name);
    u8 *p = fab_action(FAB_ACT_COUNT, 4 + len);
    if (!p) return;
    fab_put_le32(p, n);
    fab_copy(p + 4, name, len);
}

static FAB_UNUSED void fab__sid(u32 kind, u32 sid) {
    u8 *p = fab_action(kind, 4);
    if (p) fab_put_le32(p, sid);
}

static FAB_UNUSED int fab__bytes(u32 kind, u32 sid, const void *data, u32 n) {
    u8 *p = fab_action(kind, 4 + n);
    if (!p) return -1;
    fab_put_le32(p, sid);
    fab_copy(p + 4, data, n);
    return 0;
}

/* Append n bytes to the last action of this call when it is a send of `kind`
 * (FAB_ACT_DOWNSTREAM_SEND or FAB_ACT_UPSTREAM_SEND) to stream `sid`: 0 when appended,
 * -1 when not (send them as a new action). An answer built from pieces stays one record
 * per stream and side, and costs no further action of the call's budget. */
static FAB_UNUSED int fab_append(u32 kind, u32 sid, const void *data, u32 n) {
    if (!fab__out_count || FAB_OUT_CAP - fab__out_len < n) return -1;
    u8 *r = fab__out + fab__out_last;
    if (r[0] != kind || fab_le32(r + FAB_REC_HDR) != sid) return -1;
    fab_copy(fab__out + fab__out_len, data, n);
    fab__out_len += n;
    fab_put_le32(r + 4, fab_le32(r + 4) + n);
    return 0;
}

/* Bytes to the client; 0, or -1 when the answer is full (nothing was queued). */
FAB_INLINE int fab_send(u32 sid, const void *data, u32 n) {
    return fab__bytes(FAB_ACT_DOWNSTREAM_SEND, sid, data, n);
}
/* Bytes to the stream's backend connection; 0 or -1 as fab_send. */
FAB_INLINE int fab_upstream_send(u32 sid, const void *data, u32 n) {
    return fab__bytes(FAB_ACT_UPSTREAM_SEND, sid, data, n);
}
/* Reserve room for up to `max` bytes toward the client (or backend) and write them in
 * place: returns where to write, or 0 when full; finish with fab_shrink(4 + written). */
static FAB_UNUSED u8 *fab_send_reserve(u32 sid, u32 max) {
    u8 *p = fab_action(FAB_ACT_DOWNSTREAM_SEND, 4 + max);
    if (!p) return 0;
    fab_put_le32(p, sid);
    return p + 4;
}
static FAB_UNUSED u8 *fab_upstream_reserve(u32 sid, u32 max) {
    u8 *p = fab_action(FAB_ACT_UPSTREAM_SEND, 4 + max);
    if (!p) return 0;
    fab_put_le32(p, sid);
    return p + 4;
}
/* Flush what is queued to the client, then close it. */
FAB_INLINE void fab_close(u32 sid) { fab__sid(FAB_ACT_DOWNSTREAM_CLOSE, sid); }
FAB_INLINE void fab_upstream_close(u32 sid) { fab__sid(FAB_ACT_UPSTREAM_CLOSE, sid); }
FAB_INLINE void fab_pause(u32 sid) { fab__sid(FAB_ACT_PAUSE, sid); }
FAB_INLINE void fab_resume(u32 sid) { fab__sid(FAB_ACT_RESUME, sid); }
FAB_INLINE void fab_splice(u32 sid) { fab__sid(FAB_ACT_SPLICE, sid); }
/* Connect the stream to a ready backend at `port` (0: the port's target_port); answered
 * by the upstream_result handler. */
static FAB_UNUSED void fab_connect(u32 sid, u32 port) {
    u8 *p = fab_action(FAB_ACT_UPSTREAM_CONNECT, 6);
    if (!p) return;
    fab_put_le32(p, sid);
    fab_put_le16(p + 4, port);
}
/* fab_connect, to the backend stream `like` is connected to while that one is ready
 * (else chosen as for fab_connect): e.g. a CancelRequest to its session's replica. */
static FAB_UNUSED void fab_connect_like(u32 sid, u32 port, u32 like) {
    u8 *p = fab_action(FAB_ACT_UPSTREAM_CONNECT_LIKE, 10);
    if (!p) return;
    fab_put_le32(p, sid);
    fab_put_le16(p + 4, port);
    fab_put_le32(p + 6, like);
}

/* fab_logf: a log line with %s %u %d %x %c %% (and %.*s: length, then bytes); long lines
 * are cut at 240 bytes. */
typedef __builtin_va_list fab_va_list;
#define fab_va_start(ap, last) __builtin_va_start(ap, last)
#define fab_va_arg(ap, type) __builtin_va_arg(ap, type)
#define fab_va_end(ap) __builtin_va_end(ap)

static FAB_UNUSED u32 fab__fmt_u(char *o, u32 at, u32 cap, u64 v, u32 base) {
    char tmp[20];
    u32 n = 0;
    do { u32 d = (u32)(v % base); tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10); v /= base; }
    while (v && n < sizeof tmp);
    while (n && at < cap) o[at++] = tmp[--n];
    return at;
}

static FAB_UNUSED void fab_logf(u32 level, const char *fmt, ...) {
    char o[240];
    u32 at = 0, cap = sizeof o;
    fab_va_list ap;
    fab_va_start(ap, fmt);
    for (const char *f = fmt; *f && at < cap; f++) {
        if (*f != '%') { o[at++] = *f; continue; }
        f++;
        if (*f == 's') {
            const char *s = fab_va_arg(ap, const char *);
            while (s && *s && at < cap) o[at++] = *s++;
        } else if (*f == '.' && f[1] == '*' && f[2] == 's') {
            f += 2;
            u32 n = fab_va_arg(ap, u32);
            const u8 *s = fab_va_arg(ap, const u8 *);
            for (u32 i = 0; i < n && at < cap; i++)
                o[at++] = s[i] >= 32 && s[i] < 127 ? (char)s[i] : '.';
        } else if (*f == 'u') {
            at = fab__fmt_u(o, at, cap, fab_va_arg(ap, u32), 10);
        } else if (*f == 'd') {
            i32 v = fab_va_arg(ap, i32);
            if (v < 0) { o[at++] = '-'; at = fab__fmt_u(o, at, cap, (u64)(-(i64)v), 10); }
            else at = fab__fmt_u(o, at, cap, (u64)v, 10);
        } else if (*f == 'x') {
            at = fab__fmt_u(o, at, cap, fab_va_arg(ap, u32), 16);
        } else if (*f == 'c') {
            o[at++] = (char)fab_va_arg(ap, int);
        } else if (*f == '%') {
            o[at++] = '%';
        } else {
            break;
        }
    }
    fab_va_end(ap);
    u8 *p = fab_action(FAB_ACT_LOG, 1 + at);
    if (!p) return;
    p[0] = (u8)level;
    fab_copy(p + 1, o, at);
}

/* ------------------------------------------------------------------ config */

/* The JSON config (UTF-8) the host passes to fab_init, valid during init only: copy what
 * you keep. The host adds port, target_port, hold_timeout_ms and hold_bytes for stream
 * activators (ABI.md). */
struct fab_json {
    const u8 *p;
    u32 len;
};

static FAB_UNUSED u32 fab__ws(const u8 *p, u32 i, u32 len) {
    while (i < len && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r')) i++;
    return i;
}

/* End (exclusive) of the JSON value starting at i, or FAB_NIL when malformed. */
static FAB_UNUSED u32 fab__skip(const u8 *p, u32 i, u32 len) {
    i = fab__ws(p, i, len);
    if (i >= len) return FAB_NIL;
    if (p[i] == '"') {
        for (i++; i < len; i++) {
            if (p[i] == '\\') i++;
            else if (p[i] == '"') return i + 1;
        }
        return FAB_NIL;
    }
    if (p[i] == '{' || p[i] == '[') {
        u32 depth = 0;
        for (; i < len; i++) {
            u8 c = p[i];
            if (c == '"') {
                for (i++; i < len && p[i] != '"'; i++) if (p[i] == '\\') i++;
                if (i >= len) return FAB_NIL;
            } else if (c == '{' || c == '[') {
                if (++depth > 64) return FAB_NIL;
            } else if (c == '}' || c == ']') {
                if (--depth == 0) return i + 1;
            }
        }
        return FAB_NIL;
    }
    while (i < len && p[i] != ',' && p[i] != '}' && p[i] != ']' && p[i] != ' '
           && p[i] != '\n' && p[i] != '\t' && p[i] != '\r') i++;
    return i;
}

/* The value of `key` in the object `obj` (top level of it only); {0, 0} when absent. */
static FAB_UNUSED struct fab_json fab_json_get(struct fab_json obj, const char *key) {
    struct fab_json none = {0, 0};
    const u8 *p = obj.p;
    u32 len = obj.len, klen = fab_strlen(key);
    u32 i = fab__ws(p, 0, len);
    if (i >= len || p[i] != '{') return none;
    i++;
    for (;;) {
        i = fab__ws(p, i, len);
        if (i >= len || p[i] != '"') return none;
        u32 ks = i + 1, ke = fab__skip(p, i, len);
        if (ke == FAB_NIL) return none;
        i = fab__ws(p, ke, len);
        if (i >= len || p[i] != ':') return none;
        u32 vs = fab__ws(p, i + 1, len), ve = fab__skip(p, vs, len);
        if (ve == FAB_NIL) return none;
        if (ke - 1 - ks == klen && fab_memeq(p + ks, key, klen)) {
            struct fab_json v = {p + vs, ve - vs};
            return v;
        }
        i = fab__ws(p, ve, len);
        if (i >= len || p[i] != ',') return none;
        i++;
    }
}

FAB_INLINE int fab_json_present(struct fab_json v) { return v.p != 0; }

/* A non-negative integer value, or dflt when absent, not an integer or over 2^32-1. */
static FAB_UNUSED u32 fab_json_u32(struct fab_json v, u32 dflt) {
    if (!v.p || !v.len) return dflt;
    u64 n = 0;
    for (u32 i = 0; i < v.len; i++) {
        if (v.p[i] < '0' || v.p[i] > '9') return dflt;
        n = n * 10 + (u64)(v.p[i] - '0');
        if (n > 0xffffffffu) return dflt;
    }
    return (u32)n;
}

/* true/false (or 1/0), else dflt. */
static FAB_UNUSED int fab_json_bool(struct fab_json v, int dflt) {
    if (v.len == 4 && fab_memeq(v.p, "true", 4)) return 1;
    if (v.len == 5 && fab_memeq(v.p, "false", 5)) return 0;
    if (v.len == 1 && (v.p[0] == '0' || v.p[0] == '1')) return v.p[0] == '1';
    return dflt;
}

/* A string value unescaped into out (\" \\ \/ \n \r \t, \uXXXX below 0x80); returns its
 * length, or -1 when absent, not a string or longer than cap. */
static FAB_UNUSED i32 fab_json_str(struct fab_json v, u8 *out, u32 cap) {
    if (!v.p || v.len < 2 || v.p[0] != '"' || v.p[v.len - 1] != '"') return -1;
    u32 n = 0;
    for (u32 i = 1; i + 1 < v.len; i++) {
        u8 c = v.p[i];
        if (c == '\\') {
            if (i + 2 >= v.len) return -1;
            c = v.p[++i];
            if (c == 'n') c = '\n';
            else if (c == 'r') c = '\r';
            else if (c == 't') c = '\t';
            else if (c == 'u') {
                if (i + 5 >= v.len) return -1;
                u32 cp = 0;
                for (u32 k = 1; k <= 4; k++) {
                    u8 h = v.p[i + k];
                    cp = cp * 16 + (h >= '0' && h <= '9' ? h - '0'
                                    : h >= 'a' && h <= 'f' ? h - 'a' + 10
                                    : h >= 'A' && h <= 'F' ? h - 'A' + 10 : 255u);
                }
                if (cp >= 0x80) return -1;
                c = (u8)cp;
                i += 4;
            } else if (c != '"' && c != '\\' && c != '/') {
                return -1;
            }
        }
        if (n >= cap) return -1;
        out[n++] = c;
    }
    return (i32)n;
}

/* Walk an array: `for (u32 it = 0; fab_json_next(arr, &it, &elem);)`. */
static FAB_UNUSED int fab_json_next(struct fab_json arr, u32 *it, struct fab_json *elem) {
    const u8 *p = arr.p;
    u32 len = arr.len, i = *it;
    if (!p) return 0;
    if (i == 0) {
        i = fab__ws(p, 0, len);
        if (i >= len || p[i] != '[') return 0;
        i++;
    }
    i = fab__ws(p, i, len);
    if (i < len && p[i] == ',') i = fab__ws(p, i + 1, len);
    if (i >= len || p[i] == ']') return 0;
    u32 e = fab__skip(p, i, len);
    if (e == FAB_NIL) return 0;
    elem->p = p + i;
    elem->len = e - i;
    *it = e;
    return 1;
}

/* Shorthands for the common case, a flat config object. */
FAB_INLINE u32 fab_cfg_u32(struct fab_json cfg, const char *key, u32 dflt) {
    return fab_json_u32(fab_json_get(cfg, key), dflt);
}
FAB_INLINE int fab_cfg_bool(struct fab_json cfg, const char *key, int dflt) {
    return fab_json_bool(fab_json_get(cfg, key), dflt);
}
FAB_INLINE i32 fab_cfg_str(struct fab_json cfg, const char *key, u8 *out, u32 cap) {
    return fab_json_str(fab_json_get(cfg, key), out, cap);
}

/* ------------------------------------------------------------------ the event loop */

/* An IPv4 packet the host holds; refer to it by id (fab_hold/drop/pass/replay). */
struct fab_packet {
    u32 id;
    u32 flow_hash; /* the host's hash of the 5-tuple: a hint; compare the tuple yourself */
    const u8 *ip;  /* from the IPv4 header on; valid during this handler only */
    u32 len;
};

/* Every handler is optional. Payloads are valid during the handler only. The loop keeps
 * fab_now() and fab_backend_ready() current before calling the handler of an event. */
struct fab_handlers {
    /* the config; return 0, or non-zero to refuse it (the host keeps the old module) */
    int (*init)(struct fab_json cfg);
    void (*batch_begin)(void);
    void (*backend_available)(void);
    void (*backend_unavailable)(void);
    void (*tick)(u64 now_ms);
    void (*packet)(const struct fab_packet *pkt);
    void (*stream_open)(u32 sid, u32 port);
    void (*stream_data)(u32 sid, const u8 *data, u32 len);
    void (*stream_close)(u32 sid);
    void (*upstream_result)(u32 sid, int ok);
    void (*upstream_data)(u32 sid, const u8 *data, u32 len);
    void (*upstream_close)(u32 sid);
    /* after the last event of a call: flush, set the need level */
    void (*batch_end)(void);
};

FAB_INLINE i32 fab__init(const struct fab_handlers *h, const u8 *cfg, u32 len) {
    fab__now_ms = 0;
    fab__backend_ready = 0;
    fab__need_told = FAB_NIL;
    fab__bad_events = 0;
    fab__out_len = 2;
    fab__out_count = 0;
    if (!h->init) return 0;
    struct fab_json c = {cfg, len};
    return h->init(c);
}

/* Events whose payload is shorter than their kind needs (a host bug or a newer host). */
FAB_INLINE u32 fab_bad_events(void) { return fab__bad_events; }

/* Events in this call's batch, and actions queued so far in its answer: the host reads at
 * most fab_action_budget(live streams) actions of one answer (ABI.md, "Actions read per
 * call"); a guest that may queue many keeps within it and leaves the rest for later. */
static u32 fab__ev_count;
FAB_INLINE u32 fab_batch_events(void) { return fab__ev_count; }
FAB_INLINE u32 fab_action_count(void) { return fab__out_count; }
FAB_INLINE u32 fab_action_budget(u32 live_streams) {
    return 4 * fab__ev_count + 16 + 8 * live_streams;
}

FAB_INLINE i64 fab__process(const struct fab_handlers *h, const u8 *ev, u32 len) {
    fab__out_len = 2;
    fab__out_count = 0;
    fab__out_full = 0;
    u32 count = len >= 2 ? fab_le16(ev) : 0;
    fab__ev_count = count;
    if (h->batch_begin) h->batch_begin();
    u32 off = 2;
    for (u32 i = 0; i < count; i++) {
        if (len - off < FAB_REC_HDR) break;
        u32 kind = ev[off];
        u32 n = fab_le32(ev + off + 4);
        off += FAB_REC_HDR;
        if (n > len - off) break;
        const u8 *p = ev + off;
        off += n;
        switch (kind) {
        case FAB_EV_PACKET:
            if (n < 8) { fab__bad_events++; break; }
            if (h->packet) {
                struct fab_packet pkt = {fab_le32(p), fab_le32(p + 4), p + 8, n - 8};
                h->packet(&pkt);
            }
            break;
        case FAB_EV_TICK:
            if (n < 8) { fab__bad_events++; break; }
            fab__now_ms = fab_le64(p);
            if (h->tick) h->tick(fab__now_ms);
            break;
        case FAB_EV_BACKEND_AVAILABLE:
            fab__backend_ready = 1;
            if (h->backend_available) h->backend_available();
            break;
        case FAB_EV_BACKEND_UNAVAILABLE:
            fab__backend_ready = 0;
            if (h->backend_unavailable) h->backend_unavailable();
            break;
        case FAB_EV_STREAM_OPEN:
            if (n < 6) { fab__bad_events++; break; }
            if (h->stream_open) h->stream_open(fab_le32(p), fab_le16(p + 4));
            break;
        case FAB_EV_STREAM_DATA:
            if (n < 4) { fab__bad_events++; break; }
            if (h->stream_data) h->stream_data(fab_le32(p), p + 4, n - 4);
            break;
        case FAB_EV_STREAM_CLOSE:
            if (n < 4) { fab__bad_events++; break; }
            if (h->stream_close) h->stream_close(fab_le32(p));
            break;
        case FAB_EV_UPSTREAM_CONNECT_RESULT:
            if (n < 5) { fab__bad_events++; break; }
            if (h->upstream_result) h->upstream_result(fab_le32(p), p[4] != 0);
            break;
        case FAB_EV_UPSTREAM_DATA:
            if (n < 4) { fab__bad_events++; break; }
            if (h->upstream_data) h->upstream_data(fab_le32(p), p + 4, n - 4);
            break;
        case FAB_EV_UPSTREAM_CLOSE:
            if (n < 4) { fab__bad_events++; break; }
            if (h->upstream_close) h->upstream_close(fab_le32(p));
            break;
        default:
            break; /* newer hosts may send more kinds */
        }
    }
    if (h->batch_end) h->batch_end();
    fab_put_le16(fab__out, fab__out_count);
    return (i64)(((u64)(u32)fab__out << 32) | (u64)fab__out_len);
}

/* Define the exports of a packet (L3) activator from a `static const struct fab_handlers`. */
#define FAB_ACTIVATOR(H)                                                                   \
    FAB_EXPORT(fab_init) i32 fab_init(const u8 *cfg, u32 len) { return fab__init(&(H), cfg, len); } \
    FAB_EXPORT(fab_process) i64 fab_process(const u8 *ev, u32 len) {                      \
        return fab__process(&(H), ev, len);                                                \
    }

/* ... and of a stream activator (the fabric terminates the port's TCP and sends bytes). */
#define FAB_STREAM_ACTIVATOR(H)                                                            \
    FAB_EXPORT(fab_streams) i32 fab_streams(void) { return 1; }                            \
    FAB_ACTIVATOR(H)

/* ------------------------------------------------------------------ fab_table */

/* State per stream or flow, keyed by a u32 id (a stream_id, or a hash of a 5-tuple and a
 * comparison of your own): items stay where they are for their whole life (pointers to
 * them are stable), a hash index with linear probing and backward-shift deletion finds
 * them in O(1) without tombstones. Capacity is fixed (a power of two); fab_table_add
 * returns 0 when full, which the activator must answer (close the stream, drop the flow).
 *
 *     struct conn { ... };
 *     FAB_TABLE(conns, struct conn, 4096);
 *     struct conn *c = fab_table_add(&conns, sid);    zeroed, or 0 when full / present
 *     (fab_table_insert and fab_table_find for keys that may repeat, e.g. flow hashes)
 *     struct conn *c = fab_table_get(&conns, sid);    or 0
 *     fab_table_del(&conns, c);
 *     for (u32 it = 0; (c = fab_table_next(&conns, &it));) ...   (deleting c is fine)
 */
struct fab_table {
    u8 *items;
    u32 stride;
    u32 cap;     /* items; a power of two */
    u32 *keys;   /* per item */
    u32 *index;  /* 2 * cap slots: item + 1, 0 = empty */
    u32 *next_free;
    u8 *live;
    u32 free_head;
    u32 count;
    u32 ready;
};

#define FAB_TABLE(name, type, capacity)                                                    \
    _Static_assert(((capacity) & ((capacity) - 1)) == 0, "capacity: a power of two");      \
    static type name##__items[capacity];                                                   \
    static u32 name##__keys[capacity];                                                     \
    static u32 name##__index[2 * (capacity)];                                              \
    static u32 name##__free[capacity];                                                     \
    static u8 name##__live[capacity];                                                      \
    static struct fab_table name = {(u8 *)name##__items, sizeof(type), (capacity),         \
                                    name##__keys, name##__index, name##__free,             \
                                    name##__live, 0, 0, 0}

static FAB_UNUSED void fab_table_clear(struct fab_table *t) {
    for (u32 i = 0; i < 2 * t->cap; i++) t->index[i] = 0;
    for (u32 i = 0; i < t->cap; i++) {
        t->live[i] = 0;
        t->next_free[i] = i + 1 < t->cap ? i + 1 : FAB_NIL;
    }
    t->free_head = 0;
    t->count = 0;
    t->ready = 1;
}

FAB_INLINE u32 fab__home(const struct fab_table *t, u32 key) {
    return (key * 2654435761u) & (2 * t->cap - 1);
}

static FAB_UNUSED void *fab_table_get(struct fab_table *t, u32 key) {
    if (!t->ready) return 0;
    u32 mask = 2 * t->cap - 1;
    for (u32 s = fab__home(t, key);; s = (s + 1) & mask) {
        u32 e = t->index[s];
        if (!e) return 0;
        if (t->keys[e - 1] == key) return t->items + (u64)(e - 1) * t->stride;
    }
}

/* Like fab_table_get, for tables whose keys may repeat (a hash of a 5-tuple): the first
 * item with this key for which eq(item, arg) is true, or 0. */
static FAB_UNUSED void *fab_table_find(struct fab_table *t, u32 key,
                                       int (*eq)(const void *item, const void *arg),
                                       const void *arg) {
    if (!t->ready) return 0;
    u32 mask = 2 * t->cap - 1;
    for (u32 s = fab__home(t, key);; s = (s + 1) & mask) {
        u32 e = t->index[s];
        if (!e) return 0;
        if (t->keys[e - 1] == key) {
            void *item = t->items + (u64)(e - 1) * t->stride;
            if (eq(item, arg)) return item;
        }
    }
}

/* A new zeroed item under `key`, even if the key is present already (see fab_table_find);
 * 0 when full. */
static FAB_UNUSED void *fab_table_insert(struct fab_table *t, u32 key) {
    if (!t->ready) fab_table_clear(t);
    if (t->free_head == FAB_NIL) return 0;
    u32 i = t->free_head;
    t->free_head = t->next_free[i];
    t->live[i] = 1;
    t->keys[i] = key;
    t->count++;
    u32 mask = 2 * t->cap - 1, s = fab__home(t, key);
    while (t->index[s]) s = (s + 1) & mask;
    t->index[s] = i + 1;
    u8 *item = t->items + (u64)i * t->stride;
    fab_zero(item, t->stride);
    return item;
}

/* A new zeroed item under a key not present yet; 0 when full or present. */
static FAB_UNUSED void *fab_table_add(struct fab_table *t, u32 key) {
    if (fab_table_get(t, key)) return 0;
    return fab_table_insert(t, key);
}

/* The item's position (0 .. cap-1), e.g. to index arrays kept beside the table. */
FAB_INLINE u32 fab_table_pos(const struct fab_table *t, const void *item) {
    return (u32)(((const u8 *)item - t->items) / t->stride);
}
FAB_INLINE u32 fab_table_key(const struct fab_table *t, const void *item) {
    return t->keys[fab_table_pos(t, item)];
}

static FAB_UNUSED void fab_table_del(struct fab_table *t, void *item) {
    u32 i = fab_table_pos(t, item);
    if (i >= t->cap || !t->live[i]) return;
    u32 mask = 2 * t->cap - 1, s = fab__home(t, t->keys[i]);
    while (t->index[s] != i + 1) s = (s + 1) & mask;
    /* backward-shift deletion: later entries of the run move into the hole */
    for (u32 j = (s + 1) & mask;; j = (j + 1) & mask) {
        u32 e = t->index[j];
        if (!e) break;
        u32 h = fab__home(t, t->keys[e - 1]);
        /* move e to s unless its home lies cyclically in (s, j] */
        if ((j > s && (h <= s || h > j)) || (j < s && h <= s && h > j)) {
            t->index[s] = e;
            s = j;
        }
    }
    t->index[s] = 0;
    t->live[i] = 0;
    t->next_free[i] = t->free_head;
    t->free_head = i;
    t->count--;
}

/* Iterate live items in position order; deleting the item returned is allowed. */
static FAB_UNUSED void *fab_table_next(struct fab_table *t, u32 *it) {
    if (!t->ready) return 0;
    while (*it < t->cap) {
        u32 i = (*it)++;
        if (t->live[i]) return t->items + (u64)i * t->stride;
    }
    return 0;
}

FAB_INLINE u32 fab_table_count(const struct fab_table *t) { return t->count; }

/* ------------------------------------------------------------------ fab_buf, fab_pool */

/* A bounded byte buffer over storage of your own: appends fail instead of growing, so a
 * stalled peer costs at most `cap` bytes. */
struct fab_buf {
    u8 *data;
    u32 len;
    u32 cap;
};

FAB_INLINE void fab_buf_init(struct fab_buf *b, u8 *storage, u32 cap) {
    b->data = storage;
    b->len = 0;
    b->cap = cap;
}
FAB_INLINE u32 fab_buf_room(const struct fab_buf *b) { return b->cap - b->len; }
/* Append all n bytes, or none: 0, or -1 when they do not fit. */
FAB_INLINE int fab_buf_put(struct fab_buf *b, const void *p, u32 n) {
    if (n > b->cap - b->len) return -1;
    fab_copy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}
/* Drop the first n bytes (consumed). */
FAB_INLINE void fab_buf_take(struct fab_buf *b, u32 n) {
    if (n >= b->len) { b->len = 0; return; }
    fab_move(b->data, b->data + n, b->len - n);
    b->len -= n;
}

/* `count` blocks of `size` bytes for buffers that only some streams need at a time (a
 * held request, a partial frame): fab_pool_get returns 0 when all are in use. */
struct fab_pool {
    u8 *blocks;
    u32 size;
    u32 count;
    u32 *next;
    u32 head;
    u32 used;
    u32 ready;
};

#define FAB_POOL(name, block_size, block_count)                                            \
    static u8 name##__blocks[(block_count)][(block_size)];                                 \
    static u32 name##__next[(block_count)];                                                \
    static struct fab_pool name = {(u8 *)name##__blocks, (block_size), (block_count),      \
                                   name##__next, 0, 0, 0}

static FAB_UNUSED u8 *fab_pool_get(struct fab_pool *p) {
    if (!p->ready) {
        for (u32 i = 0; i < p->count; i++) p->next[i] = i + 1 < p->count ? i + 1 : FAB_NIL;
        p->head = 0;
        p->used = 0;
        p->ready = 1;
    }
    if (p->head == FAB_NIL) return 0;
    u32 i = p->head;
    p->head = p->next[i];
    p->used++;
    return p->blocks + (u64)i * p->size;
}

static FAB_UNUSED void fab_pool_put(struct fab_pool *p, u8 *block) {
    if (!block || !p->ready) return;
    u32 i = (u32)((u64)(block - p->blocks) / p->size);
    if (i >= p->count) return;
    p->next[i] = p->head;
    p->head = i;
    p->used--;
}

#endif
