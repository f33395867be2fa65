/* {{name}}: a packet (L3) activator written with fabricd's C SDK (fabricd.h, fab_tcp.h).
 *
 * While the service has no ready backend, a SYN of a new connection wakes it and is held,
 * and so is every later segment of a held connection; RSTs and stray segments (ACKs and
 * FINs of connections that died with the last backend), non-TCP and garbage are dropped
 * without waking anything. On backend_available the held packets are replayed in arrival
 * order; from then on every packet passes. Config: {"max_held": N} (at most 1024).
 */
#include "fabricd.h"
#include "fab_tcp.h"

#define MAX_HELD 1024

struct flow {
    u32 src, dst, ports; /* the tuple: the table's key is the host's flow hash */
};

FAB_TABLE(flows, struct flow, MAX_HELD);
static u32 held[MAX_HELD];
static u32 nheld, max_held = MAX_HELD;

static int init(struct fab_json cfg) {
    max_held = fab_cfg_u32(cfg, "max_held", MAX_HELD);
    if (max_held == 0 || max_held > MAX_HELD) max_held = MAX_HELD;
    fab_table_clear(&flows);
    nheld = 0;
    return 0;
}

static int same_tuple(const void *item, const void *arg) {
    const struct flow *f = item;
    const struct fab_tcp *t = arg;
    return f->src == t->src && f->dst == t->dst && f->ports == fab_tcp_ports(t);
}

static void on_packet(const struct fab_packet *p) {
    if (fab_backend_ready()) {
        fab_pass(p->id);
        return;
    }
    struct fab_tcp t;
    if (fab_tcp_parse(p->ip, p->len, &t) < 0) {
        fab_drop(p->id);
        return;
    }
    struct flow *f = fab_table_find(&flows, p->flow_hash, same_tuple, &t);
    if ((t.flags & FAB_TCP_RST) || (!f && !fab_tcp_is_syn(&t)) || nheld >= max_held) {
        fab_drop(p->id);
        fab_count("dropped", 1);
        return;
    }
    if (!f) {
        f = fab_table_insert(&flows, p->flow_hash);
        if (!f) {
            fab_drop(p->id);
            return;
        }
        f->src = t.src;
        f->dst = t.dst;
        f->ports = fab_tcp_ports(&t);
        fab_set_need(FAB_NEED_ACTIVE); /* one wake per new connection */
        fab_count("wakes", 1);
    }
    held[nheld++] = p->id;
    fab_hold(p->id);
}

static void on_backend_available(void) {
    for (u32 i = 0; i < nheld; i++) fab_replay(held[i]);
    nheld = 0;
    fab_table_clear(&flows);
}

static const struct fab_handlers H = {
    .init = init,
    .packet = on_packet,
    .backend_available = on_backend_available,
};
FAB_ACTIVATOR(H)
