"""The gateway's DHCPv4 server core, sans-IO.

Pods that configure themselves by DHCP (VM images usually do) get from the gateway the
address the namespace's table gives them, and nothing else: every binding is static, so
there is no pool, no lease database and no timer. The core takes one request's UDP
payload and a lookup from a client hardware address to its binding (the router answers
only for the MAC the pod table knows for the port the request came in on) and returns
the reply's payload with where it goes (RFC 2131 §4.1), or None; every outcome is a
counter in `counters`.

Messages: DISCOVER -> OFFER; REQUEST -> ACK for the pod's own address (SELECTING,
INIT-REBOOT, RENEWING, REBINDING alike), NAK for any other, silence when it names
another server; INFORM -> ACK with the options only (no address, no lease time);
RELEASE and DECLINE are counted (the address stays the pod's: it is configuration, not
a lease). BOOTP requests (no message type) and relayed ones (giaddr set: no relay sits
between a pod and its gateway) are counted and not answered.

The codec is hand-written and bounded: pyroute2.dhcp's (``dhcp4msg``) logs an error for
every option it cannot decode (one hostile pod would flood the log), turns unknown
message types into exceptions, and has no option overload (52), no RFC 3396 long
options and no domain search (119) encoder; scapy is for tests. Here every length is
checked against the message before it is read, a message is at most MAX_MESSAGE bytes,
repeated options are concatenated (RFC 3396), the overload areas are read once, and a
bad message raises `Malformed` inside `answer`, which counts it and returns None.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from fabric.net.packets import Malformed

# Message types (RFC 2132 §9.6).
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
TYPE_NAMES = {DISCOVER: "discover", REQUEST: "request", DECLINE: "decline",
              RELEASE: "release", INFORM: "inform"}

# Options.
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN = 15
OPT_MTU = 26
OPT_BROADCAST = 28
OPT_REQUESTED_IP = 50
OPT_LEASE = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMS = 55
OPT_MAX_SIZE = 57
OPT_T1 = 58
OPT_T2 = 59
OPT_CLIENT_ID = 61
OPT_SEARCH = 119  # RFC 3397
OPT_END = 255

BOOTREQUEST, BOOTREPLY = 1, 2
HTYPE_ETHER = 1
MAGIC = b"\x63\x82\x53\x63"
FIXED = 236  # the BOOTP header before the magic cookie
OPTIONS_AT = FIXED + 4
SNAME = (44, 108)
FILE = (108, 236)
MAX_MESSAGE = 4096  # a request longer than this is malformed (real ones are < 600 bytes)
MIN_REPLY = 300  # BOOTP's minimum message size: some clients drop shorter replies
MIN_MAX_SIZE = 576  # RFC 2132 §9.10: the smallest maximum message size (IP and UDP in)
IP_UDP = 28
FLAG_BROADCAST = 0x8000
BROADCAST_IP = b"\xff\xff\xff\xff"
ZERO_IP = b"\0\0\0\0"
DEFAULT_LEASE = 86400

COUNTERS = (
    "discover", "request", "decline", "release", "inform",  # requests, by type
    "offer", "ack", "nak",  # replies, by type (an INFORM's answer is an ack)
    "refused_unknown_mac",  # the client hardware address is not the pod's known MAC
    "refused_wrong_address",  # an INFORM from an address that is not the pod's
    "not_for_us",  # a REQUEST naming another server
    "malformed",  # truncated, bad lengths, bad cookie, bad hardware type, unknown type
    "unexpected_type",  # a server's message (OFFER, ACK, NAK) or a BOOTREPLY from a pod
    "bootp",  # no message type: plain BOOTP, not answered
    "relayed",  # giaddr set: not answered
    "options_trimmed",  # replies that left domain options out to fit the client's size
)

_ADDR = struct.Struct("!4s")
_U32 = struct.Struct("!I")

Lookup = Callable[[bytes], "tuple[bytes, str] | None"]


class Reply(NamedTuple):
    """A reply: its UDP payload, the IPv4 destination, and whether it goes to the
    Ethernet broadcast address (else to the client's hardware address)."""

    payload: bytes
    dst: bytes
    broadcast: bool


@dataclass(frozen=True)
class DhcpSettings:
    """What every reply of one namespace says: the server (the gateway, which is also
    the router and the DNS server), the netmask, the MTU, the namespace's DNS zone as
    the domain name and its search list (what resolv.conf gets), the lease time."""

    server: bytes
    netmask: bytes
    broadcast: bytes
    mtu: int
    domain: str
    search: tuple[str, ...]
    lease: int = DEFAULT_LEASE

    @classmethod
    def for_network(cls, cidr: ipaddress.IPv4Network, mtu: int, domain: str,
                    search: tuple[str, ...], lease: int = DEFAULT_LEASE) -> DhcpSettings:
        return cls((cidr.network_address + 1).packed, cidr.netmask.packed,
                   cidr.broadcast_address.packed, mtu, domain, search, lease)


@dataclass
class Request:
    """The parts of a client message the server acts on."""

    head: bytes  # the first 44 bytes: op .. chaddr, copied into the reply
    msg_type: int  # 0 for BOOTP (no option 53)
    flags: int
    ciaddr: bytes
    giaddr: bytes
    chaddr: bytes  # the 6-byte Ethernet address
    options: dict[int, bytes]


def _read_options(data: bytes, start: int, end: int, out: dict[int, bytes]) -> None:
    """Options in data[start:end] into `out`; a repeated option is concatenated (RFC
    3396). Every length is checked before it is used."""
    i = start
    while i < end:
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return
        if i + 1 >= end:
            raise Malformed(f"option {code} has no length")
        j = i + 2 + data[i + 1]
        if j > end:
            raise Malformed(f"option {code} runs past its area")
        value = data[i + 2:j]
        prev = out.get(code)
        out[code] = value if prev is None else prev + value
        i = j


def parse(data: bytes) -> Request:
    """A client message, or Malformed."""
    n = len(data)
    if n < OPTIONS_AT:
        raise Malformed(f"{n} bytes: shorter than a DHCP message")
    if n > MAX_MESSAGE:
        raise Malformed(f"{n} bytes: longer than {MAX_MESSAGE}")
    if data[FIXED:OPTIONS_AT] != MAGIC:
        raise Malformed("no DHCP magic cookie")
    if data[1] != HTYPE_ETHER or data[2] != 6:
        raise Malformed(f"hardware type {data[1]}, length {data[2]}: not Ethernet")
    options: dict[int, bytes] = {}
    _read_options(data, OPTIONS_AT, n, options)
    over = options.get(OPT_OVERLOAD)
    if over is not None:
        if len(over) != 1 or not 1 <= over[0] <= 3:
            raise Malformed("bad option overload")
        # RFC 3396: the options field, then file, then sname; overloads in them are ignored.
        extra: dict[int, bytes] = {}
        if over[0] & 1:
            _read_options(data, FILE[0], FILE[1], extra)
        if over[0] & 2:
            _read_options(data, SNAME[0], SNAME[1], extra)
        for code, value in extra.items():
            if code != OPT_OVERLOAD:
                options[code] = options.get(code, b"") + value
    mt = options.get(OPT_MESSAGE_TYPE)
    if mt is not None and len(mt) != 1:
        raise Malformed(f"message type of length {len(mt)}")
    for code in (OPT_REQUESTED_IP, OPT_SERVER_ID):
        v = options.get(code)
        if v is not None and len(v) != 4:
            raise Malformed(f"option {code} of length {len(v)}, not 4")
    ms = options.get(OPT_MAX_SIZE)
    if ms is not None and len(ms) != 2:
        raise Malformed(f"maximum message size of length {len(ms)}, not 2")
    return Request(bytes(data[:44]), mt[0] if mt is not None else 0,
                   data[10] << 8 | data[11], bytes(data[12:16]), bytes(data[24:28]),
                   bytes(data[28:34]), options)


def _put(out: bytearray, code: int, value: bytes) -> None:
    """An option; longer than 255 bytes it is split into several (RFC 3396)."""
    if not value:
        out += bytes((code, 0))
        return
    for i in range(0, len(value), 255):
        chunk = value[i:i + 255]
        out += bytes((code, len(chunk)))
        out += chunk


def encode_names(names: tuple[str, ...]) -> bytes:
    """Domain names in DNS wire form, uncompressed (RFC 3397 allows either)."""
    out = bytearray()
    for name in names:
        for label in name.rstrip(".").split("."):
            if label:
                raw = label.encode("ascii")
                out += bytes((len(raw),)) + raw
        out += b"\0"
    return bytes(out)


class DhcpCore:
    """One namespace's DHCP answers (see the module docstring)."""

    def __init__(self, settings: DhcpSettings) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.reconfigure(settings)

    def reconfigure(self, settings: DhcpSettings) -> None:
        """New settings (a changed zone or lease time), counters kept."""
        self.settings = s = settings
        common = bytearray()
        _put(common, OPT_SUBNET_MASK, s.netmask)
        _put(common, OPT_ROUTER, s.server)
        _put(common, OPT_DNS, s.server)
        _put(common, OPT_BROADCAST, s.broadcast)
        _put(common, OPT_MTU, struct.pack("!H", s.mtu))
        self._common = bytes(common)
        lease = bytearray()
        _put(lease, OPT_LEASE, _U32.pack(s.lease))
        _put(lease, OPT_T1, _U32.pack(s.lease // 2))
        _put(lease, OPT_T2, _U32.pack(s.lease * 7 // 8))
        self._lease = bytes(lease)
        dom = bytearray()
        _put(dom, OPT_DOMAIN, s.domain.encode("ascii"))
        self._domain = bytes(dom)
        search = bytearray()
        if s.search:
            _put(search, OPT_SEARCH, encode_names(s.search))
        self._search = bytes(search)

    def answer(self, data: bytes, lookup: Lookup) -> Reply | None:
        """The reply to one client message (its UDP payload), or None; always counted."""
        c = self.counters
        try:
            if len(data) > 0 and data[0] != BOOTREQUEST:
                c["unexpected_type"] += 1
                return None
            req = parse(data)
        except Malformed:
            c["malformed"] += 1
            return None
        t = req.msg_type
        if t == 0:
            c["bootp"] += 1
            return None
        name = TYPE_NAMES.get(t)
        if name is None:
            c["unexpected_type" if t in (OFFER, ACK, NAK) else "malformed"] += 1
            return None
        c[name] += 1
        if req.giaddr != ZERO_IP:
            c["relayed"] += 1
            return None
        binding = lookup(req.chaddr)
        if binding is None:
            c["refused_unknown_mac"] += 1
            return None
        ip = binding[0]
        opts = req.options
        server = self.settings.server
        if t == DISCOVER:
            return self._reply(req, OFFER, ip, binding[1])
        if t == REQUEST:
            sid = opts.get(OPT_SERVER_ID)
            if sid is not None and sid != server:
                c["not_for_us"] += 1
                return None
            want = opts.get(OPT_REQUESTED_IP)
            if want is None:
                want = req.ciaddr if req.ciaddr != ZERO_IP else None
            if want is None:
                c["malformed"] += 1  # a REQUEST that asks for nothing
                return None
            if want != ip:
                return self._nak(req)
            return self._reply(req, ACK, ip, binding[1])
        if t == INFORM:
            if req.ciaddr != ip:
                c["refused_wrong_address"] += 1
                return None
            return self._reply(req, ACK, ZERO_IP, binding[1], inform=True)
        return None  # RELEASE, DECLINE: counted above; the binding is configuration

    def _header(self, req: Request, yiaddr: bytes, ciaddr: bytes) -> bytearray:
        out = bytearray(OPTIONS_AT)
        out[:44] = req.head
        out[0] = BOOTREPLY
        out[3] = 0  # hops
        out[8:10] = b"\0\0"  # secs
        out[12:16] = ciaddr
        out[16:20] = yiaddr
        out[20:24] = ZERO_IP  # siaddr: no next server
        out[FIXED:OPTIONS_AT] = MAGIC
        return out

    def _tail(self, out: bytearray, req: Request) -> bytes:
        cid = req.options.get(OPT_CLIENT_ID)
        if cid is not None:  # RFC 6842: echoed
            _put(out, OPT_CLIENT_ID, cid)
        out.append(OPT_END)
        if len(out) < MIN_REPLY:
            out += bytes(MIN_REPLY - len(out))
        return bytes(out)

    def _nak(self, req: Request) -> Reply:
        self.counters["nak"] += 1
        out = self._header(req, ZERO_IP, ZERO_IP)
        _put(out, OPT_MESSAGE_TYPE, bytes((NAK,)))
        _put(out, OPT_SERVER_ID, self.settings.server)
        return Reply(self._tail(out, req), BROADCAST_IP, True)

    def _reply(self, req: Request, t: int, yiaddr: bytes, hostname: str,
               inform: bool = False) -> Reply:
        s = self.settings
        out = self._header(req, yiaddr, req.ciaddr if t == ACK else ZERO_IP)
        _put(out, OPT_MESSAGE_TYPE, bytes((t,)))
        _put(out, OPT_SERVER_ID, s.server)
        if not inform:  # RFC 2131 §3.4: no lease time in an INFORM's ACK
            out += self._lease
        out += self._common
        # What may be left out to fit the client's maximum message size, least useful first.
        optional = [self._search, self._domain]
        params = req.options.get(OPT_PARAMS, b"")
        if OPT_HOSTNAME in params and hostname:
            host = bytearray()
            _put(host, OPT_HOSTNAME, hostname.encode("ascii", "replace"))
            optional.append(bytes(host))
        ms = req.options.get(OPT_MAX_SIZE)
        limit = max(MIN_MAX_SIZE, ms[0] << 8 | ms[1] if ms is not None else 0)
        limit = min(limit, max(MIN_MAX_SIZE, s.mtu)) - IP_UDP
        cid = req.options.get(OPT_CLIENT_ID)
        fixed = len(out) + 1 + (len(cid) + 2 * (len(cid) // 255 + 1) if cid is not None else 0)
        size = fixed + sum(len(o) for o in optional)
        trimmed = False
        while optional and size > limit:
            size -= len(optional.pop(0))
            trimmed = True
        if trimmed:
            self.counters["options_trimmed"] += 1
        for o in optional:
            out += o
        self.counters["offer" if t == OFFER else "ack"] += 1
        payload = self._tail(out, req)
        if req.ciaddr != ZERO_IP:
            return Reply(payload, req.ciaddr, False)
        if req.flags & FLAG_BROADCAST:
            return Reply(payload, BROADCAST_IP, True)
        return Reply(payload, yiaddr, False)
