/* fab.h - guest-side helpers for the fabricd activator ABI v1 (see activators/ABI.md).
 *
 * Freestanding: no libc. Every activator includes this header once; it defines the
 * exports fab_abi_version and fab_alloc, the little-endian readers, and the action
 * batch writer. The activator itself defines fab_init and fab_process.
 */
#ifndef FAB_H
#define FAB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;
typedef long long i64;

#define FAB_EXPORT(name) __attribute__((export_name(#name), visibility("default")))

#define FAB_ABI_VERSION 1

/* event kinds */
#define EV_BACKEND_AVAILABLE 1
#define EV_BACKEND_UNAVAILABLE 2
#define EV_TICK 3
#define EV_PACKET 4
#define EV_STREAM_OPEN 16
#define EV_STREAM_DATA 17
#define EV_STREAM_CLOSE 18
#define EV_UPSTREAM_CONNECT_RESULT 32
#define EV_UPSTREAM_DATA 33
#define EV_UPSTREAM_CLOSE 34

/* action kinds */
#define ACT_SET_BACKEND_NEED 1
#define ACT_LOG 2
#define ACT_PACKET_DECISION 3
#define ACT_REPLAY_PACKET 4
#define ACT_COUNT 5
#define ACT_DOWNSTREAM_SEND 16
#define ACT_DOWNSTREAM_CLOSE 17
#define ACT_UPSTREAM_CONNECT 32
#define ACT_UPSTREAM_SEND 33
#define ACT_UPSTREAM_CLOSE 34
#define ACT_PAUSE 48
#define ACT_RESUME 49
#define ACT_SPLICE 50

#define NEED_NONE 0
#define NEED_TRAFFIC 1
#define NEED_ACTIVE 2

#define VERDICT_HOLD 0
#define VERDICT_DROP 1
#define VERDICT_PASS 2

#define LOG_DEBUG 0
#define LOG_INFO 1
#define LOG_WARNING 2
#define LOG_ERROR 3

#define REC_HDR 8

/* clang may lower struct copies and loops to these; there is no libc to provide them. */
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

static inline u32 rd16(const u8 *p) { return (u32)p[0] | ((u32)p[1] << 8); }
static inline u32 rd32(const u8 *p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}
static inline u64 rd64(const u8 *p) { return (u64)rd32(p) | ((u64)rd32(p + 4) << 32); }
static inline u32 be16(const u8 *p) { return ((u32)p[0] << 8) | (u32)p[1]; }
static inline void wr16(u8 *p, u32 v) { p[0] = (u8)v; p[1] = (u8)(v >> 8); }
static inline void wr32(u8 *p, u32 v) {
    p[0] = (u8)v; p[1] = (u8)(v >> 8); p[2] = (u8)(v >> 16); p[3] = (u8)(v >> 24);
}

/* ---- fab_alloc: a bump allocator over memory past __heap_base ----
 * The host calls it rarely (once, then only when an event batch outgrows the buffer),
 * so never freeing is fine and keeps the guest trivially correct. */
extern u8 __heap_base;
static u32 fab_heap_top;

FAB_EXPORT(fab_abi_version) i32 fab_abi_version(void) { return FAB_ABI_VERSION; }

FAB_EXPORT(fab_alloc) u32 fab_alloc(u32 size) {
    if (!fab_heap_top) fab_heap_top = (u32)&__heap_base;
    u32 p = (fab_heap_top + 7u) & ~7u;
    if (size > 0x7fffffffu - p) return 0;
    u32 end = p + size;
    u32 have = (u32)__builtin_wasm_memory_size(0) * 65536u;
    if (end > have) {
        u32 pages = (end - have + 65535u) / 65536u;
        if (__builtin_wasm_memory_grow(0, pages) == (unsigned long)-1) return 0;
    }
    fab_heap_top = end;
    return p;
}

/* ---- action batch writer ---- */
#ifndef FAB_OUT_CAP
#define FAB_OUT_CAP (256 * 1024)
#endif
static u8 fab_out[FAB_OUT_CAP];
static u32 fab_out_len;
static u32 fab_out_count;
static int fab_out_full;

static __attribute__((unused)) void out_begin(void) {
    fab_out_len = 2;
    fab_out_count = 0;
    fab_out_full = 0;
}

/* Reserve one action record; returns its payload or 0 when the batch is full. */
static __attribute__((unused)) u8 *out_action(u32 kind, u32 payload_len) {
    if (fab_out_count >= 0xffff || FAB_OUT_CAP - fab_out_len < REC_HDR + payload_len) {
        fab_out_full = 1;
        return 0;
    }
    u8 *r = fab_out + fab_out_len;
    r[0] = (u8)kind;
    r[1] = 0;
    wr16(r + 2, 0);
    wr32(r + 4, payload_len);
    fab_out_len += REC_HDR + payload_len;
    fab_out_count++;
    return r + REC_HDR;
}

static __attribute__((unused)) i64 out_end(void) {
    wr16(fab_out, fab_out_count);
    return (i64)(((u64)(u32)fab_out << 32) | (u64)fab_out_len);
}

static __attribute__((unused)) void act_log(u32 level, const char *msg) {
    u32 n = 0;
    while (msg[n]) n++;
    u8 *p = out_action(ACT_LOG, 1 + n);
    if (!p) return;
    p[0] = (u8)level;
    memcpy(p + 1, msg, n);
}

static __attribute__((unused)) void act_need(u32 need) {
    u8 *p = out_action(ACT_SET_BACKEND_NEED, 1);
    if (p) p[0] = (u8)need;
}

static __attribute__((unused)) void act_decision(u32 packet_id, u32 verdict) {
    u8 *p = out_action(ACT_PACKET_DECISION, 5);
    if (!p) return;
    wr32(p, packet_id);
    p[4] = (u8)verdict;
}

static __attribute__((unused)) void act_replay(u32 packet_id) {
    u8 *p = out_action(ACT_REPLAY_PACKET, 4);
    if (p) wr32(p, packet_id);
}

/* ---- config: the host passes JSON; activators only need a few integers ----
 * Finds "key" followed by ':' and a non-negative integer; returns dflt otherwise.
 * Deliberately tiny: no nesting awareness, which is fine for flat configs. */
static __attribute__((unused)) u32 cfg_u32(const u8 *cfg, u32 len, const char *key, u32 dflt) {
    u32 klen = 0;
    while (key[klen]) klen++;
    for (u32 i = 0; i + klen + 2 <= len; i++) {
        if (cfg[i] != '"') continue;
        u32 k = 0;
        while (k < klen && cfg[i + 1 + k] == (u8)key[k]) k++;
        if (k != klen || cfg[i + 1 + klen] != '"') continue;
        u32 j = i + 2 + klen;
        while (j < len && (cfg[j] == ' ' || cfg[j] == '\t' || cfg[j] == '\n')) j++;
        if (j >= len || cfg[j] != ':') continue;
        j++;
        while (j < len && (cfg[j] == ' ' || cfg[j] == '\t' || cfg[j] == '\n')) j++;
        if (j >= len || cfg[j] < '0' || cfg[j] > '9') return dflt;
        u64 v = 0;
        while (j < len && cfg[j] >= '0' && cfg[j] <= '9') {
            v = v * 10 + (u64)(cfg[j] - '0');
            if (v > 0xffffffffu) return dflt;
            j++;
        }
        return (u32)v;
    }
    return dflt;
}

#endif
