/* tcp_raw.c - the TCP activator as it was before the SDK, written against the raw ABI.
 *
 * Kept as the reference for `python -m tests.bench sdk`: the per-event cost through the
 * SDK (activators/tcp/tcp.c) is compared with this hand-written decoder and writer.
 *
 * While the service has no backend, a SYN of a new flow asks for a backend and is held;
 * further segments of that flow are held too; RSTs and segments of unknown flows (stray
 * ACKs, keepalives from connections that died with the last backend) are dropped without
 * waking anything. On backend_available every held packet is replayed in arrival order.
 * The guest never sees packet bytes again after the event: it keeps packet ids only, the
 * host keeps the bytes.
 *
 * Config (JSON, all optional): max_flows (<= 4096), hold_timeout_ms (default 30000).
 */
#include "../common/fab.h"

#define MAX_FLOWS 4096
#define MAX_HELD 8192
#define NBUCKETS 8192 /* power of two */
#define NIL 0xffffffffu

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

struct flow {
    u32 src, dst;       /* raw address bytes as read little-endian; only compared */
    u32 ports;          /* sport << 16 | dport */
    u32 hash;
    u32 next;           /* bucket chain */
    u32 older, newer;   /* age list, oldest first */
    u32 held_first;     /* index into held[] of this flow's first held packet */
    u32 held_last;
    u64 created_ms;
    u8 used;
};

struct held {
    u32 packet_id;
    u32 flow;           /* NIL once dropped */
    u32 next_in_flow;
};

static struct flow flows[MAX_FLOWS];
static u32 buckets[NBUCKETS];
static u32 free_head;
static u32 age_oldest, age_newest;
static u32 nflows;

static struct held held[MAX_HELD];
static u32 held_head, held_count;
static int held_full_logged;

static u32 max_flows = MAX_FLOWS;
static u32 hold_timeout_ms = 30000;
static int backend_ready;
static u64 now_ms;
static u32 evicted_total;

static void reset_tables(void) {
    for (u32 i = 0; i < NBUCKETS; i++) buckets[i] = NIL;
    for (u32 i = 0; i < MAX_FLOWS; i++) {
        flows[i].used = 0;
        flows[i].next = i + 1 < MAX_FLOWS ? i + 1 : NIL;
    }
    free_head = 0;
    age_oldest = age_newest = NIL;
    nflows = 0;
    held_head = held_count = 0;
    held_full_logged = 0;
}

FAB_EXPORT(fab_init) i32 fab_init(const u8 *cfg, u32 len) {
    max_flows = cfg_u32(cfg, len, "max_flows", MAX_FLOWS);
    if (max_flows == 0 || max_flows > MAX_FLOWS) max_flows = MAX_FLOWS;
    hold_timeout_ms = cfg_u32(cfg, len, "hold_timeout_ms", 30000);
    backend_ready = 0;
    now_ms = 0;
    evicted_total = 0;
    reset_tables();
    return 0;
}

static u32 lookup(u32 hash, u32 src, u32 dst, u32 ports) {
    for (u32 i = buckets[hash & (NBUCKETS - 1)]; i != NIL; i = flows[i].next) {
        struct flow *f = &flows[i];
        if (f->hash == hash && f->src == src && f->dst == dst && f->ports == ports) return i;
    }
    return NIL;
}

/* Forget a flow; its still-held packets are dropped (the host releases them). */
static void flow_free(u32 i) {
    struct flow *f = &flows[i];
    u32 *pp = &buckets[f->hash & (NBUCKETS - 1)];
    while (*pp != i) pp = &flows[*pp].next;
    *pp = f->next;
    if (f->older != NIL) flows[f->older].newer = f->newer; else age_oldest = f->newer;
    if (f->newer != NIL) flows[f->newer].older = f->older; else age_newest = f->older;
    for (u32 h = f->held_first; h != NIL; h = held[h].next_in_flow) {
        held[h].flow = NIL;
        act_decision(held[h].packet_id, VERDICT_DROP);
    }
    /* reclaim dead entries at the head of the ring */
    while (held_count && held[held_head].flow == NIL) {
        held_head = (held_head + 1) % MAX_HELD;
        held_count--;
    }
    f->used = 0;
    f->next = free_head;
    free_head = i;
    nflows--;
}

