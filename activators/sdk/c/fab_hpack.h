/* fab_hpack.h - HPACK (RFC 7541) for fabricd activators: a full decoder and a stateless
 * re-encoder.
 *
 * Why: an HTTP/2 or gRPC activator must decode every header block its peer sends, even
 * for streams it drops, or its view of the peer's dynamic table goes out of step; and
 * what it sends itself (a 503, gRPC Trailers-Only, a request relayed to another peer)
 * is simplest when it depends on no table at all. So: the decoder keeps the sender's
 * dynamic table (4096 octets, size updates, Huffman); the encoder never inserts: fully
 * indexed static entries where name and value match, otherwise literals without
 * indexing (never-indexed kept), no Huffman. Any peer decodes such blocks in any order.
 *
 *     #include "fabricd.h"
 *     #include "fab_hpack.h"
 *     static struct fab_hpack_table peer;          one per peer connection (~5 KiB)
 *     fab_hpack_decoder_init(&peer);
 *     static void field(void *ctx, const struct fab_hpack_field *f) {
 *         struct fab_hpack_out *o = ctx;           re-encode it, or look at it
 *         fab_hpack_encode_field(o, f->name, f->name_len, f->value, f->value_len,
 *                                f->never_indexed, f->static_name);
 *     }
 *     u8 out[1024]; struct fab_hpack_out o = {out, 0, sizeof out};
 *     if (fab_hpack_decode(&peer, block, len, field, &o)) -> COMPRESSION_ERROR
 *     fab_hpack_encode_header(&o, ":status", "503");    C strings, for answers of your own
 *
 * The first block you send on a connection (and the first after the peer's SETTINGS
 * names a HEADER_TABLE_SIZE) should start with a size update to 0 (the byte 0x20,
 * fab_hpack_size_update0): the peer then keeps no table for you at all.
 *
 * Limits: the decoder's table is FAB_HPACK_TABLE_SIZE (4096, the default
 * SETTINGS_HEADER_TABLE_SIZE: announce no other) in at most 128 entries; one decoded
 * name or value is at most FAB_HPACK_STR_CAP bytes (64 KiB; define it before the
 * include to change it); integers above 2^24 are errors. A field's name and value are
 * valid during the callback only (shared scratch buffers). Nothing here traps or reads
 * outside its input, whatever the bytes: a malformed block is -1. The work a block costs
 * is bounded by what it decodes to, not by its size (one byte can name a 4 KiB entry):
 * for a peer you do not trust use fab_hpack_decode_max, which stops past a decoded
 * header-list size you choose (-2).
 */
#ifndef FAB_HPACK_H
#define FAB_HPACK_H

#include "hpack_tables.h"

#ifndef FAB_HPACK_STR_CAP
#define FAB_HPACK_STR_CAP 65536
#endif
_Static_assert(FAB_HPACK_STR_CAP >= 64, "FAB_HPACK_STR_CAP: room for any static entry");
#define FAB_HPACK_TABLE_SIZE 4096
#define FAB_HPACK_ENTRIES 128
#define FAB_HPACK_STATIC_COUNT 61
#define FAB_HPACK_UNKNOWN 0xffu /* static_name not looked up yet */

/* ------------------------------------------------------------------ static table */

static u32 fab__hp_ready;
static u32 fab__hp_nlen[62], fab__hp_vlen[62];
static u8 fab__hp_hash[128];  /* name hash -> first static index with that name, 0: none */
static u8 fab__hp_first[62];  /* the first static index with the same name */
static u16 fab__hf_sym[257];
static u32 fab__hf_first[31], fab__hf_cnt[31], fab__hf_off[31];

FAB_INLINE u32 fab__hp_name_hash(const u8 *n, u32 len) {
    return (len * 31u + n[0] * 7u + n[len - 1]) & 127u;
}

/* Build the lookup tables (canonical Huffman code, static name index); idempotent, and
 * called by fab_hpack_decoder_init and the encoder, so you need not call it yourself. */
