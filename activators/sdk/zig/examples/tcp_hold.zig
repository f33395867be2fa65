//! tcp_hold.zig - activators/tcp/tcp.c written with the Zig SDK (the packet-activator
//! example, checked against tcp.wasm event for event, and measured against the raw-ABI
//! testing/tcp_raw.c in `python -m tests.bench sdk`).
//!
//! While the service has no backend, a SYN of a new flow asks for a backend and is held;
//! further segments of that flow are held too; RSTs (forgetting the flow) and segments of
//! unknown flows are dropped without waking anything. On backend_available every held
//! packet is replayed in arrival order. Config: max_flows (<= 4096), hold_timeout_ms.

const fab = @import("fabricd");

const max_flows_cap = 4096;
const max_held = 8192;
const nil = fab.nil;

const Flow = struct {
    src: u32,
    dst: u32,
    ports: u32,
    older: u32, // age list (table positions), oldest first
    newer: u32,
    held_first: u32, // index into held of this flow's first held packet
    held_last: u32,
    created_ms: u64,
};

const Held = struct { packet_id: u32, flow: u32, next_in_flow: u32 };

var flows: fab.Table(Flow, max_flows_cap) = .{};
var age_oldest: u32 = nil;
var age_newest: u32 = nil;
var held: [max_held]Held = undefined;
var held_head: u32 = 0;
var held_count: u32 = 0;
var held_full_logged = false;
var max_flows: u32 = max_flows_cap;
var hold_timeout_ms: u32 = 30000;

fn resetTables() void {
    flows.clear();
    age_oldest = nil;
    age_newest = nil;
    held_head = 0;
    held_count = 0;
    held_full_logged = false;
}

pub fn init(cfg: fab.Json) void {
    max_flows = cfg.getU32("max_flows", max_flows_cap);
    if (max_flows == 0 or max_flows > max_flows_cap) max_flows = max_flows_cap;
    hold_timeout_ms = cfg.getU32("hold_timeout_ms", 30000);
    resetTables();
}

fn sameTuple(f: *const Flow, t: *const fab.Tcp) bool {
    return f.src == t.src and f.dst == t.dst and f.ports == t.ports();
}

/// Forget a flow; its still-held packets are dropped (the host releases them).
fn flowFree(f: *Flow) void {
    if (f.older != nil) flows.at(f.older).newer = f.newer else age_oldest = f.newer;
    if (f.newer != nil) flows.at(f.newer).older = f.older else age_newest = f.older;
    var h = f.held_first;
    while (h != nil) : (h = held[h].next_in_flow) {
        held[h].flow = nil;
        fab.drop(held[h].packet_id);
    }
    while (held_count > 0 and held[held_head].flow == nil) { // reclaim the ring's head
        held_head = (held_head + 1) % max_held;
        held_count -= 1;
    }
    flows.del(f);
}

fn flowNew(hash: u32, t: *const fab.Tcp) *Flow {
    if (flows.count() >= max_flows) {
        flowFree(flows.at(age_oldest));
        fab.log(.warning, "tcp activator: flow table full, evicted the oldest held flow");
    }
    const f = flows.insert(hash).?; // room was made above
    const pos = flows.pos(f);
    f.* = .{ .src = t.src, .dst = t.dst, .ports = t.ports(), .older = age_newest, .newer = nil, .held_first = nil, .held_last = nil, .created_ms = fab.now() };
    if (age_newest != nil) flows.at(age_newest).newer = pos else age_oldest = pos;
    age_newest = pos;
    return f;
}

fn hold(f: *Flow, packet_id: u32) void {
    if (held_count >= max_held) {
        if (!held_full_logged) fab.log(.warning, "tcp activator: hold queue full, dropping");
        held_full_logged = true;
        return fab.drop(packet_id);
    }
    const h = (held_head + held_count) % max_held;
    held_count += 1;
    held[h] = .{ .packet_id = packet_id, .flow = flows.pos(f), .next_in_flow = nil };
    if (f.held_last != nil) held[f.held_last].next_in_flow = h else f.held_first = h;
    f.held_last = h;
    fab.hold(packet_id);
}

pub fn packet(p: fab.Packet) void {
    if (fab.backendReady()) return fab.pass(p.id);
    // non-TCP, fragments, garbage: nothing to wake for
    const t = fab.Tcp.parse(p.ip) orelse return fab.drop(p.id);
    const f = flows.find(p.flow_hash, &t, sameTuple);
    if (t.flags & fab.Tcp.rst != 0) {
        if (f) |held_flow| flowFree(held_flow); // the client gave up: replaying would be wrong
        return fab.drop(p.id);
    }
    if (f) |held_flow| return hold(held_flow, p.id); // a retransmit or data: no second wake
    if (t.isSyn()) {
        const nf = flowNew(p.flow_hash, &t);
        fab.setNeed(.active);
        return hold(nf, p.id);
    }
    fab.drop(p.id);
}

pub fn backendAvailable() void {
    var k: u32 = 0;
    while (k < held_count) : (k += 1) {
        const h = &held[(held_head + k) % max_held];
        if (h.flow != nil) fab.replay(h.packet_id);
    }
    resetTables();
}

pub fn tick(now: u64) void {
    while (age_oldest != nil) {
        const f = flows.at(age_oldest);
        if (now < f.created_ms or now - f.created_ms < hold_timeout_ms) break;
        fab.log(.info, "tcp activator: held flow timed out");
        flowFree(f);
    }
}

comptime {
    fab.exportActivator(@This());
}
