//! fabricd.zig - the Zig SDK for fabricd activators (ABI v1, activators/ABI.md).
//!
//! Why: the ABI is a binary batch format; this module decodes the host's event batches,
//! dispatches each event to a handler of yours (found at compile time: declare only the
//! ones you need) and writes your actions into the answer. It is the Zig twin of
//! activators/sdk/c/fabricd.h: the same concepts, the same names where Zig allows.
//!
//!     const fab = @import("fabricd");
//!     pub const streams = true; // a stream activator (omit for a packet one)
//!     pub fn streamData(sid: u32, data: []const u8) void { _ = fab.upstreamSend(sid, data); }
//!     comptime { fab.exportActivator(@This()); }
//!
//! Handlers (all optional, `pub fn` in the struct given to exportActivator):
//!   init(cfg: Json) -> void | bool (false refuses the config) | anyerror!void
//!   batchBegin(), batchEnd() (set the need level here), backendAvailable(),
//!   backendUnavailable(), tick(now_ms: u64), packet(p: Packet),
//!   streamOpen(sid: u32, port: u16), streamData(sid: u32, data: []const u8),
//!   streamClose(sid), upstreamResult(sid, ok: bool), upstreamData(sid, data),
//!   upstreamClose(sid).
//! Payloads are valid during the handler only. Build with `fabricd activator build`
//! (zig build-exe -target wasm32-freestanding -fno-entry -rdynamic -O ReleaseFast -fstrip,
//! see fabric/activator/toolchain.py). No allocator, no imports, no std I/O: everything
//! is a fixed-size global (Table, Buf, Pool), so memory use is known at build time.

const std = @import("std");
const root = @import("root");

pub const abi_version: i32 = 1;

/// Event kinds (host -> guest).
pub const ev = struct {
    pub const backend_available: u8 = 1;
    pub const backend_unavailable: u8 = 2;
    pub const tick: u8 = 3;
    pub const packet: u8 = 4;
    pub const stream_open: u8 = 16;
    pub const stream_data: u8 = 17;
    pub const stream_close: u8 = 18;
    pub const upstream_connect_result: u8 = 32;
    pub const upstream_data: u8 = 33;
    pub const upstream_close: u8 = 34;
};

/// Action kinds (guest -> host).
pub const act = struct {
    pub const set_backend_need: u8 = 1;
    pub const log: u8 = 2;
    pub const packet_decision: u8 = 3;
    pub const replay_packet: u8 = 4;
    pub const count: u8 = 5;
    pub const downstream_send: u8 = 16;
    pub const downstream_close: u8 = 17;
    pub const upstream_connect: u8 = 32;
    pub const upstream_send: u8 = 33;
    pub const upstream_close: u8 = 34;
    pub const pause: u8 = 48;
    pub const @"resume": u8 = 49;
    pub const splice: u8 = 50;
};

pub const Need = enum(u8) { none = 0, traffic = 1, active = 2 };
pub const Verdict = enum(u8) { hold = 0, drop = 1, pass = 2 };
pub const Level = enum(u8) { debug = 0, info = 1, warning = 2, err = 3 };

pub const nil: u32 = 0xffff_ffff;
const rec_hdr: u32 = 8;

// ------------------------------------------------------------------ bytes

pub inline fn le16(p: []const u8) u16 {
    return std.mem.readInt(u16, p[0..2], .little);
}
pub inline fn le32(p: []const u8) u32 {
    return std.mem.readInt(u32, p[0..4], .little);
}
pub inline fn le64(p: []const u8) u64 {
    return std.mem.readInt(u64, p[0..8], .little);
}
pub inline fn be16(p: []const u8) u16 {
    return std.mem.readInt(u16, p[0..2], .big);
}
pub inline fn be24(p: []const u8) u32 {
    return std.mem.readInt(u24, p[0..3], .big);
}
pub inline fn be32(p: []const u8) u32 {
    return std.mem.readInt(u32, p[0..4], .big);
}
pub inline fn putLe16(p: []u8, v: u16) void {
    std.mem.writeInt(u16, p[0..2], v, .little);
}
pub inline fn putLe32(p: []u8, v: u32) void {
    std.mem.writeInt(u32, p[0..4], v, .little);
}
pub inline fn putBe16(p: []u8, v: u16) void {
    std.mem.writeInt(u16, p[0..2], v, .big);
}
pub inline fn putBe24(p: []u8, v: u24) void {
    std.mem.writeInt(u24, p[0..3], v, .big);
}
pub inline fn putBe32(p: []u8, v: u32) void {
    std.mem.writeInt(u32, p[0..4], v, .big);
}

// ------------------------------------------------------------------ memory

