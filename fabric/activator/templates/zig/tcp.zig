//! {{name}}: a packet (L3) activator written with fabricd's Zig SDK (fabricd.zig).
//!
//! While the service has no ready backend, a SYN of a new connection wakes it and is held,
//! and so is every later segment of a held connection; RSTs and stray segments (ACKs and
//! FINs of connections that died with the last backend), non-TCP and garbage are dropped
//! without waking anything. On backend_available the held packets are replayed in arrival
//! order; from then on every packet passes. Config: {"max_held": N} (at most 1024).

const fab = @import("fabricd");

const max_held_cap = 1024;

const Flow = struct { src: u32, dst: u32, ports: u32 };

var flows: fab.Table(Flow, max_held_cap) = .{};
var held: [max_held_cap]u32 = undefined;
var nheld: u32 = 0;
var max_held: u32 = max_held_cap;

pub fn init(cfg: fab.Json) void {
    max_held = cfg.getU32("max_held", max_held_cap);
    if (max_held == 0 or max_held > max_held_cap) max_held = max_held_cap;
    flows.clear();
    nheld = 0;
}

fn sameTuple(f: *const Flow, t: fab.Tcp) bool {
    return f.src == t.src and f.dst == t.dst and f.ports == t.ports();
}

pub fn packet(p: fab.Packet) void {
    if (fab.backendReady()) return fab.pass(p.id);
    const t = fab.Tcp.parse(p.ip) orelse return fab.drop(p.id);
    var f = flows.find(p.flow_hash, t, sameTuple);
    if (t.flags & fab.Tcp.rst != 0 or (f == null and !t.isSyn()) or nheld >= max_held) {
        fab.drop(p.id);
        fab.count("dropped", 1);
        return;
    }
    if (f == null) {
        f = flows.insert(p.flow_hash) orelse return fab.drop(p.id);
        f.?.* = .{ .src = t.src, .dst = t.dst, .ports = t.ports() };
        fab.setNeed(.active); // one wake per new connection
        fab.count("wakes", 1);
    }
    held[nheld] = p.id;
    nheld += 1;
    fab.hold(p.id);
}

pub fn backendAvailable() void {
    for (held[0..nheld]) |id| fab.replay(id);
    nheld = 0;
    flows.clear();
}

comptime {
    fab.exportActivator(@This());
}
