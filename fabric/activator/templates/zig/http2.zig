//! {{name}}: an HTTP/2 (cleartext, prior knowledge) stream activator written with
//! fabricd's Zig SDK (fabricd.zig) alone: frames are read by hand (9-byte headers after
//! the 24-byte client preface).
//!
//! A connection wakes the service only when it sends a request (a HEADERS frame): clients
//! that open a connection and only send SETTINGS or PING (connection pools, keep-alive
//! checks) wake nothing. What the client sent is held (at most 16 KiB per connection, in
//! one of 256 pool blocks; then the client is paused) and goes to the backend first once
//! it is connected, then the connection is spliced. Every byte upstream is the client's,
//! in order, so if this module ever fails the fabric can still proxy it.

const std = @import("std");
const fab = @import("fabricd");

pub const streams = true;

const hold_cap = 16384;
const preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const frame_headers: u8 = 0x1;

const State = enum(u8) { holding, connecting, spliced };
const Conn = struct {
    state: State,
    woke: bool, // a request was seen
    paused: bool,
    scanned: u32, // bytes of block already parsed as frames
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

/// Wake on the first HEADERS (or on anything that is not HTTP/2: the backend decides).
fn scan(c: *Conn) void {
    const d = c.block.?[0..c.len];
    if (c.scanned == 0) {
        const k = @min(d.len, preface.len);
        if (!std.mem.eql(u8, d[0..k], preface[0..k])) return wake(c);
        if (d.len < preface.len) return;
        c.scanned = preface.len;
    }
    while (!c.woke and d.len - c.scanned >= 9) {
        const f = d[c.scanned..];
        if (f[3] == frame_headers) {
            fab.count("requests_woke", 1);
            return wake(c);
        }
        const len = fab.be24(f);
        if (len > d.len - c.scanned - 9) return; // the rest of this frame is still coming
        c.scanned += 9 + len;
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
    c.* = .{ .state = .holding, .woke = false, .paused = false, .scanned = 0, .len = 0, .block = b, .opened_ms = fab.now() };
}

pub fn streamData(sid: u32, data: []const u8) void {
    const c = conns.get(sid) orelse return;
    if (c.state == .spliced) return;
    const b = c.block orelse return;
    if (data.len > hold_cap - c.len) {
        fab.log(.warning, "{{name}}: more than 16 KiB held; closing");
        return dropConn(sid, c);
    }
    @memcpy(b[c.len..][0..data.len], data);
    c.len += @intCast(data.len);
    if (!c.woke) scan(c);
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
