/* noexport.c - lacks fab_process: the host must refuse it at instantiation, every time. */
#define HOSTILE_NO_PROCESS
#include "hostile.h"

static void misbehave(u32 packet_id) { (void)packet_id; }

FAB_EXPORT(fab_unused) i32 fab_unused(void) {
    misbehave(0);
    return 0;
}
