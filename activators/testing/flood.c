/* flood.c - an action flood: answers every packet event with the largest action batch
 * the ABI allows, 65535 log actions in 1 MiB. The batch is built once, in fab_init, so a
 * call costs the guest almost no fuel: the cost would all be the host's, decoding. Log i
 * says "#" and i in six digits, so the host's tests can see which were read. */
#define HOSTILE_NO_PROCESS
#define HOSTILE_NO_INIT
#include "hostile.h"

#define FLOOD_RECORDS 65535u
#define FLOOD_TEXT 7u /* "#" and six digits */
#define FLOOD_RECORD (REC_HDR + 1u + FLOOD_TEXT)

static u8 flood[2 + FLOOD_RECORDS * FLOOD_RECORD];
static int flooding;

static void misbehave(u32 packet_id) {
    (void)packet_id;
    flooding = 1;
}

FAB_EXPORT(fab_init) i32 fab_init(const u8 *cfg, u32 len) {
    (void)cfg;
    (void)len;
    wr16(flood, FLOOD_RECORDS);
    u8 *r = flood + 2;
    for (u32 i = 0; i < FLOOD_RECORDS; i++, r += FLOOD_RECORD) {
        r[0] = ACT_LOG;
        r[1] = 0;
        wr16(r + 2, 0);
        wr32(r + 4, 1 + FLOOD_TEXT);
        r[REC_HDR] = LOG_DEBUG;
        r[REC_HDR + 1] = '#';
        u32 v = i;
        for (u32 d = FLOOD_TEXT - 1; d >= 1; d--) {
            r[REC_HDR + 1 + d] = (u8)('0' + v % 10);
            v /= 10;
        }
    }
    return 0;
}

FAB_EXPORT(fab_process) i64 fab_process(const u8 *ev, u32 len) {
    flooding = 0;
    u32 count = len >= 2 ? rd16(ev) : 0;
    u32 off = 2;
    for (u32 i = 0; i < count && len - off >= REC_HDR; i++) {
        u32 plen = rd32(ev + off + 4);
        if (ev[off] == EV_PACKET && plen >= 4 && len - off - REC_HDR >= 4) {
            misbehave(rd32(ev + off + REC_HDR));
            break;
        }
        off += REC_HDR + plen;
        if (off > len) break;
    }
    if (flooding) return (i64)(((u64)(u32)flood << 32) | (u64)sizeof flood);
    out_begin();
    act_log(LOG_DEBUG, "alive");
    return out_end();
}
