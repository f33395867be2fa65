/* membomb.c - grows linear memory a page at a time until the store limit refuses,
 * then answers normally: the host must notice the instance sits at its memory cap. */
#include "hostile.h"

static void misbehave(u32 packet_id) {
    (void)packet_id;
    while (__builtin_wasm_memory_grow(0, 1) != (unsigned long)-1) {
    }
}