/// fab_alloc: the host asks rarely (once, then when a batch outgrows its buffer), so each
/// request gets fresh pages at the top of memory, never freed.
fn alloc(size: u32) u32 {
    if (size > 0x7fff_0000) return 0;
    const pages = (size + 65535) / 65536;
    const old = @wasmMemoryGrow(0, pages);
    if (old < 0) return 0;
    return @as(u32, @intCast(old)) * 65536;
}

// ------------------------------------------------------------------ actions

/// Bytes of one answer (the host reads at most 1 MiB); `pub const fab_out_cap` in the
/// root file changes it.
const out_cap: u32 = if (@hasDecl(root, "fab_out_cap")) root.fab_out_cap else 256 * 1024;
var out: [out_cap]u8 = undefined;
var out_len: u32 = 2;
var out_count: u32 = 0;
var out_last: u32 = 0;
var out_full: bool = false;

var now_ms: u64 = 0;
var backend_ready: bool = false;
var need_told: u32 = nil;
var bad_events: u32 = 0;

/// The time of the last tick (ms, monotonic; 0 before the first).
pub inline fn now() u64 {
    return now_ms;
}
/// Whether the host said a backend is ready (backend_available, not yet _unavailable).
pub inline fn backendReady() bool {
    return backend_ready;
}
/// Whether an action of this call did not fit: the rest of the answer is lost.
pub inline fn full() bool {
    return out_full;
}
/// Bytes left in this call's answer for the payload of one more action.
pub inline fn room() u32 {
    const left = out_cap - out_len;
    return if (left > rec_hdr) left - rec_hdr else 0;
}
/// Events whose payload was shorter than their kind needs (a host bug or a newer host).
pub inline fn badEvents() u32 {
    return bad_events;
}

/// Reserve one action record; its payload, or null (and full()) when the answer is full.
pub fn action(kind: u8, payload_len: u32) ?[]u8 {
    if (out_count >= 0xffff or out_cap - out_len < rec_hdr or payload_len > out_cap - out_len - rec_hdr) {
        out_full = true;
        return null;
    }
    const r = out[out_len..];
    r[0] = kind;
    r[1] = 0;
    r[2] = 0;
    r[3] = 0;
    putLe32(r[4..], payload_len);
    out_last = out_len;
    out_len += rec_hdr + payload_len;
    out_count += 1;
    return r[rec_hdr .. rec_hdr + payload_len];
}

/// Shrink the last reserved action's payload to `payload_len` (build in place with room
/// to spare, then give back what was not written).
pub fn shrink(payload_len: u32) void {
    const r = out[out_last..];
    const had = le32(r[4..]);
    if (payload_len > had) return;
    putLe32(r[4..], payload_len);
    out_len -= had - payload_len;
}

pub fn log(level: Level, msg: []const u8) void {
    const p = action(act.log, @intCast(1 + msg.len)) orelse return;
    p[0] = @intFromEnum(level);
    @memcpy(p[1..], msg);
}

/// A formatted log line (std.fmt syntax), cut at 240 bytes.
pub fn logf(level: Level, comptime fmt: []const u8, args: anytype) void {
    var buf: [240]u8 = undefined;
    const line = std.fmt.bufPrint(&buf, fmt, args) catch buf[0..];
    log(level, line);
}

/// set_backend_need every time (a packet activator asks for a wake per new flow).
pub fn setNeed(n: Need) void {
    const p = action(act.set_backend_need, 1) orelse return;
    p[0] = @intFromEnum(n);
    need_told = @intFromEnum(n);
}

/// The port's need as a level: sent only when it changes (stream activators call it at
/// the end of every batch with what their streams need).
pub fn need(n: Need) void {
    if (@intFromEnum(n) != need_told) setNeed(n);
}

pub fn decide(packet_id: u32, verdict: Verdict) void {
    const p = action(act.packet_decision, 5) orelse return;
    putLe32(p, packet_id);
    p[4] = @intFromEnum(verdict);
}
pub inline fn hold(packet_id: u32) void {
    decide(packet_id, .hold);
}
pub inline fn drop(packet_id: u32) void {
    decide(packet_id, .drop);
}
pub inline fn pass(packet_id: u32) void {
    decide(packet_id, .pass);
}
pub fn replay(packet_id: u32) void {
    const p = action(act.replay_packet, 4) orelse return;
    putLe32(p, packet_id);
}

/// Add n to the guest's counter `name` (1-32 bytes of [a-z0-9_]; in /metrics as
/// fabric_service_activator_total{counter="name"}).
pub fn count(comptime name: []const u8, n: u32) void {
    comptime std.debug.assert(name.len >= 1 and name.len <= 32);
    const p = action(act.count, 4 + name.len) orelse return;
    putLe32(p, n);
    @memcpy(p[4..], name);
}

