/* garbage.c - returns a malformed action batch on a packet event; packet_id % 5 picks how:
 * 0 pointer out of bounds, 1 unknown action kind, 2 record longer than the batch,
 * 3 count larger than the records present, 4 wrong payload length for a fixed-size kind. */
#define HOSTILE_NO_PROCESS
#include "hostile.h"

static i64 garbage;

static void misbehave(u32 packet_id) {
    u8 *p;
    switch (packet_id % 5) {
    case 0:
        garbage = (i64)(((u64)0xfffff000u << 32) | 64u);
        return;
    case 1:
        out_begin();
        p = out_action(200, 0);
        (void)p;
        break;
    case 2:
        out_begin();
        p = out_action(ACT_REPLAY_PACKET, 4);
        wr32(p, 1);
        wr32(fab_out + 2 + 4, 1000); /* record claims 1000 payload bytes */
        break;
    case 3:
        out_begin();
        act_replay(1);
        wr16(fab_out, 5);
        garbage = (i64)(((u64)(u32)fab_out << 32) | fab_out_len);
        return;
    default:
        out_begin();
        p = out_action(ACT_REPLAY_PACKET, 3);
        break;
    }
    garbage = out_end();
}

FAB_EXPORT(fab_process) i64 fab_process(const u8 *ev, u32 len) {
    garbage = 0;
    u32 count = len >= 2 ? rd16(ev) : 0;
    u32 off = 2;
    for (u32 i = 0; i < count && len - off >= REC_HDR; i++) {
        u32 plen = rd32(ev + off + 4);
        if (ev[off] == EV_PACKET && plen >= 4 && len - off - REC_HDR >= 4) {
            misbehave(rd32(ev + off + REC_HDR));
            return garbage;
        }
        off += REC_HDR + plen;
        if (off > len) break;
    }
    out_begin();
    act_log(LOG_DEBUG, "alive");
    return out_end();
}
