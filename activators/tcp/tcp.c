/* tcp.c - the TCP activator: wake a backend only for real connection attempts.
 *
 * While the service has no backend, a SYN of a new flow asks for a backend and is held;
 * further segments of that flow are held too; RSTs and segments of unknown flows (stray
 * ACKs, keepalives from connections that died with the last backend) are dropped without
 * waking anything. On backend_available every held packet is replayed in arrival order.
 * The guest never sees packet bytes again after the event: it keeps packet ids only, the
 * host keeps the bytes.
 *
 * Config (JSON, all optional): max_flows (<= 4096), hold_timeout_ms (default 30000).
 * Written with the C SDK (activators/sdk/c); testing/tcp_raw.c is the same logic against
 * the raw ABI, kept to measure what the SDK costs.
 */
#include "../sdk/c/fabricd.h"
#include "../sdk/c/fab_tcp.h"

#define MAX_FLOWS 4096
#define MAX_HELD 8192

struct flow {
    u32 src, dst, ports; /* the tuple; the table's key is the host's flow hash */
    u32 older, newer;    /* age list (table positions), oldest first */
    u32 held_first;      /* index into held[] of this flow's first held packet */
    u32 held_last;
    u64 created_ms;
};

struct held {
    u32 packet_id;
    u32 flow;            /* table position, FAB_NIL once dropped */
    u32 next_in_flow;
};

FAB_TABLE(flows, struct flow, MAX_FLOWS);
static u32 age_oldest = FAB_NIL, age_newest = FAB_NIL;

static struct held held[MAX_HELD];
static u32 held_head, held_count;
static int held_full_logged;

static u32 max_flows = MAX_FLOWS;
static u32 hold_timeout_ms = 30000;

static struct flow *at(u32 pos) { return (struct flow *)(void *)(flows.items + pos * sizeof(struct flow)); }

static void reset_tables(void) {
    fab_table_clear(&flows);
    age_oldest = age_newest = FAB_NIL;
    held_head = held_count = 0;
    held_full_logged = 0;
}

static int init(struct fab_json cfg) {
    max_flows = fab_cfg_u32(cfg, "max_flows", MAX_FLOWS);
    if (max_flows == 0 || max_flows > MAX_FLOWS) max_flows = MAX_FLOWS;
    hold_timeout_ms = fab_cfg_u32(cfg, "hold_timeout_ms", 30000);
    reset_tables();
    return 0;
}

static int same_tuple(const void *item, const void *arg) {
    const struct flow *f = item;
    const struct fab_tcp *t = arg;
    return f->src == t->src && f->dst == t->dst && f->ports == fab_tcp_ports(t);
}

/* Forget a flow; its still-held packets are dropped (the host releases them). */
static void flow_free(struct flow *f) {
    if (f->older != FAB_NIL) at(f->older)->newer = f->newer; else age_oldest = f->newer;
    if (f->newer != FAB_NIL) at(f->newer)->older = f->older; else age_newest = f->older;
    for (u32 h = f->held_first; h != FAB_NIL; h = held[h].next_in_flow) {
        held[h].flow = FAB_NIL;
        fab_drop(held[h].packet_id);
    }
    /* reclaim dead entries at the head of the ring */
    while (held_count && held[held_head].flow == FAB_NIL) {
        held_head = (held_head + 1) % MAX_HELD;
        held_count--;
    }
    fab_table_del(&flows, f);
}

static struct flow *flow_new(u32 hash, const struct fab_tcp *t) {
    if (fab_table_count(&flows) >= max_flows) {
        flow_free(at(age_oldest));
        fab_log(FAB_WARNING, "tcp activator: flow table full, evicted the oldest held flow");
    }
    struct flow *f = fab_table_insert(&flows, hash);
    u32 pos = fab_table_pos(&flows, f);
    f->src = t->src;
    f->dst = t->dst;
    f->ports = fab_tcp_ports(t);
    f->created_ms = fab_now();
    f->held_first = f->held_last = FAB_NIL;
    f->newer = FAB_NIL;
    f->older = age_newest;
    if (age_newest != FAB_NIL) at(age_newest)->newer = pos; else age_oldest = pos;
    age_newest = pos;
    return f;
}

static void hold(struct flow *f, u32 packet_id) {
    if (held_count >= MAX_HELD) {
        if (!held_full_logged) {
            fab_log(FAB_WARNING, "tcp activator: hold queue full, dropping");
            held_full_logged = 1;
        }
        fab_drop(packet_id);
        return;
    }
    u32 h = (held_head + held_count) % MAX_HELD;
    held_count++;
    held[h].packet_id = packet_id;
    held[h].flow = fab_table_pos(&flows, f);
    held[h].next_in_flow = FAB_NIL;
    if (f->held_last != FAB_NIL) held[f->held_last].next_in_flow = h; else f->held_first = h;
    f->held_last = h;
    fab_hold(packet_id);
}

static void on_packet(const struct fab_packet *p) {
    if (fab_backend_ready()) {
        fab_pass(p->id);
        return;
    }
    struct fab_tcp t;
    if (fab_tcp_parse(p->ip, p->len, &t) < 0) {
        fab_drop(p->id); /* non-TCP, fragments, garbage: nothing to wake for */
        return;
    }
    struct flow *f = fab_table_find(&flows, p->flow_hash, same_tuple, &t);
    if (t.flags & FAB_TCP_RST) {
        if (f) flow_free(f); /* the client gave up: replaying would be wrong */
        fab_drop(p->id);
        return;
    }
    if (f) {
        hold(f, p->id); /* SYN retransmit or data of a held flow: no second wake */
        return;
    }
    if (fab_tcp_is_syn(&t)) {
        f = flow_new(p->flow_hash, &t);
        fab_set_need(FAB_NEED_ACTIVE);
        hold(f, p->id);
        return;
    }
    fab_drop(p->id);
}

static void on_backend_available(void) {
    for (u32 k = 0; k < held_count; k++) {
        struct held *h = &held[(held_head + k) % MAX_HELD];
        if (h->flow != FAB_NIL) fab_replay(h->packet_id);
    }
    reset_tables();
}

static void on_tick(u64 now) {
    while (age_oldest != FAB_NIL) {
        struct flow *f = at(age_oldest);
        if (now < f->created_ms || now - f->created_ms < hold_timeout_ms) break;
        fab_log(FAB_INFO, "tcp activator: held flow timed out");
        flow_free(f);
    }
}

/* When the answer overflowed, undecided packets stay held by the host (ABI.md). */
static const struct fab_handlers H = {
    .init = init,
    .packet = on_packet,
    .backend_available = on_backend_available,
    .tick = on_tick,
};
FAB_ACTIVATOR(H)