fn sidAction(kind: u8, sid: u32) void {
    const p = action(kind, 4) orelse return;
    putLe32(p, sid);
}

fn bytesAction(kind: u8, sid: u32, data: []const u8) bool {
    if (data.len > out_cap) {
        out_full = true;
        return false;
    }
    const p = action(kind, @intCast(4 + data.len)) orelse return false;
    putLe32(p, sid);
    @memcpy(p[4..], data);
    return true;
}

/// Bytes to the client; false when the answer is full (nothing was queued).
pub fn send(sid: u32, data: []const u8) bool {
    return bytesAction(act.downstream_send, sid, data);
}
/// Bytes to the stream's backend connection; false as send.
pub fn upstreamSend(sid: u32, data: []const u8) bool {
    return bytesAction(act.upstream_send, sid, data);
}
/// Room for up to `max` bytes toward the client, written in place; finish with
/// shrink(4 + written). Null when full.
pub fn sendReserve(sid: u32, max: u32) ?[]u8 {
    const p = action(act.downstream_send, 4 + max) orelse return null;
    putLe32(p, sid);
    return p[4..];
}
pub fn upstreamReserve(sid: u32, max: u32) ?[]u8 {
    const p = action(act.upstream_send, 4 + max) orelse return null;
    putLe32(p, sid);
    return p[4..];
}
/// Flush what is queued to the client, then close it.
pub fn close(sid: u32) void {
    sidAction(act.downstream_close, sid);
}
pub fn upstreamClose(sid: u32) void {
    sidAction(act.upstream_close, sid);
}
/// Stop reading from the client (its bytes wait in the kernel).
pub fn pause(sid: u32) void {
    sidAction(act.pause, sid);
}
/// Resume reading from the client (C: fab_resume; `resume` is a Zig keyword).
pub fn unpause(sid: u32) void {
    sidAction(act.@"resume", sid);
}
/// The host relays the stream itself from now on (needs a connected upstream).
pub fn splice(sid: u32) void {
    sidAction(act.splice, sid);
}
/// Connect the stream to a ready backend at `port` (0: the port's target_port);
/// answered by the upstreamResult handler.
pub fn connect(sid: u32, port: u16) void {
    const p = action(act.upstream_connect, 6) orelse return;
    putLe32(p, sid);
    putLe16(p[4..], port);
}

// ------------------------------------------------------------------ config

