/* loop.c - spins forever on a packet event: must be stopped by fuel or the epoch deadline. */
#include "hostile.h"

static volatile u32 spin;

static void misbehave(u32 packet_id) {
    (void)packet_id;
    for (;;) spin++;
}
