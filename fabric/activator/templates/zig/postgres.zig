//! {{name}}: a PostgreSQL stream activator written with fabricd's Zig SDK (fabricd.zig)
//! alone: the client's first messages are read by hand.
//!
//! An SSLRequest or GSSENCRequest is answered "N" (no encryption) by the module itself,
//! without waking anything; the StartupMessage that follows wakes the service and is held
//! (with anything after it, at most 8 KiB per connection) until a backend is connected,
//! then sent on and the connection spliced. A client that connects and sends nothing
//! (a port scan, a TCP health check) wakes nothing.

const std = @import("std");
const fab = @import("fabricd");

pub const streams = true;

const hold_cap = 8192;
const ssl_request: u32 = 80877103;
const gssenc_request: u32 = 80877104;

const State = enum(u8) { holding, connecting, spliced };
const Conn = struct {
    state: State,
    woke: bool, // a request was seen
    paused: bool,
    len: u32,
    block: ?*[hold_cap]u8,
    opened_ms: u64,
};

var conns: fab.Table(Conn, 1024) = .{};
var blocks: fab.Pool(hold_cap, 256) = .{};
var nwoke: u32 = 0;
var hold_timeout_ms: u32 = 30000;

pub fn init(cfg: fab.Json) void {
    hold_timeout_ms = cfg.getU32("hold_timeout_ms", 30000);
}

fn forget(c: *Conn) void {
    if (c.woke) nwoke -= 1;
    if (c.block) |b| blocks.put(b);
    conns.del(c);
}

fn dropConn(sid: u32, c: *Conn) void {
    fab.close(sid);
    forget(c);
}

fn connect(sid: u32, c: *Conn) void {
    c.state = .connecting;
    fab.connect(sid, 0);
}

fn wake(c: *Conn) void {
    c.woke = true;
    nwoke += 1;
}

/// Answer encryption requests at the front of what is held; wake on anything else.
fn scan(sid: u32, c: *Conn) void {
    const b = c.block.?;
    while (!c.woke and c.len >= 8) {
        const len = fab.be32(b[0..]);
        const code = fab.be32(b[4..]);
        if (len == 8 and (code == ssl_request or code == gssenc_request)) {
            _ = fab.send(sid, "N");
            fab.count("ssl_refused", 1);
            std.mem.copyForwards(u8, b[0 .. c.len - 8], b[8..c.len]);
            c.len -= 8;
            continue;
        }
        fab.count("startups_woke", 1); // a StartupMessage (or a CancelRequest): the backend's
        wake(c);
    }
}

pub fn streamOpen(sid: u32, port: u16) void {
    _ = port;
    const b = blocks.get() orelse {
        fab.count("refused", 1);
        return fab.close(sid);
    };
    const c = conns.add(sid) orelse {
        blocks.put(b);
        fab.count("refused", 1);
        return fab.close(sid);
    };
    c.* = .{ .state = .holding, .woke = false, .paused = false, .len = 0, .block = b, .opened_ms = fab.now() };
}

pub fn streamData(sid: u32, data: []const u8) void {
    const c = conns.get(sid) orelse return;
    if (c.state == .spliced) return;
    const b = c.block orelse return;
    if (data.len > hold_cap - c.len) {
        fab.log(.warning, "{{name}}: more than 8 KiB held; closing");
        return dropConn(sid, c);
    }
    @memcpy(b[c.len..][0..data.len], data);
    c.len += @intCast(data.len);
    scan(sid, c);
    if (c.woke and !c.paused) {
        fab.pause(sid); // the rest waits in the client's kernel
        c.paused = true;
    }
    if (c.woke and c.state == .holding and fab.backendReady()) connect(sid, c);
}

pub fn upstreamResult(sid: u32, ok: bool) void {
    const c = conns.get(sid) orelse return;
    if (c.state != .connecting) return;
    if (!ok) {
        c.state = .holding;
        return;
    }
    if (c.block) |b| {
        _ = fab.upstreamSend(sid, b[0..c.len]);
        blocks.put(b);
        c.block = null;
    }
    if (c.paused) fab.unpause(sid);
    fab.splice(sid);
    c.state = .spliced;
}

pub fn streamClose(sid: u32) void {
    const c = conns.get(sid) orelse return;
    if (c.state == .spliced or !c.woke) dropConn(sid, c); // ended, or never asked
}

pub fn upstreamClose(sid: u32) void {
    const c = conns.get(sid) orelse return;
    if (c.state != .spliced) dropConn(sid, c);
}

pub fn tick(now: u64) void {
    var it: u32 = 0;
    while (conns.next(&it)) |c| {
        const sid = conns.keyOf(c);
        if (c.state == .holding and c.woke and fab.backendReady()) {
            connect(sid, c);
        } else if (c.state != .spliced and now -% c.opened_ms >= hold_timeout_ms) dropConn(sid, c);
    }
}

pub fn backendAvailable() void {
    var it: u32 = 0;
    while (conns.next(&it)) |c| {
        if (c.state == .holding and c.woke) connect(conns.keyOf(c), c);
    }
}

pub fn batchEnd() void {
    fab.need(if (nwoke > 0) .active else .none);
}

comptime {
    fab.exportActivator(@This());
}