/// A JSON value (a slice of the config the host passed to init; valid during init only:
/// copy what you keep). std.json also works here over a FixedBufferAllocator, at ~45 KB
/// of code; this reader is a few hundred bytes.
pub const Json = struct {
    s: []const u8,

    fn ws(p: []const u8, start: usize) usize {
        var i = start;
        while (i < p.len and (p[i] == ' ' or p[i] == '\t' or p[i] == '\n' or p[i] == '\r')) i += 1;
        return i;
    }

    /// End (exclusive) of the value starting at i, or null when malformed.
    fn skip(p: []const u8, start: usize) ?usize {
        var i = ws(p, start);
        if (i >= p.len) return null;
        if (p[i] == '"') {
            i += 1;
            while (i < p.len) : (i += 1) {
                if (p[i] == '\\') {
                    i += 1;
                } else if (p[i] == '"') return i + 1;
            }
            return null;
        }
        if (p[i] == '{' or p[i] == '[') {
            var depth: u32 = 0;
            while (i < p.len) : (i += 1) {
                const c = p[i];
                if (c == '"') {
                    i += 1;
                    while (i < p.len and p[i] != '"') : (i += 1) {
                        if (p[i] == '\\') i += 1;
                    }
                    if (i >= p.len) return null;
                } else if (c == '{' or c == '[') {
                    depth += 1;
                    if (depth > 64) return null;
                } else if (c == '}' or c == ']') {
                    depth -= 1;
                    if (depth == 0) return i + 1;
                }
            }
            return null;
        }
        while (i < p.len and p[i] != ',' and p[i] != '}' and p[i] != ']' and p[i] != ' ' and
            p[i] != '\n' and p[i] != '\t' and p[i] != '\r') i += 1;
        return i;
    }

    /// The value of `key` in this object (its top level only), or null.
    pub fn get(self: Json, key: []const u8) ?Json {
        const p = self.s;
        var i = ws(p, 0);
        if (i >= p.len or p[i] != '{') return null;
        i += 1;
        while (true) {
            i = ws(p, i);
            if (i >= p.len or p[i] != '"') return null;
            const ks = i + 1;
            const ke = skip(p, i) orelse return null;
            i = ws(p, ke);
            if (i >= p.len or p[i] != ':') return null;
            const vs = ws(p, i + 1);
            const ve = skip(p, vs) orelse return null;
            if (ke - 1 - ks == key.len and std.mem.eql(u8, p[ks .. ke - 1], key))
                return .{ .s = p[vs..ve] };
            i = ws(p, ve);
            if (i >= p.len or p[i] != ',') return null;
            i += 1;
        }
    }

    /// A non-negative integer up to 2^32-1, else null.
    pub fn asU32(self: Json) ?u32 {
        if (self.s.len == 0) return null;
        var n: u64 = 0;
        for (self.s) |c| {
            if (c < '0' or c > '9') return null;
            n = n * 10 + (c - '0');
            if (n > 0xffff_ffff) return null;
        }
        return @intCast(n);
    }

    /// true/false (or 1/0), else null.
    pub fn asBool(self: Json) ?bool {
        const v = self.s;
        if (std.mem.eql(u8, v, "true") or std.mem.eql(u8, v, "1")) return true;
        if (std.mem.eql(u8, v, "false") or std.mem.eql(u8, v, "0")) return false;
        return null;
    }

    /// A string unescaped into `buf` (\" \\ \/ \n \r \t, \uXXXX below 0x80); null when
    /// not a string or longer than buf.
    pub fn asStr(self: Json, buf: []u8) ?[]u8 {
        const v = self.s;
        if (v.len < 2 or v[0] != '"' or v[v.len - 1] != '"') return null;
        var n: usize = 0;
        var i: usize = 1;
        while (i + 1 < v.len) : (i += 1) {
            var c = v[i];
            if (c == '\\') {
                if (i + 2 >= v.len) return null;
                i += 1;
                c = v[i];
                switch (c) {
                    'n' => c = '\n',
                    'r' => c = '\r',
                    't' => c = '\t',
                    'u' => {
                        if (i + 5 >= v.len) return null;
                        const cp = std.fmt.parseInt(u16, v[i + 1 .. i + 5], 16) catch return null;
                        if (cp >= 0x80) return null;
                        c = @intCast(cp);
                        i += 4;
                    },
                    '"', '\\', '/' => {},
                    else => return null,
                }
            }
            if (n >= buf.len) return null;
            buf[n] = c;
            n += 1;
        }
        return buf[0..n];
    }

    /// The elements of an array: `var it = v.items(); while (it.next()) |e| ...`.
    pub fn items(self: Json) ArrayIter {
        return .{ .s = self.s };
    }

    pub const ArrayIter = struct {
        s: []const u8,
        i: usize = 0,

        pub fn next(self: *ArrayIter) ?Json {
            const p = self.s;
            var i = self.i;
            if (i == 0) {
                i = ws(p, 0);
                if (i >= p.len or p[i] != '[') return null;
                i += 1;
            }
            i = ws(p, i);
            if (i < p.len and p[i] == ',') i = ws(p, i + 1);
            if (i >= p.len or p[i] == ']') return null;
            const e = skip(p, i) orelse return null;
            self.i = e;
            return .{ .s = p[i..e] };
        }
    };

    // Shorthands for a flat config object.
    pub fn getU32(self: Json, key: []const u8, dflt: u32) u32 {
        return if (self.get(key)) |v| v.asU32() orelse dflt else dflt;
    }
    pub fn getBool(self: Json, key: []const u8, dflt: bool) bool {
        return if (self.get(key)) |v| v.asBool() orelse dflt else dflt;
    }
    pub fn getStr(self: Json, key: []const u8, buf: []u8) ?[]u8 {
        return if (self.get(key)) |v| v.asStr(buf) else null;
    }
};

// ------------------------------------------------------------------ the event loop

/// An IPv4 packet the host holds; refer to it by id (hold/drop/pass/replay).
pub const Packet = struct {
    id: u32,
    flow_hash: u32, // the host's hash of the 5-tuple: a hint; compare the tuple yourself
    ip: []const u8, // from the IPv4 header on; valid during the handler only
};

fn initFrom(comptime H: type, cfg: []const u8) i32 {
    now_ms = 0;
    backend_ready = false;
    need_told = nil;
    bad_events = 0;
    out_len = 2;
    out_count = 0;
    if (!@hasDecl(H, "init")) return 0;
    const r = H.init(.{ .s = cfg });
    return switch (@typeInfo(@TypeOf(r))) {
        .void => 0,
        .bool => if (r) 0 else 1,
        .error_union => if (r) |_| 0 else |_| 1,
        else => @compileError("init returns void, bool or anyerror!void"),
    };
}

// A handler is a call of its own, not inlined into the event loop: the loop stays small
// enough for LLVM to keep its state in few locals (inlined, every handler's paths cost
// copies between them on every event: ~25 % more fuel per event, measured).
inline fn call(comptime f: anytype, args: anytype) void {
    @call(.never_inline, f, args);
}