static FAB_UNUSED void fab_hpack_init(void) {
    if (fab__hp_ready) return;
    for (u32 l = 0; l < 31; l++) fab__hf_cnt[l] = 0;
    for (u32 s = 0; s < 257; s++) fab__hf_cnt[FAB_HPACK_HUFF_LEN[s]]++;
    u32 off = 0, code = 0;
    for (u32 l = 1; l <= 30; l++) {
        fab__hf_off[l] = off;
        fab__hf_first[l] = code;
        off += fab__hf_cnt[l];
        code = (code + fab__hf_cnt[l]) << 1;
    }
    u32 k = 0;
    for (u32 l = 1; l <= 30; l++)
        for (u32 s = 0; s < 257; s++)
            if (FAB_HPACK_HUFF_LEN[s] == l) fab__hf_sym[k++] = (u16)s;
    for (u32 i = 1; i <= 61; i++) {
        fab__hp_nlen[i] = fab_strlen(FAB_HPACK_STATIC_NAME[i]);
        fab__hp_vlen[i] = fab_strlen(FAB_HPACK_STATIC_VALUE[i]);
    }
    for (u32 i = 0; i < 128; i++) fab__hp_hash[i] = 0;
    for (u32 i = 1; i <= 61; i++) {
        fab__hp_first[i] = (u8)i;
        if (i > 1 && fab__hp_nlen[i] == fab__hp_nlen[i - 1] &&
            fab_memeq(FAB_HPACK_STATIC_NAME[i], FAB_HPACK_STATIC_NAME[i - 1], fab__hp_nlen[i])) {
            fab__hp_first[i] = fab__hp_first[i - 1];
            continue; /* same name as the entry before: found through that one */
        }
        u32 h = fab__hp_name_hash((const u8 *)FAB_HPACK_STATIC_NAME[i], fab__hp_nlen[i]);
        while (fab__hp_hash[h]) h = (h + 1) & 127u;
        fab__hp_hash[h] = (u8)i;
    }
    fab__hp_ready = 1;
}

/* The check every entry point makes; the work once. */
#define fab__hp_init() do { if (!fab__hp_ready) fab_hpack_init(); } while (0)

FAB_INLINE int fab__hp_eq(const u8 *a, u32 an, const char *b, u32 bn) {
    return an == bn && fab_memeq(a, b, an);
}

/* The first static-table index (1..61) whose name is `name`, or 0. */
static FAB_UNUSED u32 fab_hpack_static_name(const u8 *name, u32 len) {
    if (!len) return 0;
    fab__hp_init();
    for (u32 h = fab__hp_name_hash(name, len); fab__hp_hash[h]; h = (h + 1) & 127u) {
        u32 i = fab__hp_hash[h];
        if (fab__hp_eq(name, len, FAB_HPACK_STATIC_NAME[i], fab__hp_nlen[i])) return i;
    }
    return 0;
}

/* ------------------------------------------------------------------ primitives */

