"""Hostile clients of a stream port (the e2e campaign tests/e2e/test_hostile_streams.py),
run inside a test namespace: `python -m tests.support.hostile_streams ATTACK --host IP
--port N [...]`. Each attack is bounded by a count and a time, and prints one JSON line
of what it did and what the server answered (so the test can check the daemon, not the
attacker).

Attacks on any port: `garbage` (random bytes, some connections reset), `slowloris` (one
byte a second on many connections), `idle` (N connections opened and held), `noread` (a
request for a large answer, never read), `halfclose` (a partial request, then FIN, never
read), `reset` (an opening message, then RST while it is held). Protocol ones: `h2`
(bad frame lengths, HPACK bomb, CONTINUATION / SETTINGS / PING / RST floods, a zero
window) and `pg` (huge lengths, startup floods, random CancelRequests, SSLRequest then
garbage).
"""

from __future__ import annotations

import argparse
import json
import random
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tests.support import pgwire as W

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
CANCEL_CODE = 80877102


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def connect(host: str, port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def rst_close(s: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0)."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    s.close()


def drain(s: socket.socket, seconds: float, limit: int = 1 << 20,
          stop: Callable[[bytes], bool] | None = None) -> tuple[bytes, bool]:
    """What the server sends within `seconds` (at most `limit` bytes, or until `stop` says
    enough), and whether it closed (EOF or reset)."""
    s.settimeout(0.2)
    got = bytearray()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(got) < limit:
        try:
            b = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return bytes(got), True
        if not b:
            return bytes(got), True
        got += b
        if stop is not None and stop(bytes(got)):
            break
    return bytes(got), False


def goaway_seen(data: bytes) -> bool:
    return bool(goaway_codes(data))


def opener(proto: str) -> bytes:
    """A well-formed first message of the protocol (what a held connection sends)."""
    if proto == "pg":
        return W.startup()
    if proto == "http1":
        return b"GET /work HTTP/1.1\r\nHost: svc\r\n\r\n"
    if proto == "h2":
        return H2_PREFACE + h2_frame(4, 0, 0) + h2_headers(1, end_stream=True)
    return b"hello\n"


# --- HTTP/2 frames ------------------------------------------------------------------------


def h2_frame(kind: int, flags: int, sid: int, payload: bytes = b"",
             length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack("!I", n)[1:] + bytes([kind, flags]) + struct.pack("!I", sid) + payload


def h2_headers(sid: int, *, end_stream: bool = False, end_headers: bool = True,
               path: bytes = b"/") -> bytes:
    # :method GET (2), :scheme http (6), :path literal (4, not indexed), :authority svc
    block = bytes([0x82, 0x86]) + bytes([0x04, len(path)]) + path + b"\x01\x03svc"
    return h2_frame(1, (1 if end_stream else 0) | (4 if end_headers else 0), sid, block)


def h2_settings(pairs: Sequence[tuple[int, int]] = ()) -> bytes:
    return h2_frame(4, 0, 0, b"".join(struct.pack("!HI", k, v) for k, v in pairs))


def h2_cases(rng: random.Random) -> list[tuple[str, bytes]]:
    """(name, bytes after the preface and an empty SETTINGS) of each h2 attack."""
    hello = h2_settings()
    # A literal with incremental indexing of a 4 KiB value (its length an HPACK integer
    # with a 7-bit prefix: 127, then 3873 in two bytes), then one-byte references to it
    # (index 62): the HPACK bomb, 8,000 references in one 12 KB block.
    n = 4000 - 127
    bomb_block = (bytes([0x82, 0x86, 0x84]) + b"\x01\x03svc" + b"\x40\x01b\x7f"
                  + bytes([0x80 | (n & 0x7F), n >> 7]) + b"x" * 4000 + b"\xbe" * 8000)
    cases = [
        ("bad_length", h2_frame(0, 0, 1, b"x" * 20, length=0xFFFFFF)),
        ("short_settings", h2_frame(4, 0, 0, b"\x00\x01\x00")),
        ("bomb", hello + h2_frame(1, 5, 1, bomb_block)),
        ("continuation_flood", h2_headers(1, end_headers=False)
         + h2_frame(9, 0, 1) * 20000),
        ("settings_flood", h2_settings([(4, 65535)]) * 20000),
        ("ping_flood", h2_frame(6, 0, 0, b"pingpong") * 30000),
        ("rapid_reset", b"".join(h2_headers(2 * i + 1, end_stream=True)
                                 + h2_frame(3, 0, 2 * i + 1, struct.pack("!I", 8))
                                 for i in range(4000))),
        ("window_update_zero", h2_headers(1) + h2_frame(8, 0, 1, b"\0\0\0\0") * 3000),
        ("random_frames", b"".join(h2_frame(rng.randrange(12), rng.randrange(256),
                                            rng.randrange(8),
                                            rng.randbytes(rng.randrange(64)))
                                   for _ in range(3000))),
        ("truncated", h2_headers(1)[:7]),
    ]
    return cases


def attack_h2(a: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Each h2 case on its own connection, the client not reading while it sends; then
    what the server answered (the last frames: a GOAWAY expected) within a second."""
    out: dict[str, Any] = {}
    for name, data in h2_cases(rng):
        try:
            s = connect(a.host, a.port)
            s.settimeout(10)
            s.sendall(H2_PREFACE + h2_settings())
            sent = 0
            try:
                for i in range(0, len(data), 65536):
                    s.sendall(data[i:i + 65536])
                    sent = i + 65536
            except OSError:
                pass
            got, closed = drain(s, 1.0, 4 << 20, stop=goaway_seen)
            kinds = frame_kinds(got)
            out[name] = {"sent": min(sent, len(data)), "got": len(got), "closed": closed,
                         "goaway": goaway_codes(got), "frames": kinds}
            rst_close(s)
        except OSError as e:
            out[name] = {"error": str(e)}
    # A zero window: the client announces INITIAL_WINDOW_SIZE 0 and asks for a large
    # answer, and never opens the window; after a while it goes away.
    try:
        s = connect(a.host, a.port)
        s.sendall(H2_PREFACE + h2_settings([(4, 0)]) + h2_headers(1, end_stream=True,
                                                                  path=a.path.encode()))
        got, closed = drain(s, 2.0)
        out["zero_window"] = {"got": len(got), "closed": closed, "frames": frame_kinds(got)}
        rst_close(s)
    except OSError as e:
        out["zero_window"] = {"error": str(e)}
    return out


def frame_kinds(data: bytes) -> dict[str, int]:
    kinds: dict[str, int] = {}
    i = 0
    while len(data) - i >= 9:
        n = int.from_bytes(data[i:i + 3], "big")
        k = str(data[i + 3])
        kinds[k] = kinds.get(k, 0) + 1
        i += 9 + n
    return kinds


def goaway_codes(data: bytes) -> list[int]:
    codes = []
    i = 0
    while len(data) - i >= 9:
        n = int.from_bytes(data[i:i + 3], "big")
        if data[i + 3] == 7 and n >= 8 and len(data) - i >= 17:
            codes.append(int.from_bytes(data[i + 13:i + 17], "big"))
        i += 9 + n
    return codes


# --- PostgreSQL -----------------------------------------------------------------------------


def pg_cases(rng: random.Random) -> list[tuple[str, bytes, bool]]:
    """(name, bytes, after a real startup?) of each PostgreSQL attack."""
    cases = [
        ("huge_query_length", b"Q" + struct.pack("!I", 0x7FFFFFF0) + b"x" * 1000, True),
        ("huge_short_type", b"S" + struct.pack("!I", 100000), True),
        ("negative_length", b"Q" + struct.pack("!i", -5), True),
        ("unknown_type", W.msg(b"\x01", b"zz"), True),
        ("huge_startup", struct.pack("!i", 0x7FFFFFFF) + b"\0\3\0\0", False),
        ("tiny_startup", struct.pack("!i", 4), False),
        ("bad_version", struct.pack("!ii", 16, 0x00040000) + b"user\0x\0\0", False),
        ("no_user", struct.pack("!ii", 9, 0x00030000) + b"\0", False),
        ("ssl_then_garbage", SSL_REQUEST + rng.randbytes(2000), False),
        ("random", rng.randbytes(4096), False),
    ]
    return cases


def attack_pg(a: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, data, after_startup in pg_cases(rng):
        if after_startup and a.no_session:
            continue
        try:
            s = connect(a.host, a.port)
            if after_startup:
                s.sendall(W.startup())
                greet, closed = drain_until(s, b"Z\0\0\0\5I", a.wait)
                if closed or not greet:
                    out[name] = {"startup": "failed", "got": len(greet)}
                    rst_close(s)
                    continue
            try:
                s.sendall(data)
            except OSError:
                pass
            got, closed = drain(s, a.wait)
            out[name] = {"got": len(got), "closed": closed, "first": got[:1].decode("latin1"),
                         "fatal": b"SFATAL" in got}
            s.close()
        except OSError as e:
            out[name] = {"error": str(e)}
    # A startup flood: many connections, each a startup packet of random bytes or a
    # CancelRequest with a random key, closed at once.
    flood = {"cancels": 0, "startups": 0, "errors": 0}
    for i in range(a.count):
        try:
            s = connect(a.host, a.port)
            if i % 2:
                s.sendall(struct.pack("!iiii", 16, CANCEL_CODE, rng.getrandbits(31),
                                      rng.getrandbits(31)))
                flood["cancels"] += 1
            else:
                body = rng.randbytes(rng.randrange(0, 64))
                s.sendall(struct.pack("!i", len(body) + 8) + struct.pack("!i", 0x30000) + body)
                flood["startups"] += 1
            if i % 3 == 0:
                rst_close(s)
            else:
                s.close()
        except OSError:
            flood["errors"] += 1
    out["flood"] = flood
    return out


def drain_until(s: socket.socket, marker: bytes, seconds: float) -> tuple[bytes, bool]:
    s.settimeout(0.2)
    got = bytearray()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and marker not in got:
        try:
            b = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return bytes(got), True
        if not b:
            return bytes(got), True
        got += b
    return bytes(got), False


# --- HTTP/1 -------------------------------------------------------------------------------

HTTP1_BAD = [
    ("cl_and_te", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b" 400 "),
    ("no_host", b"GET / HTTP/1.1\r\n\r\n", b" 400 "),
    ("two_hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b" 400 "),
    ("bad_version", b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", b" 505 "),
    ("space_before_colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", b" 400 "),
    ("folding", b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n  2\r\n\r\n", b" 400 "),
    ("bad_cl", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", b" 400 "),
    ("bad_te", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", b" 501 "),
    ("huge_head", b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b" 431 "),
    ("connect", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", b" 501 "),
    ("control_in_value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", b" 400 "),
]


def attack_http1(a: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Each malformed request on its own connection: the status line answered."""
    out: dict[str, Any] = {}
    for name, data, want in HTTP1_BAD:
        try:
            s = connect(a.host, a.port)
            try:
                s.sendall(data)
            except OSError:
                pass
            got, closed = drain_until(s, b"\r\n\r\n", a.wait)
            line = got.split(b"\r\n", 1)[0]
            out[name] = {"status": line.decode("latin1"), "ok": want in line + b" "}
            s.close()
        except OSError as e:
            out[name] = {"error": str(e), "ok": False}
    return out


# --- any protocol --------------------------------------------------------------------------


def attack_garbage(a: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """`count` connections, each random bytes (mutated openers too), half closed with a
    reset; the last few wait for what the server says."""
    stats = {"conns": 0, "bytes": 0, "errors": 0, "closed_by_server": 0}
    base = opener(a.proto)
    for i in range(a.count):
        try:
            s = connect(a.host, a.port)
        except OSError:
            stats["errors"] += 1
            continue
        stats["conns"] += 1
        if i % 3 == 0:
            data = rng.randbytes(rng.choice((1, 7, 100, 4096, 65536)))
        else:
            b = bytearray(base)
            for _ in range(rng.randrange(1, 8)):
                j = rng.randrange(len(b))
                b[j] = rng.randrange(256)
            data = bytes(b[:rng.randrange(1, len(b) + 1)]) + rng.randbytes(rng.randrange(64))
        try:
            s.sendall(data)
            stats["bytes"] += len(data)
        except OSError:
            pass
        if i >= a.count - 2:
            _, closed = drain(s, 0.5)
            stats["closed_by_server"] += closed
        if i % 2:
            rst_close(s)
        else:
            s.close()
    return stats


def hold_many(a: argparse.Namespace, n: int, step: Callable[[socket.socket, int], None] | None,
              prefix: bytes = b"") -> dict[str, Any]:
    """Open `n` connections (non-blocking, paced a little), send `prefix` on each, then for
    `seconds`: call `step` on each once a second; count those the server closed."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    failed = 0
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((a.host, a.port))
        except BlockingIOError:
            pass
        except OSError:
            failed += 1
            s.close()
            continue
        socks.append(s)
    # Wait for the connects.
    deadline = time.monotonic() + 10
    pending = set(range(len(socks)))
    connected = 0
    while pending and time.monotonic() < deadline:
        for i in list(pending):
            err = socks[i].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            try:
                socks[i].getpeername()
                pending.discard(i)
                connected += 1
            except OSError:
                if err:
                    pending.discard(i)
                    failed += 1
        time.sleep(0.05)
    alive = [s for s in socks if _connected(s)]
    for s in alive:
        try:
            if prefix:
                s.send(prefix)
        except OSError:
            pass
        sel.register(s, selectors.EVENT_READ)
    closed: set[int] = set()
    got = 0
    t_end = time.monotonic() + a.seconds
    tick = 0
    while time.monotonic() < t_end:
        for key, _ in sel.select(0.2):
            s = key.fileobj  # type: ignore[assignment]
            try:
                b = s.recv(65536)  # type: ignore[union-attr]
            except OSError:
                b = b""
            got += len(b)
            if not b:
                closed.add(s.fileno())  # type: ignore[union-attr]
                sel.unregister(s)
        if step is not None and time.monotonic() >= tick:
            tick = time.monotonic() + 1.0
            for i, s in enumerate(alive):
                if s.fileno() not in closed:
                    try:
                        step(s, i)
                    except OSError:
                        closed.add(s.fileno())
    for s in socks:
        rst_close(s) if a.reset else s.close()
    return {"asked": n, "connected": len(alive), "failed": failed, "closed_by_server": len(closed),
            "bytes_from_server": got}


def _connected(s: socket.socket) -> bool:
    try:
        s.getpeername()
        return True
    except OSError:
        return False


def attack_slowloris(a: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    base = opener(a.proto)

    def step(s: socket.socket, i: int) -> None:
        s.send(bytes([base[rng.randrange(len(base))]]))
    return hold_many(a, a.count, step)


def attack_idle(a: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    return hold_many(a, a.count, None)


def attack_halfclose(a: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Partial openers then FIN, never reading."""
    base = opener(a.proto)
    socks = []
    for _ in range(a.count):
        try:
            s = connect(a.host, a.port)
            s.sendall(base[:max(1, len(base) // 2)])
            s.shutdown(socket.SHUT_WR)
            socks.append(s)
        except OSError:
            pass
    time.sleep(a.seconds)
    closed = 0
    for s in socks:
        _, c = drain(s, 0.05)
        closed += c
        s.close()
    return {"conns": len(socks), "closed_by_server": closed}


def attack_reset(a: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Connections that send their opener and are reset while it is held."""
    n = 0
    for i in range(a.count):
        try:
            s = connect(a.host, a.port)
            s.sendall(opener(a.proto))
            if i % 2:
                time.sleep(0.01)
            rst_close(s)
            n += 1
        except OSError:
            pass
    return {"reset": n}


def attack_noread(a: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Ask for a large answer and read none of it for `seconds`; then read a little to
    see the connection still stands (or was closed)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect((a.host, a.port))
    sent = 0
    if a.proto == "pg":
        s.sendall(W.startup())
        drain_until(s, b"Z\0\0\0\5I", a.wait)
        s.sendall(W.query("select repeat('x', 100000) from generate_series(1, 2000)"))
    elif a.proto == "http1":
        s.sendall(f"GET {a.path} HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
    else:  # echo: push bytes, never read the echo
        s.settimeout(3)
        chunk = b"x" * 65536
        try:
            while sent < 64 << 20:
                sent += s.send(chunk)
        except (TimeoutError, OSError):
            pass
    time.sleep(a.seconds)
    got, closed = drain(s, 0.5, 1 << 16)
    rst_close(s)
    return {"sent": sent, "got_after": len(got), "closed": closed}


ATTACKS: dict[str, Callable[[argparse.Namespace, random.Random], dict[str, Any]]] = {
    "garbage": attack_garbage, "slowloris": attack_slowloris, "idle": attack_idle,
    "halfclose": attack_halfclose, "reset": attack_reset, "noread": attack_noread,
    "h2": attack_h2, "pg": attack_pg, "http1": attack_http1,
}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.hostile_streams")
    ap.add_argument("attack", choices=sorted(ATTACKS))
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--proto", default="raw", choices=("raw", "http1", "h2", "pg"))
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--wait", type=float, default=1.0, help="seconds to wait for answers")
    ap.add_argument("--path", default="/bytes/50000000")
    ap.add_argument("--reset", action="store_true", help="end held connections with RST")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-session", action="store_true",
                    help="pg: skip the attacks made inside a session (no backend)")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    res = ATTACKS[a.attack](a, random.Random(a.seed))
    res["seconds"] = round(time.monotonic() - t0, 2)
    say({"attack": a.attack, **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
