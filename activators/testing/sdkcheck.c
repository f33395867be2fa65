/* sdkcheck.c - exercises the C SDK's data structures for tests/unit/test_sdk_c.py.
 *
 * Not an activator anyone deploys: each event is a command. stream_open(id, op) runs a
 * table operation on key `id` (op 1 add, 2 delete, 3 get) and
 * answers downstream_send(id, [found, count lo, count hi]); stream_data(0, json) parses
 * a config object and answers with what the JSON reader saw; stream_data(1, n) takes and
 * returns pool blocks; stream_data(2, ...) formats a log line. A small table (16 items,
 * 32 index slots) makes probe runs, wrap-around and a full table common.
 */
#include "../sdk/c/fabricd.h"

struct item {
    u32 value;
};

FAB_TABLE(tab, struct item, 16);
FAB_POOL(pool, 64, 4);
static u8 *taken[8];
static u32 ntaken;

static void on_open(u32 key, u32 op) {
    struct item *it = 0;
    if (op == 1) {
        it = fab_table_add(&tab, key);
        if (it) it->value = key ^ 0x5a5a5a5au;
    } else if (op == 2) {
        it = fab_table_get(&tab, key);
        if (it) fab_table_del(&tab, it);
    } else if (op == 3) {
        it = fab_table_get(&tab, key);
        if (it && it->value != (key ^ 0x5a5a5a5au)) fab_log(FAB_ERROR, "corrupt item");
    }
    u8 r[3] = {it ? 1 : 0, (u8)fab_table_count(&tab), (u8)(fab_table_count(&tab) >> 8)};
    fab_send(key, r, 3);
}

static void json_probe(const u8 *d, u32 n) {
    struct fab_json cfg = {d, n};
    u8 out[128];
    u32 o = 0;
    struct fab_json v = fab_json_get(cfg, "n");
    u32 num = fab_json_u32(v, 7777);
    fab_put_le32(out, num);
    o = 4;
    out[o++] = (u8)fab_cfg_bool(cfg, "b", 2);
    i32 sl = fab_cfg_str(cfg, "s", out + o + 1, 32);
    out[o] = (u8)(sl < 0 ? 255 : sl);
    o += 1 + (sl < 0 ? 0 : (u32)sl);
    struct fab_json arr = fab_json_get(cfg, "a"), el;
    u32 k = 0;
    for (u32 iter = 0; k < 16 && fab_json_next(arr, &iter, &el); k++)
        out[o + 1 + k] = (u8)fab_json_u32(el, 255);
    out[o] = (u8)k;
    o += 1 + k;
    fab_send(0, out, o);
}

static void pool_probe(const u8 *d, u32 n) {
    u8 r[16];
    u32 o = 0;
    for (u32 i = 0; i < n && o < sizeof r; i++) {
        if (d[i] == 'g') {
            u8 *b = fab_pool_get(&pool);
            r[o++] = b ? 1 : 0;
            if (b && ntaken < 8) taken[ntaken++] = b;
        } else if (d[i] == 'p' && ntaken) {
            fab_pool_put(&pool, taken[--ntaken]);
            r[o++] = 2;
        }
    }
    fab_send(1, r, o);
}

static void on_data(u32 sid, const u8 *d, u32 n) {
    if (sid == 0) json_probe(d, n);
    else if (sid == 1) pool_probe(d, n);
    else if (sid == 2) fab_logf(FAB_INFO, "u=%u d=%d x=%x s=%s c=%c b=%.*s %%", 4000000000u,
                                -42, 0xbeefu, "str", 'z', n, d);
}

static const struct fab_handlers H = {.stream_open = on_open, .stream_data = on_data};
FAB_STREAM_ACTIVATOR(H)
