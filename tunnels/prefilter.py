"""A kernel pre-filter for the tunnel's UDP socket (classic BPF), and when to tighten it.

Every datagram the daemon reads costs the data-plane thread a few microseconds even when
it is dropped at once, so a flood that reaches userspace takes its share of forwarding.
Two programs keep floods in the kernel:

- *shape*, always attached: a datagram passes only if it can be a tunnel message by its
  header and length (type 1, 2 or 3 with the reserved bytes zero and a multiple of that
  type's size, for UDP GRO batches; type 4 of at least 32 bytes). Empty datagrams and
  random garbage never wake the daemon.
- *shed*, attached while a handshake flood lasts (``Shedding`` says when): shape, and
  handshake messages (types 1-3) only from the addresses of configured peers. Once the
  unknown-source handshake budget is exhausted the daemon would drop those anyway; the
  kernel now drops them before anyone reads them. Data messages always pass (a roaming
  peer's data proves its new address).

What the filters drop the kernel counts in the socket's drop counter (``SO_MEMINFO``),
which the link reports as ``kernel_drops`` together with receive-buffer overflows.

Offsets: a UDP socket filter sees the skb from the UDP header (8 bytes) on, and ``len``
includes that header; the IPv4 header is reached through ``SKF_NET_OFF``.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Iterable

SO_ATTACH_FILTER = 26
SO_MEMINFO = 55
SK_MEMINFO_VARS = 9
SK_MEMINFO_DROPS = 8
SKF_NET_OFF = -0x100000
UDP_HDR = 8
ACCEPT = 0xFFFFFFFF
MAX_EXEMPT = 1024  # two instructions each; cBPF programs stop at 4096

# Tunnel message sizes (see tunnels.messages): handshake types are fixed, data has a floor.
SIZES = {1: 148, 2: 92, 3: 64}
DATA_MIN = 32

# Classic BPF opcodes (linux/filter.h).
LD_W_ABS = 0x20
LD_W_LEN = 0x80
LD_IMM = 0x00
TAX = 0x07
TXA = 0x87
ALU_SUB_K = 0x14
ALU_MOD_K = 0x94
JEQ_K = 0x15
JGE_K = 0x35
RET_K = 0x06

Insn = tuple[int, int, int, int]  # code, jt, jf, k


class _Asm:
    """Straight-line cBPF with forward jumps to labels (resolved at the end)."""

    def __init__(self) -> None:
        self.code: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0, jt: str | int = 0, jf: str | int = 0) -> None:
        self.code.append((code, jt, jf, k & 0xFFFFFFFF))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def resolve(self) -> list[Insn]:
        out: list[Insn] = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            rel = []
            for j in (jt, jf):
                d = j if isinstance(j, int) else self.labels[j] - i - 1
                if not 0 <= d <= 255:
                    raise ValueError(f"cBPF jump of {d} at {i}")
                rel.append(d)
            out.append((code, rel[0], rel[1], k))
        return out


def program(exempt: Iterable[str] | None = None) -> list[Insn]:
    """The shape program, or with ``exempt`` (IPv4 addresses) the shed program."""
    a = _Asm()
    a.op(LD_W_LEN)
    a.op(JGE_K, UDP_HDR + DATA_MIN, 0, "drop")
    a.op(TAX)
    a.op(LD_W_ABS, UDP_HDR)  # type and the three reserved bytes, big-endian
    a.op(JEQ_K, 4 << 24, "accept", 0)
    for kind in SIZES:
        a.op(JEQ_K, kind << 24, f"t{kind}", 0)
    a.op(RET_K, 0)
    for kind, size in SIZES.items():
        a.label(f"t{kind}")
        a.op(TXA)
        a.op(ALU_SUB_K, UDP_HDR)
        a.op(ALU_MOD_K, size)
        a.op(JEQ_K, 0, "handshake", "drop")
    a.label("accept")
    a.op(RET_K, ACCEPT)
    a.label("drop")
    a.op(RET_K, 0)
    a.label("handshake")
    if exempt is None:
        a.op(RET_K, ACCEPT)
    else:
        ips = sorted({struct.unpack("!I", socket.inet_aton(ip))[0] for ip in exempt})
        if len(ips) > MAX_EXEMPT:
            raise ValueError(f"at most {MAX_EXEMPT} peer addresses fit a shed filter")
        a.op(LD_W_ABS, SKF_NET_OFF + 12)  # IPv4 source address
        for ip in ips:
            a.op(JEQ_K, ip, 0, 1)
            a.op(RET_K, ACCEPT)
        a.op(RET_K, 0)
    return a.resolve()


def attach(sock: socket.socket, insns: list[Insn]) -> None:
    """Replace the socket's filter (the kernel copies the program; nothing to keep)."""
    raw = b"".join(struct.pack("HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(raw, len(raw))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    struct.pack("HL", len(insns), ctypes.addressof(buf)))


def kernel_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped for this socket (filtered or buffer full); None where
    the kernel does not say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
    except OSError:
        return None
    return struct.unpack_from("I", raw, 4 * SK_MEMINFO_DROPS)[0]


class Shedding:
    """When to tighten the filter (sans-IO: counts and ``now`` in, decisions out).

    A flood is ``trigger`` handshake messages over the unknown-source budget within one
    second. Shedding then lasts ``base`` seconds; it is lifted to look again (the filter
    hides the flood from us), and a flood found again within the last window doubles the
    next one, up to ``longest``: a lasting flood costs a look every ``longest`` seconds,
    while a legitimate roaming peer waits at most one window for its next retry."""

    def __init__(self, trigger: int = 100, base: float = 1.0, longest: float = 8.0) -> None:
        self.trigger = trigger
        self.base = base
        self.longest = longest
        self.until: float | None = None  # shedding until then
        self.window = base
        self.episodes = 0  # floods seen (a re-shed within a window is the same one)
        self._mark = (float("-inf"), 0)  # (second started, over-budget count then)
        self._lifted = float("-inf")
        self._in_episode = False

    def observe(self, over_budget: int, now: float) -> bool:
        """Told the over-budget total; True when shedding should start now."""
        if self.until is not None:
            return False
        t0, c0 = self._mark
        if now - t0 >= 1.0 or over_budget < c0:
            self._mark = (now, over_budget)
            return False
        if over_budget - c0 < self.trigger:
            return False
        if self._in_episode:
            self.window = min(self.longest, self.window * 2)
        else:
            self.window = self.base
            self.episodes += 1
            self._in_episode = True
        self.until = now + self.window
        return True

    def expired(self, now: float) -> bool:
        """True (once) when the current shedding should be lifted."""
        if self.until is None or now < self.until:
            return False
        self.until = None
        self._lifted = now
        self._mark = (float("-inf"), 0)  # count afresh from the next look
        return True

    def next_timer(self) -> float | None:
        """When ``expired`` or ``over`` has something to say."""
        if self.until is not None:
            return self.until
        if self._in_episode:
            return self._lifted + self.window
        return None

    def over(self, now: float) -> bool:
        """True (once) when a flood ended: a whole window passed since the last lift
        without finding it again."""
        if not self._in_episode or self.until is not None or now - self._lifted <= self.window:
            return False
        self._in_episode = False
        self.window = self.base
        return True