static u32 flow_new(u32 hash, u32 src, u32 dst, u32 ports) {
    if (nflows >= max_flows) {
        flow_free(age_oldest);
        evicted_total++;
        act_log(LOG_WARNING, "tcp activator: flow table full, evicted the oldest held flow");
    }
    u32 i = free_head;
    struct flow *f = &flows[i];
    free_head = f->next;
    f->src = src;
    f->dst = dst;
    f->ports = ports;
    f->hash = hash;
    f->created_ms = now_ms;
    f->held_first = f->held_last = NIL;
    f->used = 1;
    u32 b = hash & (NBUCKETS - 1);
    f->next = buckets[b];
    buckets[b] = i;
    f->newer = NIL;
    f->older = age_newest;
    if (age_newest != NIL) flows[age_newest].newer = i; else age_oldest = i;
    age_newest = i;
    nflows++;
    return i;
}

static void hold(u32 fi, u32 packet_id) {
    if (held_count >= MAX_HELD) {
        if (!held_full_logged) {
            act_log(LOG_WARNING, "tcp activator: hold queue full, dropping");
            held_full_logged = 1;
        }
        act_decision(packet_id, VERDICT_DROP);
        return;
    }
    u32 h = (held_head + held_count) % MAX_HELD;
    held_count++;
    held[h].packet_id = packet_id;
    held[h].flow = fi;
    held[h].next_in_flow = NIL;
    struct flow *f = &flows[fi];
    if (f->held_last != NIL) held[f->held_last].next_in_flow = h; else f->held_first = h;
    f->held_last = h;
    act_decision(packet_id, VERDICT_HOLD);
}

static void on_packet(const u8 *p, u32 len) {
    if (len < 8) return;
    u32 packet_id = rd32(p);
    u32 hash = rd32(p + 4);
    const u8 *ip = p + 8;
    u32 n = len - 8;
    if (backend_ready) {
        act_decision(packet_id, VERDICT_PASS);
        return;
    }
    /* Only well-formed, unfragmented-or-first-fragment IPv4 TCP can be judged. */
    if (n < 20 || (ip[0] >> 4) != 4) goto drop;
    u32 ihl = (u32)(ip[0] & 0x0f) * 4;
    if (ihl < 20 || n < ihl + 20 || ip[9] != 6 || (be16(ip + 6) & 0x1fff) != 0) goto drop;
    const u8 *tcp = ip + ihl;
    u32 flags = tcp[13];
    u32 src = rd32(ip + 12), dst = rd32(ip + 16);
    u32 ports = (be16(tcp) << 16) | be16(tcp + 2);
    u32 fi = lookup(hash, src, dst, ports);
    if (flags & TCP_RST) {
        if (fi != NIL) flow_free(fi); /* the client gave up: replaying would be wrong */
        goto drop;
    }
    if (fi != NIL) {
        hold(fi, packet_id); /* SYN retransmit or data of a held flow: no second wake */
        return;
    }
    if ((flags & (TCP_SYN | TCP_ACK)) == TCP_SYN) {
        fi = flow_new(hash, src, dst, ports);
        act_need(NEED_ACTIVE);
        hold(fi, packet_id);
        return;
    }
drop:
    act_decision(packet_id, VERDICT_DROP);
}

static void on_backend_available(void) {
    for (u32 k = 0; k < held_count; k++) {
        struct held *h = &held[(held_head + k) % MAX_HELD];
        if (h->flow != NIL) act_replay(h->packet_id);
    }
    reset_tables();
    backend_ready = 1;
}

static void on_tick(const u8 *p, u32 len) {
    if (len < 8) return;
    now_ms = rd64(p);
    while (age_oldest != NIL && now_ms >= flows[age_oldest].created_ms
           && now_ms - flows[age_oldest].created_ms >= hold_timeout_ms) {
        act_log(LOG_INFO, "tcp activator: held flow timed out");
        flow_free(age_oldest);
    }
}

FAB_EXPORT(fab_process) i64 fab_process(const u8 *ev, u32 len) {
    out_begin();
    if (len < 2) return out_end();
    u32 count = rd16(ev);
    u32 off = 2;
    for (u32 i = 0; i < count; i++) {
        if (len - off < REC_HDR) break;
        u32 kind = ev[off];
        u32 plen = rd32(ev + off + 4);
        off += REC_HDR;
        if (plen > len - off) break;
        const u8 *pl = ev + off;
        off += plen;
        switch (kind) {
        case EV_PACKET: on_packet(pl, plen); break;
        case EV_BACKEND_AVAILABLE: on_backend_available(); break;
        case EV_BACKEND_UNAVAILABLE: backend_ready = 0; break;
        case EV_TICK: on_tick(pl, plen); break;
        default: break; /* stream events are for L7 activators */
        }
    }
    /* When the batch overflowed, undecided packets stay held by the host (ABI.md). */
    return out_end();
}
