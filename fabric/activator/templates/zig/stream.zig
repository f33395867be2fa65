//! {{name}}: a stream activator written with fabricd's Zig SDK (fabricd.zig).
//!
//! The fabric terminates the service port's TCP connections and hands the bytes to this
//! module. A new connection wakes the service and is paused (its bytes wait in the
//! client's kernel); once a backend is ready it is connected upstream, resumed and spliced
//! (the kernel relays it from then on). Connections held longer than hold_timeout_ms (the
//! service's hold.timeout, added to the config by the host) are closed. need is active
//! while any connection is open (an open connection to an unknown protocol may be busy).

const fab = @import("fabricd");

pub const streams = true;

const State = enum(u8) { holding, connecting, spliced };
const Conn = struct { state: State, opened_ms: u64 };

var conns: fab.Table(Conn, 4096) = .{};
var hold_timeout_ms: u32 = 30000;

pub fn init(cfg: fab.Json) void {
    hold_timeout_ms = cfg.getU32("hold_timeout_ms", 30000);
}

fn connect(sid: u32, c: *Conn) void {
    c.state = .connecting;
    fab.connect(sid, 0); // 0: the port's target_port
}

pub fn streamOpen(sid: u32, port: u16) void {
    _ = port;
    const c = conns.add(sid) orelse return fab.close(sid); // table full
    c.* = .{ .state = .holding, .opened_ms = fab.now() };
    fab.pause(sid);
    if (fab.backendReady()) connect(sid, c);
}

pub fn upstreamResult(sid: u32, ok: bool) void {
    const c = conns.get(sid) orelse return;
    if (c.state != .connecting) return;
    if (!ok) {
        c.state = .holding; // retried on the next tick
        return;
    }
    fab.unpause(sid);
    fab.splice(sid);
    c.state = .spliced;
}

pub fn streamClose(sid: u32) void {
    const c = conns.get(sid) orelse return;
    if (c.state == .spliced) conns.del(c); // the pair ended
}

pub fn upstreamClose(sid: u32) void {
    const c = conns.get(sid) orelse return;
    if (c.state == .spliced) return;
    fab.close(sid);
    conns.del(c);
}

pub fn backendAvailable() void {
    var it: u32 = 0;
    while (conns.next(&it)) |c| {
        if (c.state == .holding) connect(conns.keyOf(c), c);
    }
}

pub fn tick(now: u64) void {
    var it: u32 = 0;
    while (conns.next(&it)) |c| {
        if (c.state == .spliced or now -% c.opened_ms < hold_timeout_ms) continue;
        fab.log(.info, "{{name}}: held connection timed out");
        fab.count("timeouts", 1);
        fab.close(conns.keyOf(c));
        conns.del(c);
    }
    if (fab.backendReady()) backendAvailable();
}

pub fn batchEnd() void {
    fab.need(if (conns.count() > 0) .active else .none);
}

comptime {
    fab.exportActivator(@This());
}