fn processBatch(comptime H: type, e: []const u8) i64 {
    out_len = 2;
    out_count = 0;
    out_full = false;
    if (@hasDecl(H, "batchBegin")) call(H.batchBegin, .{});
    const n_ev: u32 = if (e.len >= 2) le16(e) else 0;
    var off: usize = 2;
    var k: u32 = 0;
    while (k < n_ev) : (k += 1) {
        if (e.len - off < rec_hdr) break;
        const kind = e[off];
        const n = le32(e[off + 4 ..]);
        off += rec_hdr;
        if (n > e.len - off) break;
        const p = e[off .. off + n];
        off += n;
        switch (kind) {
            ev.packet => {
                if (n < 8) {
                    bad_events += 1;
                } else if (@hasDecl(H, "packet")) {
                    call(H.packet, .{Packet{ .id = le32(p), .flow_hash = le32(p[4..]), .ip = p[8..] }});
                }
            },
            ev.tick => {
                if (n < 8) {
                    bad_events += 1;
                } else {
                    now_ms = le64(p);
                    if (@hasDecl(H, "tick")) call(H.tick, .{now_ms});
                }
            },
            ev.backend_available => {
                backend_ready = true;
                if (@hasDecl(H, "backendAvailable")) call(H.backendAvailable, .{});
            },
            ev.backend_unavailable => {
                backend_ready = false;
                if (@hasDecl(H, "backendUnavailable")) call(H.backendUnavailable, .{});
            },
            ev.stream_open => {
                if (n < 6) {
                    bad_events += 1;
                } else if (@hasDecl(H, "streamOpen")) call(H.streamOpen, .{le32(p), le16(p[4..])});
            },
            ev.stream_data => {
                if (n < 4) {
                    bad_events += 1;
                } else if (@hasDecl(H, "streamData")) call(H.streamData, .{le32(p), p[4..]});
            },
            ev.stream_close => {
                if (n < 4) {
                    bad_events += 1;
                } else if (@hasDecl(H, "streamClose")) call(H.streamClose, .{le32(p)});
            },
            ev.upstream_connect_result => {
                if (n < 5) {
                    bad_events += 1;
                } else if (@hasDecl(H, "upstreamResult")) call(H.upstreamResult, .{le32(p), p[4] != 0});
            },
            ev.upstream_data => {
                if (n < 4) {
                    bad_events += 1;
                } else if (@hasDecl(H, "upstreamData")) call(H.upstreamData, .{le32(p), p[4..]});
            },
            ev.upstream_close => {
                if (n < 4) {
                    bad_events += 1;
                } else if (@hasDecl(H, "upstreamClose")) call(H.upstreamClose, .{le32(p)});
            },
            else => {}, // newer hosts may send more kinds
        }
    }
    if (@hasDecl(H, "batchEnd")) call(H.batchEnd, .{});
    putLe16(&out, @intCast(out_count));
    const ptr: u64 = @intFromPtr(&out);
    return @bitCast((ptr << 32) | out_len);
}

/// Define the ABI's exports from the handlers declared in H (`comptime {
/// fab.exportActivator(@This()); }`); `pub const streams = true` in H makes it a stream
/// activator (the fabric terminates the port's TCP and sends bytes).
pub fn exportActivator(comptime H: type) void {
    const S = struct {
        fn abiVersion() callconv(.c) i32 {
            return abi_version;
        }
        fn fabAlloc(size: u32) callconv(.c) u32 {
            return alloc(size);
        }
        fn fabInit(p: [*]const u8, n: u32) callconv(.c) i32 {
            return initFrom(H, p[0..n]);
        }
        fn fabProcess(p: [*]const u8, n: u32) callconv(.c) i64 {
            return processBatch(H, p[0..n]);
        }
        fn fabStreams() callconv(.c) i32 {
            return 1;
        }
    };
    @export(&S.abiVersion, .{ .name = "fab_abi_version" });
    @export(&S.fabAlloc, .{ .name = "fab_alloc" });
    @export(&S.fabInit, .{ .name = "fab_init" });
    @export(&S.fabProcess, .{ .name = "fab_process" });
    if (@hasDecl(H, "streams") and H.streams) @export(&S.fabStreams, .{ .name = "fab_streams" });
}

// ------------------------------------------------------------------ Table