/* Decode n Huffman-coded bytes into out; the length, or -1 (EOS, bad padding, > cap). */
static FAB_UNUSED i32 fab_hpack_huffman_decode(const u8 *p, u32 n, u8 *out, u32 cap) {
    fab__hp_init();
    u32 code = 0, l = 0, o = 0;
    for (u32 i = 0; i < n; i++) {
        for (i32 b = 7; b >= 0; b--) {
            code = (code << 1) | ((p[i] >> b) & 1);
            l++;
            if (l > 30) return -1;
            if (code >= fab__hf_first[l] && code - fab__hf_first[l] < fab__hf_cnt[l]) {
                u32 sym = fab__hf_sym[fab__hf_off[l] + code - fab__hf_first[l]];
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

/* An integer with a `bits`-bit prefix at p[*pos]; 0 (and *pos past it) or -1. */
static FAB_UNUSED int fab_hpack_int(const u8 *p, u32 len, u32 *pos, u32 bits, u32 *out) {
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

/* A string literal (Huffman or raw) into out (FAB_HPACK_STR_CAP bytes); its length or -1. */
static FAB_UNUSED i32 fab_hpack_str(const u8 *p, u32 len, u32 *pos, u8 *out) {
    if (*pos >= len) return -1;
    u32 h = p[*pos] & 0x80, n;
    if (fab_hpack_int(p, len, pos, 7, &n) || n > len - *pos) return -1;
    i32 r;
    if (h) {
        r = fab_hpack_huffman_decode(p + *pos, n, out, FAB_HPACK_STR_CAP);
    } else {
        if (n > FAB_HPACK_STR_CAP) return -1;
        fab_copy(out, p + *pos, n);
        r = (i32)n;
    }
    *pos += n;
    return r;
}

/* ------------------------------------------------------------------ the dynamic table */

/* One peer's encoder table as its decoder sees it: a ring of FAB_HPACK_TABLE_SIZE bytes. */
struct fab_hpack_table {
    u8 data[FAB_HPACK_TABLE_SIZE];
    u32 off[FAB_HPACK_ENTRIES], nl[FAB_HPACK_ENTRIES], vl[FAB_HPACK_ENTRIES];
    u8 sidx[FAB_HPACK_ENTRIES]; /* the static index of the entry's name, 0: none */
    u32 head, n, size, max, wpos;
};

/* Empty, at the default size (4096): a new connection's table. */
FAB_INLINE void fab_hpack_decoder_init(struct fab_hpack_table *t) {
    fab__hp_init();
    t->head = t->n = t->size = t->wpos = 0;
    t->max = FAB_HPACK_TABLE_SIZE;
}

static FAB_UNUSED void fab__hp_evict(struct fab_hpack_table *t) {
    u32 slot = (t->head + FAB_HPACK_ENTRIES - (t->n - 1)) % FAB_HPACK_ENTRIES;
    t->size -= t->nl[slot] + t->vl[slot] + 32;
    t->n--;
}

static FAB_UNUSED void fab__hp_fit(struct fab_hpack_table *t, u32 need) {
    while (t->n && t->size + need > t->max) fab__hp_evict(t);
}

/* Copy n bytes in / out of the ring at off, in at most two pieces. */
static FAB_UNUSED u32 fab__hp_put(struct fab_hpack_table *t, u32 off, const u8 *src, u32 n) {
    u32 first = FAB_HPACK_TABLE_SIZE - off < n ? FAB_HPACK_TABLE_SIZE - off : n;
    if (first) fab_copy(t->data + off, src, first);
    if (n > first) fab_copy(t->data, src + first, n - first);
    return (off + n) % FAB_HPACK_TABLE_SIZE;
}

static FAB_UNUSED u32 fab__hp_get(const struct fab_hpack_table *t, u32 off, u8 *dst, u32 n) {
    u32 first = FAB_HPACK_TABLE_SIZE - off < n ? FAB_HPACK_TABLE_SIZE - off : n;
    if (first) fab_copy(dst, t->data + off, first);
    if (n > first) fab_copy(dst + first, t->data, n - first);
    return (off + n) % FAB_HPACK_TABLE_SIZE;
}

static FAB_UNUSED void fab__hp_insert(struct fab_hpack_table *t, const u8 *name, u32 nl,
                                      const u8 *val, u32 vl, u32 si) {
    u32 sz = nl + vl + 32;
    if (sz > t->max) {
        while (t->n) fab__hp_evict(t);
        return;
    }
    fab__hp_fit(t, sz);
    t->head = (t->head + 1) % FAB_HPACK_ENTRIES;
    t->off[t->head] = t->wpos;
    t->nl[t->head] = nl;
    t->vl[t->head] = vl;
    t->sidx[t->head] = (u8)si;
    t->wpos = fab__hp_put(t, t->wpos, name, nl);
    t->wpos = fab__hp_put(t, t->wpos, val, vl);
    t->n++;
    t->size += sz;
}

/* ------------------------------------------------------------------ the decoder */

/* One decoded field, valid during the callback only. */
struct fab_hpack_field {
    const u8 *name;
    u32 name_len;
    const u8 *value;
    u32 value_len;
    u32 static_name;   /* the first static index with this name (1..61), 0: none */
    int never_indexed; /* the sender said: never index it (keep it so when re-encoding) */
    u32 indexed;       /* an indexed field (RFC 7541 6.1): its index (1..61 static, 62..
                        * dynamic, so seen before as a literal); 0: a literal. Lets a caller
                        * that checked a value when it entered the table skip it now. */
};

typedef void (*fab_hpack_cb)(void *ctx, const struct fab_hpack_field *f);

static u8 fab__hp_name[FAB_HPACK_STR_CAP], fab__hp_value[FAB_HPACK_STR_CAP];

/* Entry idx (HPACK index, 1-based) into the scratch buffers; -1 when out of range. */
static FAB_UNUSED int fab__hp_lookup(struct fab_hpack_table *t, u32 idx, u32 *nl, u32 *vl,
                                     int want_value, u32 *si) {
    if (idx == 0) return -1;
    if (idx <= 61) {
        *si = fab__hp_first[idx];
        *nl = fab__hp_nlen[idx];
        fab_copy(fab__hp_name, FAB_HPACK_STATIC_NAME[idx], *nl);
        *vl = 0;
        if (want_value) {
            *vl = fab__hp_vlen[idx];
            fab_copy(fab__hp_value, FAB_HPACK_STATIC_VALUE[idx], *vl);
        }
        return 0;
    }
    u32 d = idx - 62;
    if (d >= t->n) return -1;
    u32 slot = (t->head + FAB_HPACK_ENTRIES - d) % FAB_HPACK_ENTRIES;
    *nl = t->nl[slot];
    *si = t->sidx[slot];
    u32 o = fab__hp_get(t, t->off[slot], fab__hp_name, *nl);
    *vl = 0;
    if (want_value) {
        *vl = t->vl[slot];
        fab__hp_get(t, o, fab__hp_value, *vl);
    }
    return 0;
}

/* Decode a whole header block (HEADERS + CONTINUATION payloads, reassembled) against the
 * sender's table, calling cb for every field in order; 0, or -1 for a malformed block
 * (the connection error COMPRESSION_ERROR: the table is out of step from then on), or -2
 * when the decoded header list grows past max_list octets (RFC 7541 4.1 sizes: name +
 * value + 32 per field; 0: no limit). Why the limit: a block of one-byte references to a
 * 4 KiB entry decodes to 4 KiB per byte (an "HPACK bomb"), so a 32 KiB block is 128 MB of
 * work; past the limit the decoder stops at once and the table is out of step, so -2 is a
 * connection error too (ENHANCE_YOUR_CALM). */
FAB_INLINE int fab_hpack_decode_max(struct fab_hpack_table *t, const u8 *p, u32 len,
                                     u32 max_list, fab_hpack_cb cb, void *ctx) {
    u32 pos = 0, seen = 0, list = 0;
    struct fab_hpack_field f;
    f.name = fab__hp_name;
    f.value = fab__hp_value;
    while (pos < len) {
        u8 b = p[pos];
        u32 idx, nl, vl, si = FAB_HPACK_UNKNOWN;
        if (b & 0x80) {
            if (fab_hpack_int(p, len, &pos, 7, &idx) || fab__hp_lookup(t, idx, &nl, &vl, 1, &si))
                return -1;
            f.never_indexed = 0;
            f.indexed = idx;
        } else if ((b & 0xe0) == 0x20) {
            if (seen || fab_hpack_int(p, len, &pos, 5, &idx) || idx > FAB_HPACK_TABLE_SIZE)
                return -1;
            t->max = idx;
            fab__hp_fit(t, 0);
            continue;
        } else {
            u32 bits = (b & 0x40) ? 6 : 4;
            int incr = (b & 0x40) != 0;
            f.never_indexed = (b & 0xf0) == 0x10;
            f.indexed = 0;
            if (fab_hpack_int(p, len, &pos, bits, &idx)) return -1;
            if (idx) {
                if (fab__hp_lookup(t, idx, &nl, &vl, 0, &si)) return -1;
            } else {
                i32 n = fab_hpack_str(p, len, &pos, fab__hp_name);
                if (n < 0) return -1;
                nl = (u32)n;
            }
            i32 v = fab_hpack_str(p, len, &pos, fab__hp_value);
            if (v < 0) return -1;
            vl = (u32)v;
            if (si == FAB_HPACK_UNKNOWN) si = fab_hpack_static_name(fab__hp_name, nl);
            if (incr) fab__hp_insert(t, fab__hp_name, nl, fab__hp_value, vl, si);
        }
        if (si == FAB_HPACK_UNKNOWN) si = fab_hpack_static_name(fab__hp_name, nl);
        list += nl + vl + 32;
        if (max_list && list > max_list) return -2;
        f.name_len = nl;
        f.value_len = vl;
        f.static_name = si;
        cb(ctx, &f);
        seen = 1;
    }
    return 0;
}

/* The same without a limit on the decoded list (a peer you trust, or a caller that bounds
 * the work otherwise). */
FAB_INLINE int fab_hpack_decode(struct fab_hpack_table *t, const u8 *p, u32 len,
                                 fab_hpack_cb cb, void *ctx) {
    return fab_hpack_decode_max(t, p, len, 0, cb, ctx);
}

/* ------------------------------------------------------------------ the encoder */

/* Where encoded fields go: bytes [0, len) of buf[cap]. */
struct fab_hpack_out {
    u8 *buf;
    u32 len;
    u32 cap;
};

FAB_INLINE int fab_hpack_put_int(struct fab_hpack_out *o, u32 first, u32 bits, u32 v) {
    u32 mask = (1u << bits) - 1;
    if (o->len + 6 > o->cap) return -1;
    if (v < mask) { o->buf[o->len++] = (u8)(first | v); return 0; }
    o->buf[o->len++] = (u8)(first | mask);
    v -= mask;
    while (v >= 128) { o->buf[o->len++] = (u8)(0x80 | (v & 0x7f)); v >>= 7; }
    o->buf[o->len++] = (u8)v;
    return 0;
}

/* A raw (not Huffman-coded) string literal. */
static FAB_UNUSED int fab_hpack_put_str(struct fab_hpack_out *o, const u8 *s, u32 n) {
    if (fab_hpack_put_int(o, 0, 7, n) || n > o->cap - o->len) return -1;
    fab_copy(o->buf + o->len, s, n);
    o->len += n;
    return 0;
}

/* One field, inserting into no table: the static entry when name and value match one
 * (and never_indexed is 0), else a literal without indexing (never indexed when asked)
 * naming the static entry's name if there is one. static_name: the name's first static
 * index as the decoder gives it, 0 for none, or FAB_HPACK_UNKNOWN to look it up. 0, or -1
 * when it does not fit (nothing written). */
FAB_INLINE int fab_hpack_encode_field(struct fab_hpack_out *o, const u8 *name, u32 nl,
                                      const u8 *value, u32 vl, int never_indexed,
                                      u32 static_name) {
    u32 save = o->len, si = static_name;
    if (si == FAB_HPACK_UNKNOWN) si = fab_hpack_static_name(name, nl);
    else if (si > 61) si = 0;
    else fab__hp_init();
    for (u32 i = si; !never_indexed && i && i <= 61 &&
                     fab__hp_eq(name, nl, FAB_HPACK_STATIC_NAME[i], fab__hp_nlen[i]); i++) {
        if (fab__hp_eq(value, vl, FAB_HPACK_STATIC_VALUE[i], fab__hp_vlen[i]))
            return fab_hpack_put_int(o, 0x80, 7, i);
    }
    if (si) {
        if (fab_hpack_put_int(o, never_indexed ? 0x10 : 0, 4, si)) goto full;
    } else {
        if (o->len + 1 > o->cap) goto full;
        o->buf[o->len++] = never_indexed ? 0x10 : 0;
        if (fab_hpack_put_str(o, name, nl)) goto full;
    }
    if (fab_hpack_put_str(o, value, vl)) goto full;
    return 0;
full:
    o->len = save;
    return -1;
}

/* The same with C strings, for answers of your own: fab_hpack_encode_header(&o,
 * ":status", "503"). */
static FAB_UNUSED int fab_hpack_encode_header(struct fab_hpack_out *o, const char *name,
                                              const char *value) {
    return fab_hpack_encode_field(o, (const u8 *)name, fab_strlen(name), (const u8 *)value,
                                  fab_strlen(value), 0, FAB_HPACK_UNKNOWN);
}

/* A dynamic table size update to 0: first in a block, it tells the peer's decoder to keep
 * no table for us (send it in the first block, and after the peer's SETTINGS names a
 * HEADER_TABLE_SIZE). */
#define fab_hpack_size_update0 0x20

#endif
