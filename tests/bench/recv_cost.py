"""What one datagram read costs the tunnel's shell: `recvfrom_into` against `recvmmsg`.

`python -m tests.bench.recv_cost`: 20,000 small datagrams queued on a loopback socket,
then read one at a time and 64 at a time (recvmmsg through ctypes, which Python's socket
module lacks); prints microseconds per datagram for each. It answers whether batching
the reads would take a flood's cost off the forwarding thread.
"""

from __future__ import annotations

import ctypes
import socket
import time

N = 64
SIZE = 2048
COUNT = 20000
MSG_DONTWAIT = 0x40


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_Iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.bind(("127.0.0.1", 0))
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    r.setblocking(False)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bufs = [ctypes.create_string_buffer(SIZE) for _ in range(N)]
    names = [ctypes.create_string_buffer(16) for _ in range(N)]
    iovs = (_Iovec * N)(*[_Iovec(ctypes.addressof(b), SIZE) for b in bufs])
    msgs = (_Mmsghdr * N)()
    for i in range(N):
        msgs[i].hdr.name = ctypes.addressof(names[i])
        msgs[i].hdr.iov = ctypes.pointer(iovs[i])
        msgs[i].hdr.iovlen = 1

    def fill() -> None:
        for _ in range(COUNT):
            s.sendto(b"x" * 32, r.getsockname())

    fill()
    buf = bytearray(SIZE)
    t, n = time.perf_counter(), 0
    while True:
        try:
            m, addr = r.recvfrom_into(buf)
        except BlockingIOError:
            break
        bytes(buf[:m])
        n += 1
    single = (time.perf_counter() - t) / max(n, 1) * 1e6
    fill()
    cache: dict[bytes, tuple[str, int]] = {}
    t, k = time.perf_counter(), 0
    while True:
        for i in range(N):
            msgs[i].hdr.namelen = 16
        got = libc.recvmmsg(r.fileno(), msgs, N, MSG_DONTWAIT, None)
        if got <= 0:
            break
        for i in range(got):
            ctypes.string_at(bufs[i], msgs[i].len)
            raw = names[i].raw[2:8]
            if raw not in cache:
                cache[raw] = (socket.inet_ntoa(raw[2:6]), int.from_bytes(raw[:2], "big"))
            k += 1
    batched = (time.perf_counter() - t) / max(k, 1) * 1e6
    print(f"recvfrom_into: {n} datagrams, {single:.2f} us each")
    print(f"recvmmsg x{N}:  {k} datagrams, {batched:.2f} us each ({batched / single:.0%})")


if __name__ == "__main__":
    main()