/// State per stream or flow keyed by a u32 (a stream id, or a flow hash with a comparison
/// of your own): items never move (pointers stay valid for their life), a hash index with
/// linear probing and backward-shift deletion finds them in O(1). Capacity is fixed (a
/// power of two); add/insert return null when full, which the activator must answer.
///
///     var conns: fab.Table(Conn, 4096) = .{};
///     const c = conns.add(sid) orelse { fab.close(sid); return; };   zeroed
///     if (conns.get(sid)) |c| ...; conns.del(c);
///     var it: u32 = 0; while (conns.next(&it)) |c| ...   (deleting c is fine)
pub fn Table(comptime T: type, comptime cap: u32) type {
    comptime std.debug.assert(cap > 0 and cap & (cap - 1) == 0);
    return struct {
        const Self = @This();
        const mask: u32 = 2 * cap - 1;

        items: [cap]T = undefined,
        keys: [cap]u32 = undefined,
        index: [2 * cap]u32 = @splat(0), // item + 1; 0 = empty
        slot: [cap]u32 = undefined, // where in index each live item is (del: no probe)
        next_free: [cap]u32 = undefined, // item + 1; 0 = end
        live: [cap]bool = @splat(false),
        free_head: u32 = 0,
        fresh: u32 = 0, // items [fresh, cap) were never used
        len: u32 = 0,

        pub const capacity = cap;

        inline fn home(key: u32) u32 {
            return (key *% 2654435761) & mask;
        }

        pub fn clear(t: *Self) void {
            @memset(&t.index, 0);
            @memset(&t.live, false);
            t.free_head = 0;
            t.fresh = 0;
            t.len = 0;
        }

        pub fn get(t: *Self, key: u32) ?*T {
            var s = home(key);
            while (true) : (s = (s + 1) & mask) {
                const e = t.index[s];
                if (e == 0) return null;
                if (t.keys[e - 1] == key) return &t.items[e - 1];
            }
        }

        /// For keys that may repeat (a flow hash): the first item under `key` for which
        /// eq(item, arg) is true, or null.
        pub fn find(t: *Self, key: u32, arg: anytype, comptime eq: fn (*const T, @TypeOf(arg)) bool) ?*T {
            var s = home(key);
            while (true) : (s = (s + 1) & mask) {
                const e = t.index[s];
                if (e == 0) return null;
                if (t.keys[e - 1] == key and eq(&t.items[e - 1], arg)) return &t.items[e - 1];
            }
        }

        /// A new zeroed item under `key`, even if the key is present (see find); null
        /// when full.
        pub fn insert(t: *Self, key: u32) ?*T {
            var s = home(key);
            while (t.index[s] != 0) s = (s + 1) & mask;
            return t.place(key, s);
        }

        /// add, with the item set to `value` (rather than zeroed, then set).
        pub fn addValue(t: *Self, key: u32, value: T) ?*T {
            var s = home(key);
            while (t.index[s] != 0) : (s = (s + 1) & mask) {
                if (t.keys[t.index[s] - 1] == key) return null;
            }
            const item = t.claim(key, s) orelse return null;
            item.* = value;
            return item;
        }

        fn place(t: *Self, key: u32, s: u32) ?*T {
            const item = t.claim(key, s) orelse return null;
            item.* = std.mem.zeroes(T);
            return item;
        }

        fn claim(t: *Self, key: u32, s: u32) ?*T {
            var i: u32 = undefined;
            if (t.free_head != 0) {
                i = t.free_head - 1;
                t.free_head = t.next_free[i];
            } else if (t.fresh < cap) {
                i = t.fresh;
                t.fresh += 1;
            } else return null;
            t.live[i] = true;
            t.keys[i] = key;
            t.len += 1;
            t.index[s] = i + 1;
            t.slot[i] = s;
            return &t.items[i];
        }

        /// A new zeroed item under a key not present yet; null when full or present
        /// (one probe: the run ends where the new item goes).
        pub fn add(t: *Self, key: u32) ?*T {
            var s = home(key);
            while (t.index[s] != 0) : (s = (s + 1) & mask) {
                if (t.keys[t.index[s] - 1] == key) return null;
            }
            return t.place(key, s);
        }

        /// The item's position (0 .. cap-1), e.g. to index arrays kept beside the table.
        pub fn pos(t: *const Self, item: *const T) u32 {
            return @intCast((@intFromPtr(item) - @intFromPtr(&t.items)) / @sizeOf(T));
        }
        pub fn at(t: *Self, p: u32) *T {
            return &t.items[p];
        }
        pub fn keyOf(t: *const Self, item: *const T) u32 {
            return t.keys[t.pos(item)];
        }

        pub fn del(t: *Self, item: *T) void {
            const i = t.pos(item);
            if (i >= cap or !t.live[i]) return;
            var s = t.slot[i];
            // backward-shift deletion: later entries of the run move into the hole
            var j = (s + 1) & mask;
            while (true) : (j = (j + 1) & mask) {
                const e = t.index[j];
                if (e == 0) break;
                const h = home(t.keys[e - 1]);
                if ((j > s and (h <= s or h > j)) or (j < s and h <= s and h > j)) {
                    t.index[s] = e;
                    t.slot[e - 1] = s;
                    s = j;
                }
            }
            t.index[s] = 0;
            t.live[i] = false;
            t.next_free[i] = t.free_head;
            t.free_head = i + 1;
            t.len -= 1;
        }

        /// Live items in position order; deleting the item returned is allowed.
        pub fn next(t: *Self, it: *u32) ?*T {
            while (it.* < t.fresh) {
                const i = it.*;
                it.* += 1;
                if (t.live[i]) return &t.items[i];
            }
            return null;
        }

        pub fn count(t: *const Self) u32 {
            return t.len;
        }
    };
}

