/* trap.c - executes `unreachable` on a packet event. */
#include "hostile.h"

static void misbehave(u32 packet_id) {
    (void)packet_id;
    __builtin_trap();
}
