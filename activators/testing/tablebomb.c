/* tablebomb.c - a table bomb: a table of its own (the linker adds the function table, so
 * the module has two) that each packet event grows by 8M elements, 64 MiB of host memory
 * a call where nothing stops it. The host must refuse it at load: an activator has at
 * most one table, whose declared maximum is at most 10,000 elements. Built with
 * -mreference-types (build.py), which the C table type needs. */
#include "hostile.h"

static __externref_t table[0];

static void misbehave(u32 packet_id) {
    (void)packet_id;
    (void)__builtin_wasm_table_grow(table, __builtin_wasm_ref_null_extern(), 8u << 20);
}