// ------------------------------------------------------------------ Buf, Pool

/// A bounded byte buffer: appends fail instead of growing, so a stalled peer costs at
/// most `cap` bytes.
pub fn Buf(comptime cap: u32) type {
    return struct {
        const Self = @This();
        data: [cap]u8 = undefined,
        len: u32 = 0,

        /// Append all of `bytes`, or none: false when they do not fit.
        pub fn put(b: *Self, bytes: []const u8) bool {
            if (bytes.len > cap - b.len) return false;
            @memcpy(b.data[b.len..][0..bytes.len], bytes);
            b.len += @intCast(bytes.len);
            return true;
        }
        /// Drop the first n bytes (consumed).
        pub fn take(b: *Self, n: u32) void {
            if (n >= b.len) {
                b.len = 0;
                return;
            }
            std.mem.copyForwards(u8, b.data[0 .. b.len - n], b.data[n..b.len]);
            b.len -= n;
        }
        pub fn slice(b: *const Self) []const u8 {
            return b.data[0..b.len];
        }
        pub fn room(b: *const Self) u32 {
            return cap - b.len;
        }
        pub fn clear(b: *Self) void {
            b.len = 0;
        }
    };
}

/// `n` blocks of `size` bytes for buffers only some streams need at a time (a held
/// request): get returns null when all are in use.
pub fn Pool(comptime size: u32, comptime n: u32) type {
    return struct {
        const Self = @This();
        blocks: [n][size]u8 = undefined,
        next_free: [n]u32 = undefined, // block + 1; 0 = end
        free_head: u32 = 0,
        fresh: u32 = 0,
        used: u32 = 0,

        pub fn get(p: *Self) ?*[size]u8 {
            var i: u32 = undefined;
            if (p.free_head != 0) {
                i = p.free_head - 1;
                p.free_head = p.next_free[i];
            } else if (p.fresh < n) {
                i = p.fresh;
                p.fresh += 1;
            } else return null;
            p.used += 1;
            return &p.blocks[i];
        }
        pub fn put(p: *Self, block: *[size]u8) void {
            const i: u32 = @intCast((@intFromPtr(block) - @intFromPtr(&p.blocks)) / size);
            if (i >= n) return;
            p.next_free[i] = p.free_head;
            p.free_head = i + 1;
            p.used -= 1;
        }
    };
}

// ------------------------------------------------------------------ TCP view

/// A read-only view of an IPv4 TCP segment, for packet (L3) activators (fab_tcp.h).
pub const Tcp = struct {
    pub const fin: u8 = 0x01;
    pub const syn: u8 = 0x02;
    pub const rst: u8 = 0x04;
    pub const psh: u8 = 0x08;
    pub const ack_flag: u8 = 0x10;

    src: u32, // addresses as read little-endian: for comparing and hashing only
    dst: u32,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    payload: []const u8,

    /// The view, or null for anything but an unfragmented (or first-fragment) IPv4 TCP
    /// segment with complete headers (best dropped without waking a backend).
    pub fn parse(ip: []const u8) ?Tcp {
        if (ip.len < 20 or ip[0] >> 4 != 4) return null;
        const ihl: usize = @as(usize, ip[0] & 0x0f) * 4;
        if (ihl < 20 or ip.len < ihl + 20 or ip[9] != 6 or be16(ip[6..]) & 0x1fff != 0) return null;
        const t = ip[ihl..];
        var doff: usize = @as(usize, t[12] >> 4) * 4;
        var total: usize = be16(ip[2..]);
        if (total > ip.len or total < ihl) total = ip.len; // trust what arrived
        if (doff < 20 or ihl + doff > total) doff = 20;
        return .{
            .src = le32(ip[12..]),
            .dst = le32(ip[16..]),
            .sport = be16(t),
            .dport = be16(t[2..]),
            .seq = be32(t[4..]),
            .ack = be32(t[8..]),
            .flags = t[13],
            .window = be16(t[14..]),
            .payload = ip[ihl + doff .. @max(total, ihl + doff)],
        };
    }

    /// A SYN that opens a connection (not a SYN-ACK).
    pub fn isSyn(t: Tcp) bool {
        return t.flags & (syn | ack_flag) == syn;
    }
    /// The flow key compared in tables: both ports.
    pub fn ports(t: Tcp) u32 {
        return (@as(u32, t.sport) << 16) | t.dport;
    }
};

