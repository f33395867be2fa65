//! stream_hold.zig - activators/stream/stream.c written with the Zig SDK: the worked
//! example of activators/sdk/zig, and the Zig side of `python -m tests.bench sdk`.
//!
//! It knows no protocol. A new connection wakes the service and is paused at once (its
//! bytes wait in the client's kernel); once a backend is ready the stream connects
//! upstream, is resumed and spliced. With "wake_on_data": 1 a connection wakes the service
//! only when its first bytes arrive: that first read (at most 64 KiB) is held in one of 64
//! pool blocks and goes upstream before the splice; with no block free the connection is
//! closed (logged). Streams held longer than "hold_timeout_ms" are closed. need is
//! `active` while any stream has woken, `none` otherwise.

const fab = @import("fabricd");

pub const streams = true;

const held_cap = 64 * 1024; // one host read

const State = enum(u8) { holding, connecting, spliced };

const Stream = struct {
    state: State,
    paused: bool,
    woke: bool,
    block: ?*[held_cap]u8,
    held_len: u32,
    opened_ms: u64,
};

var table: fab.Table(Stream, 4096) = .{};
var pool: fab.Pool(held_cap, 64) = .{};
var nwoke: u32 = 0;
var wake_on_data = false;
var hold_timeout_ms: u32 = 30000;
var full_logged = false;

pub fn init(cfg: fab.Json) void {
    wake_on_data = cfg.getBool("wake_on_data", false);
    hold_timeout_ms = cfg.getU32("hold_timeout_ms", 30000);
}

fn release(s: *Stream) void {
    if (s.block) |b| pool.put(b);
    s.block = null;
    s.held_len = 0;
}

fn forget(s: *Stream) void {
    release(s);
    if (s.woke) nwoke -= 1;
    table.del(s);
}

fn closeStream(sid: u32, s: *Stream) void {
    fab.close(sid);
    forget(s);
}

fn connect(sid: u32, s: *Stream) void {
    s.state = .connecting;
    fab.connect(sid, 0); // 0: the port's target_port
}

pub fn streamOpen(sid: u32, port: u16) void {
    _ = port;
    const s = table.addValue(sid, .{ .state = .holding, .paused = !wake_on_data, .woke = !wake_on_data, .block = null, .held_len = 0, .opened_ms = fab.now() }) orelse return fab.close(sid);
    if (s.woke) nwoke += 1;
    if (s.paused) fab.pause(sid);
    if (fab.backendReady() and s.woke) connect(sid, s);
}

pub fn streamData(sid: u32, data: []const u8) void {
    const s = table.get(sid) orelse return;
    if (s.state == .spliced) return;
    const b = s.block orelse blk: {
        const got = pool.get() orelse {
            if (!full_logged) fab.log(.warning, "stream activator: all hold buffers in use; closing a connection that sent bytes");
            full_logged = true;
            return closeStream(sid, s);
        };
        s.block = got;
        break :blk got;
    };
    if (data.len > held_cap - s.held_len) {
        fab.log(.warning, "stream activator: more bytes than one read; closing");
        return closeStream(sid, s);
    }
    @memcpy(b[s.held_len..][0..data.len], data);
    s.held_len += @intCast(data.len);
    if (!s.paused) {
        s.paused = true;
        fab.pause(sid);
    }
    if (!s.woke) {
        s.woke = true;
        nwoke += 1;
    }
    if (fab.backendReady() and s.state == .holding) connect(sid, s);
}

pub fn streamClose(sid: u32) void {
    const s = table.get(sid) orelse return;
    if (s.state == .spliced) return forget(s); // the pair ended
    if (s.state == .holding and s.held_len == 0 and wake_on_data) return closeStream(sid, s);
    // paused, a half-close is not seen before the splice; the splice carries it on
}

pub fn upstreamResult(sid: u32, ok: bool) void {
    const s = table.get(sid) orelse return;
    if (s.state != .connecting) return;
    if (!ok) {
        s.state = .holding; // retried on the next backend_available or tick
        return;
    }
    if (s.block) |b| _ = fab.upstreamSend(sid, b[0..s.held_len]);
    release(s);
    if (s.paused) {
        fab.unpause(sid);
        s.paused = false;
    }
    fab.splice(sid);
    s.state = .spliced;
}

pub fn upstreamClose(sid: u32) void {
    const s = table.get(sid) orelse return;
    if (s.state != .spliced) closeStream(sid, s);
}

fn connectHeld() void {
    var it: u32 = 0;
    while (table.next(&it)) |s| {
        if (s.state == .holding and s.woke) connect(table.keyOf(s), s);
    }
}

pub fn backendAvailable() void {
    connectHeld();
}

pub fn tick(now: u64) void {
    var it: u32 = 0;
    while (table.next(&it)) |s| {
        if (s.state == .spliced) continue;
        if (s.opened_ms == 0) s.opened_ms = now; // opened before the first tick
        if (now -% s.opened_ms >= hold_timeout_ms) {
            fab.log(.info, "stream activator: held connection timed out");
            closeStream(table.keyOf(s), s);
        }
    }
    if (fab.backendReady()) connectHeld();
}

pub fn batchEnd() void {
    fab.need(if (nwoke > 0) .active else .none);
}

comptime {
    fab.exportActivator(@This());
}
