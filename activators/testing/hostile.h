/* hostile.h - shared skeleton for the hostile test activators.
 *
 * Each behaves well (answers with one log action "alive") until a batch contains a packet
 * event; then it misbehaves in its own way via misbehave(). That lets the host tests show
 * that one broken instance is recycled while another instance of the same module goes on.
 * HOSTILE_NO_PROCESS and HOSTILE_NO_INIT leave fab_process / fab_init to the module.
 */
#include "../common/fab.h"

static void misbehave(u32 packet_id);

#ifndef HOSTILE_NO_INIT
FAB_EXPORT(fab_init) i32 fab_init(const u8 *cfg, u32 len) {
    (void)cfg;
    (void)len;
    return 0;
}
#endif

#ifndef HOSTILE_NO_PROCESS
FAB_EXPORT(fab_process) i64 fab_process(const u8 *ev, u32 len) {
    out_begin();
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
    act_log(LOG_DEBUG, "alive");
    return out_end();
}
#endif