// ------------------------------------------------------------------ tests
// `python -m ziglang test activators/sdk/zig/fabricd.zig` (natively: the parts that do
// not need a wasm host; tests/unit/test_sdk_zig.py runs it).

test "Json: keys, numbers, booleans, strings, arrays, malformed" {
    const cfg = Json{ .s = " { \"a\" : 12, \"s\": \"x\\\"y\\u0041\", \"b\": true, \"n\": {\"a\": 1}, \"l\": [1, \"two\", [3]] } " };
    try std.testing.expectEqual(@as(u32, 12), cfg.getU32("a", 0));
    try std.testing.expectEqual(@as(u32, 7), cfg.getU32("missing", 7));
    try std.testing.expect(cfg.getBool("b", false));
    var buf: [16]u8 = undefined;
    try std.testing.expectEqualStrings("x\"yA", cfg.getStr("s", &buf).?);
    try std.testing.expect(cfg.getStr("s", buf[0..2]) == null); // too long for buf
    try std.testing.expectEqual(@as(u32, 5), cfg.getU32("n", 5)); // an object is no number
    var it = cfg.get("l").?.items();
    try std.testing.expectEqualStrings("1", it.next().?.s);
    try std.testing.expectEqualStrings("\"two\"", it.next().?.s);
    try std.testing.expectEqualStrings("[3]", it.next().?.s);
    try std.testing.expect(it.next() == null);
    for ([_][]const u8{ "", "{", "{\"a\"", "{\"a\":", "[", "{\"a\":\"1}", "nonsense" }) |bad| {
        try std.testing.expect((Json{ .s = bad }).get("a") == null);
    }
    try std.testing.expectEqual(@as(?u32, null), (Json{ .s = "4294967296" }).asU32());
}

test "Table: matches a reference map through random adds and deletes" {
    const T = Table(u64, 64);
    const t = try std.testing.allocator.create(T);
    defer std.testing.allocator.destroy(t);
    t.* = .{};
    var ref = std.AutoHashMap(u32, u64).init(std.testing.allocator);
    defer ref.deinit();
    var rng = std.Random.DefaultPrng.init(1);
    const r = rng.random();
    for (0..20000) |step| {
        const key = r.intRangeLessThan(u32, 0, 100) * 64; // colliding homes
        if (r.boolean()) {
            if (t.add(key)) |item| {
                try std.testing.expect(!ref.contains(key));
                item.* = step;
                try ref.put(key, step);
            } else try std.testing.expect(ref.contains(key) or ref.count() == 64);
        } else if (t.get(key)) |item| {
            try std.testing.expectEqual(ref.get(key).?, item.*);
            t.del(item);
            _ = ref.remove(key);
        } else try std.testing.expect(!ref.contains(key));
        try std.testing.expectEqual(ref.count(), t.count());
    }
    var seen: u32 = 0;
    var it: u32 = 0;
    while (t.next(&it)) |item| : (seen += 1) try std.testing.expectEqual(ref.get(t.keyOf(item)).?, item.*);
    try std.testing.expectEqual(t.count(), seen);
}

test "Buf and Pool are bounded" {
    var b: Buf(8) = .{};
    try std.testing.expect(b.put("hello"));
    try std.testing.expect(!b.put("world")); // all or nothing
    b.take(2);
    try std.testing.expectEqualStrings("llo", b.slice());
    var p: Pool(4, 2) = .{};
    const x = p.get().?;
    _ = p.get().?;
    try std.testing.expect(p.get() == null);
    p.put(x);
    try std.testing.expect(p.get() == x);
}

test "Tcp.parse: a SYN, and garbage refused" {
    var pkt: [40]u8 = @splat(0);
    pkt[0] = 0x45;
    putBe16(pkt[2..], 40);
    pkt[9] = 6;
    putBe16(pkt[20..], 40000);
    putBe16(pkt[22..], 80);
    pkt[32] = 0x50;
    pkt[33] = Tcp.syn;
    const t = Tcp.parse(&pkt).?;
    try std.testing.expect(t.isSyn() and t.sport == 40000 and t.dport == 80 and t.payload.len == 0);
    try std.testing.expect(Tcp.parse(pkt[0..30]) == null);
    pkt[9] = 17;
    try std.testing.expect(Tcp.parse(&pkt) == null);
}
