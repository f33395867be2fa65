"""The per-namespace router: a static IP -> port table with proxy ARP, anti-spoofing,
TTL and MTU handling, and the hand-off of everything that is not pod to pod.

Sans-IO: `receive()` takes a frame in a buffer and the time; the fast path rewrites the
frame in place and returns the port to write it to. Everything else is appended to
`outputs`, each entry a frame in the framing of the attachment it goes to: ARP and ICMP
replies, converted, released or held frames, and bare IPv4 packets for a peer worker
(an attachment of kind ``tunnel``, which the data plane sends through the tunnel link,
as aioquic's shell sends ``datagrams_to_send``). `receive()` performs no I/O and calls
nothing outside the router and its collaborators. The shell must flush `outputs` after
each call that filled it, which keeps frames in order. Timers: `next_timer()` and
`handle_timer(now)`.

Collaborators, each in its own module: the pod hold (fabric.router.hold), the ICMP
limits (fabric.router.icmp), TUN framing and TTL (fabric.router.l3), the tunnel hand-off
(fabric.router.remote). What a namespace adds is wired with explicit ``attach_*``
methods: its local stack, DNS fast path, egress NAT and uplink, tunnel, and services
(fabric.services.dispatch).
"""

from __future__ import annotations

import ipaddress
import struct
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Protocol

from fabric.config.specs import DEFAULT_GATEWAY_MAC, TUNNEL_MTU
from fabric.flows import verdicts
from fabric.net import checksum, gso, packets
from fabric.net.gso import gso_sane
from fabric.net.packets import (
    ARP_REPLY,
    ARP_REQUEST,
    BROADCAST_MAC,
    ETH_P_ARP,
    ETH_P_IP,
    ICMP_ECHO_REQUEST,
    ICMP_TIME_EXCEEDED,
    ICMP_UNREACH,
    IP_DF,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    UNREACH_ADMIN,
    UNREACH_FRAG_NEEDED,
    UNREACH_HOST,
    UNREACH_NET,
    UNREACH_PORT,
    Malformed,
)
from fabric.net.vnet import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP_L4,
    ZERO_HDR,
    VnetHdr,
)
from fabric.router.droplog import DropLog
from fabric.router.hold import HOLD_PACKETS, HOLD_TIMEOUT, PodHold
from fabric.router.icmp import (
    PER_SENDER_BURST,
    PER_SENDER_RATE,
    IcmpLimiter,
    must_stay_quiet,
)
from fabric.router.l3 import decrement_ttl, shift_vnet, strip_l2
from fabric.router.model import (
    DROP_BAD_CHECKSUM,
    DROP_BAD_OFFLOAD,
    DROP_BROADCAST,
    DROP_EGRESS_DENIED,
    DROP_EGRESS_FULL,
    DROP_EGRESS_UNSUPPORTED,
    DROP_ETHERTYPE,
    DROP_GATEWAY_PORT,
    DROP_HOLD_OVERFLOW,
    DROP_HOLD_TIMEOUT,
    DROP_ICMP_RATELIMIT,
    DROP_IPV6,
    DROP_MALFORMED,
    DROP_MULTICAST,
    DROP_NO_FLOW,
    DROP_NO_ROUTE,
    DROP_NO_TUNNEL,
    DROP_POD_REMOVED,
    DROP_SPOOFED,
    DROP_TOO_BIG,
    DROP_TTL,
    L3_OFF,
    Pod,
    Port,
    tunnel_port,
)
from fabric.router.remote import tunnel_packets

_ADDRS = struct.Struct("!4s4s")
ZERO_IP = b"\0\0\0\0"
BROADCAST_IP = b"\xff\xff\xff\xff"
_from_bytes = int.from_bytes
# A DNS reply from the gateway, headers in one pack: Ethernet (pod.l2, type), IPv4 (no
# options, id 0, no DF, TTL 64, UDP), UDP from port 53.
_DNS_REPLY = struct.Struct("!12sHBBHHHBBH4s4sHHHH")
_DNS_IP_WORDS = 0x4500 + 0x4011  # the IPv4 header's constant words, for its checksum
# The virtio-net header of gathered replies (little-endian): NEEDS_CSUM at the UDP
# checksum, and GSO_UDP_L4 when the frame carries more than one datagram.
_VNET_LE = struct.Struct("<BBHHHH")
# Replies per super-frame: a run this long leaves at once, without waiting for the end of
# the read batch, so a client with many queries in flight gets its first answers while
# the rest are read (dnsperf -q 50 -c 4: 8 did better than 16 or 64, docs/performance.md).
DNS_RUN_MAX = 8
_MAX_UDP_DATA = 65535 - 28  # an IPv4 packet's UDP payload bound
_GATHER_MAX = _MAX_UDP_DATA // DNS_RUN_MAX  # a reply size a full run can carry
REPLY_HEADS = 4096  # cached reply headers, all dropped when full
_clock = time.perf_counter


class Observer(Protocol):
    """What times the local DNS answers: a fabric.histogram.Histogram, whose observe()
    the router does inline (ascending upper bounds, per-bucket counts, the sum)."""

    bounds: tuple[float, ...]
    counts: list[int]
    sum: float


class EgressCore(Protocol):
    """The namespace's egress NAT (gateway/egress.py), as the router drives it: verdicts
    are fabric.flows.verdicts."""

    def outbound(self, pkt: bytearray, off: int, length: int, now: float,
                 partial: bool) -> int: ...

    def inbound(self, pkt: bytearray, off: int, length: int, now: float,
                partial: bool) -> int: ...

    def next_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


class DhcpServer(Protocol):
    """The namespace's DHCP core (gateway/dhcp.py): answer(payload, lookup) with
    lookup(chaddr) -> (address, pod name) or None; the reply is (payload, IPv4
    destination, Ethernet broadcast?) or None."""

    def answer(self, data: bytes, lookup: Callable[[bytes], tuple[bytes, str] | None]
               ) -> tuple[bytes, bytes, bool] | None: ...


class ServiceGlue(Protocol):
    """The namespace's services as the router consults them (fabric.services.dispatch)."""

    vips: dict[bytes, object]
    backend_ips: dict[bytes, object]

    def to_service(self, svc: object, port: Port, buf: bytearray, h: int, n: int, ip: int,
                   now: float) -> Port | None: ...

    def from_backend(self, src: bytes, buf: bytearray, h: int, ip: int, total: int,
                     now: float) -> bytes: ...

    def next_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


class Router:
    """One namespace's forwarding table and L2/L3 rules (see module docstring)."""

    def __init__(
        self,
        name: str,
        cidr: str | ipaddress.IPv4Network,
        *,
        gateway_mac: str = DEFAULT_GATEWAY_MAC,
        hold_packets: int = HOLD_PACKETS,
        hold_timeout: float = HOLD_TIMEOUT,
    ) -> None:
        self.name = name
        self.cidr = ipaddress.IPv4Network(cidr)
        self.gw_ip = self.cidr.network_address.__add__(1).packed
        self.gw_mac = packets.mac_bytes(gateway_mac)
        self._gw_ethertype = self.gw_mac + b"\x08\x00"  # source MAC and type IPv4
        self.net = _from_bytes(self.cidr.network_address.packed, "big")
        self.mask = _from_bytes(self.cidr.netmask.packed, "big")
        self.bcast = self.cidr.broadcast_address.packed
        self.pods: dict[str, Pod] = {}
        self.by_ip: dict[bytes, Pod] = {}
        self.outputs: list[tuple[Port, bytes]] = []
        # DNS replies held to the end of the data plane's read batch (at most BATCH),
        # per (port, client UDP port, reply size): one super-frame each. Only
        # for the ports the data plane put in gso_ports (TAPs whose kernel takes UDP GSO
        # writes; it calls end_batch() after each batch); empty, replies go out at once.
        self.gso_ports: set[Port] = set()
        self.replies: dict[tuple[Port, int, int], list[bytes]] = {}
        # (port, client port, MACs, reply size, count) -> the headers of that frame.
        self._reply_heads: dict[tuple[Port, int, bytes, int, int], bytes] = {}
        # Set by every path but the pod-to-pod fast path: the call may have moved a
        # deadline (a held frame, a new flow, a service's state), so the shell re-reads
        # next_timer() and clears it. A frame forwarded by the fast path moves none.
        self.touched = False
        self.drops: dict[str, int] = {}  # drops not attributable to an ingress port
        self.droplog = DropLog(name)
        self.hold = PodHold(hold_packets, hold_timeout)
        self.icmp = IcmpLimiter()
        # What the namespace attaches (see the attach_* methods); without a local stack
        # the router answers ping at the gateway itself.
        self.local: Port | None = None
        self.local_ips: set[bytes] = {self.gw_ip}
        # VIPs with ports terminated in the local stack (fabric.streams): the stack may
        # send from them (connections to backends), the services glue routes to it.
        self.stream_vips: set[bytes] = set()
        # Told of every SYN-ACK a pod sends to the gateway address (src, sport, dport,
        # now): the readiness probes' answers, seen before the local stack takes them.
        self.synack: Callable[[bytes, int, int, float], None] | None = None
        self.dns_local: Callable[[bytes, float], bytes | None] | None = None
        self.dns_seconds: Observer | None = None
        self.dhcp: DhcpServer | None = None
        self.egress: EgressCore | None = None
        self.uplink: Port | None = None
        self.tunnel_id: int | None = None
        self.tunnel_mtu = TUNNEL_MTU
        self._tunnels: dict[str, Port] = {}
        self.services: ServiceGlue | None = None
        # The service glue's tables, shared: VIP -> service, backend address -> services.
        self.vips: dict[bytes, object] = {}
        self.backend_ips: dict[bytes, object] = {}
        # Drops of released packets are counted here (their sender's port is unknown).
        self._released_port = Port(vnet=False, mtu=65535, kind="released")

    # --- what a namespace attaches ---------------------------------------------------------

    def attach_local(self, port: Port | None) -> None:
        """The local stack's TUN: the gateway address (and L4-terminated VIPs) live there."""
        self.local = port

    def attach_dns(self, answer: Callable[[bytes, float], bytes | None] | None,
                   seconds: Observer | None = None) -> None:
        """Answers DNS queries to the gateway right here (gateway.dns.DnsCore.answer_local):
        answer(query, now) returns the reply, b"" to drop, or None to pass the query on
        to the local stack. `seconds` observes the time of each answer given (not of a
        drop nor of a query passed on)."""
        self.dns_local = answer
        self.dns_seconds = seconds
        self.replies.clear()
        self._reply_heads.clear()

    def attach_dhcp(self, server: DhcpServer | None) -> None:
        """Answers DHCP from the namespace's pods (None: DHCP is off, and a request from
        0.0.0.0 is a spoofed source like any other)."""
        self.dhcp = server

    def attach_egress(self, nat: EgressCore | None, uplink: Port | None) -> None:
        """The namespace's egress NAT and the worker's uplink TUN it writes into."""
        self.egress = nat
        self.uplink = uplink

    def attach_tunnel(self, ns_id: int | None, mtu: int = TUNNEL_MTU) -> None:
        """Pods on other workers are reached through the tunnel with this namespace id;
        their packets become outputs of tunnel attachments (one per peer worker)."""
        self.tunnel_id = ns_id
        self.tunnel_mtu = mtu
        self._tunnels.clear()

    def attach_services(self, glue: ServiceGlue | None) -> None:
        self.services = glue
        self.vips = glue.vips if glue is not None else {}
        self.backend_ips = glue.backend_ips if glue is not None else {}

    def tunnel_ports(self) -> list[Port]:
        """The tunnel attachments made so far (one per peer worker), for counters."""
        return list(self._tunnels.values())

    # --- table ---------------------------------------------------------------------------

    def add_pod(self, name: str, ip: str | ipaddress.IPv4Address, mac: str | None = None,
                remote: str | None = None) -> Pod:
        addr = ipaddress.IPv4Address(ip)
        if addr not in self.cidr:
            raise ValueError(f"{addr} is not inside {self.cidr}")
        if name in self.pods or addr.packed in self.by_ip:
            raise ValueError(f"pod {name} or address {addr} already in the table")
        pod = Pod(name, addr.packed, packets.mac_bytes(mac) if mac else None, remote,
                  self.gw_mac)
        self.pods[name] = pod
        self.by_ip[pod.ip] = pod
        return pod

    def remove_pod(self, name: str) -> Port | None:
        pod = self.pods.pop(name)
        del self.by_ip[pod.ip]
        k = self.hold.forget(pod)
        if k:
            self.count(DROP_POD_REMOVED, k)
        port = pod.port
        if port is not None:
            port.pod = None
            pod.port = None
        return port

    def attach(self, name: str, port: Port, now: float, mac: str | None = None) -> None:
        """Connect a pod's port; frames held for the pod are released in arrival order."""
        pod = self.pods[name]
        if pod.port is not None:
            raise ValueError(f"pod {name} already has a port")
        if mac:
            pod.mac = packets.mac_bytes(mac)
            pod.mac_fixed = True
        port.pod = pod
        pod.port = port
        if pod.mac is None:
            self._arp_for(pod, now)
        else:
            self._release(pod, now)

    def detach(self, name: str) -> Port | None:
        pod = self.pods[name]
        port = pod.port
        if port is not None:
            port.pod = None
            pod.port = None
            if not pod.mac_fixed:
                pod.mac = None
        return port

    # --- the packet path -----------------------------------------------------------------

    def receive(self, port: Port, buf: bytearray, n: int, now: float) -> Port | None:
        """Route one frame that arrived on `port` (buf[:n], with a virtio-net header when
        the port has one). Returns the port to write buf[:n] to, or None."""
        h = port.hlen
        port.rx_packets += 1
        port.rx_bytes += n
        if port.capture is not None:
            port.capture(now, bytes(buf[h:n]), False)
        pod = port.pod
        if pod is None:
            return None
        if n < h + 34 or buf[h + 12] != 8 or buf[h + 13] != 0:
            self._not_ipv4(port, pod, buf, h, n, now)
            return None
        ip = h + 14
        vihl = buf[ip]
        ihl = (vihl & 15) << 2
        total = buf[ip + 2] << 8 | buf[ip + 3]
        if vihl >> 4 != 4 or ihl < 20 or total < ihl or ip + total > n:
            port.drop(DROP_MALFORMED)
            return None
        src, dst = _ADDRS.unpack_from(buf, ip + 12)
        if src != pod.ip:
            # The one source other than its own a pod may use: 0.0.0.0, for DHCP.
            if not (src == ZERO_IP and self.dhcp is not None
                    and self._dhcp(port, pod, buf, h, n, ip, ihl, dst, now)):
                port.drop(DROP_SPOOFED)
            return None
        if _from_bytes(buf[ip:ip + ihl], "big") % 0xFFFF:
            port.drop(DROP_BAD_CHECKSUM)
            return None
        if h and buf[1] and not self._gso_sane(buf, ip, ihl, total):
            port.drop(DROP_BAD_OFFLOAD)
            return None
        if pod.l2 is None:  # its MAC is unknown (l2 is set with it; no property call)
            self._learn(pod, buf, h, now)
        if src in self.backend_ips:
            assert self.services is not None
            self.touched = True
            dst = self.services.from_backend(src, buf, h, ip, total, now)
        dpod = self.by_ip.get(dst)
        if dpod is None:
            # A DNS query to the gateway is answered here, before the slow paths' checks
            # (DNS is the request/response path pods use most).
            if (dst == self.gw_ip and buf[ip + 9] == PROTO_UDP and self.dns_local is not None
                    and self._dns(port, buf, h, ip, ihl, total, now)):
                return None
            return self._not_pod(port, buf, h, n, ip, ihl, dst, now)
        # The TTL decrement of fabric.router.l3.decrement_ttl, inline: it runs per packet.
        ttl = buf[ip + 8]
        if ttl <= 1:
            self.icmp_error(port, buf, ip, ICMP_TIME_EXCEEDED, 0, now, DROP_TTL)
            return None
        buf[ip + 8] = ttl - 1
        c = (buf[ip + 10] << 8 | buf[ip + 11]) + 0x100
        c = (c + (c >= 0xFFFF)) & 0xFFFF
        buf[ip + 10] = c >> 8
        buf[ip + 11] = c & 0xFF
        # The tail of deliver(), inline for the same reason.
        out = dpod.port
        l2 = dpod.l2
        if out is None or l2 is None:  # (a pod on another worker has no port)
            self._not_deliverable(dpod, port, buf, h, n, ip, now)
            return None
        if total > out.mtu and not self._fits(out, port, buf, h, n, ip, ihl, total, now):
            return None
        buf[h:h + 12] = l2
        if out.hlen != h:
            self._emit(out, bytes(buf[:n]), h, now)
            return None
        out.tx_packets += 1
        out.tx_bytes += n
        if out.capture is not None:
            out.capture(now, bytes(buf[h:n]), True)
        return out

    def deliver(self, dpod: Pod, port: Port, buf: bytearray, h: int, n: int, ip: int,
                total: int, now: float) -> Port | None:
        """The tail of the fast path for a frame whose TTL is already done: the port to
        write buf[:n] to, or None when it was queued, held or dropped. (receive() has
        these lines inline: a test holds both to the same bytes.)"""
        out = dpod.port
        if out is None or dpod.l2 is None or dpod.remote is not None:
            self._not_deliverable(dpod, port, buf, h, n, ip, now)
            return None
        if total > out.mtu:
            ihl = (buf[ip] & 15) << 2
            if not self._fits(out, port, buf, h, n, ip, ihl, total, now):
                return None
        buf[h:h + 12] = dpod.l2
        if out.hlen != h:
            self._emit(out, bytes(buf[:n]), h, now)
            return None
        out.tx_packets += 1
        out.tx_bytes += n
        if out.capture is not None:
            out.capture(now, bytes(buf[h:n]), True)
        return out

    def forward_released(self, b: bytearray, off: int, now: float) -> None:
        """A frame a service released (its IPv4 packet at `off`, already DNATed, TTL done):
        to its pod, or to the pod's hold, ARP or the tunnel like any frame."""
        h = off - packets.ETH_HLEN
        dpod = self.by_ip.get(bytes(b[off + 16:off + 20]))
        if dpod is None or h < 0:
            self.count(DROP_NO_ROUTE, 1)
            return
        if dpod.remote is not None or dpod.port is None or dpod.l2 is None:
            self._not_deliverable(dpod, self._released_port, b, h, len(b), off, now)
            return
        b[h:h + 12] = dpod.l2
        self._emit(dpod.port, b, h, now)

    # --- slow paths ----------------------------------------------------------------------

    @staticmethod
    def _gso_sane(buf: bytearray, ip: int, ihl: int, total: int) -> bool:
        """A pod's super-frame must be one the fabric forwards on every path (fabric.net.gso
        MIN_TCP_GSO and friends): a tiny gso_size is an amplifier, whatever the next hop."""
        l4 = ip + ihl
        if buf[ip + 9] == PROTO_TCP:
            head = ihl + ((buf[l4 + 12] >> 4) << 2) if total >= ihl + 13 else total
        else:
            head = ihl + 8
        return gso_sane(buf[1], buf[4] | buf[5] << 8, total - head)

    def _fits(self, out: Port, port: Port, buf: bytearray, h: int, n: int, ip: int, ihl: int,
              total: int, now: float) -> bool:
        """A packet bigger than the egress MTU: GSO super-frames are fine if their segments
        fit; DF packets get ICMP fragmentation-needed; others are fragmented here."""
        if h and buf[1] & ~GSO_ECN != GSO_NONE:
            gso_type = buf[1] & ~GSO_ECN
            gso_size = buf[4] | buf[5] << 8
            l4 = ip + ihl
            if gso_type == GSO_TCPV4 and n > l4 + 12:
                seg = ihl + ((buf[l4 + 12] >> 4) << 2) + gso_size
            elif gso_type == GSO_UDP_L4:
                seg = ihl + 8 + gso_size
            else:
                seg = total
            if seg <= out.mtu:
                return True
        if (buf[ip + 6] << 8 | buf[ip + 7]) & IP_DF:
            self.icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_FRAG_NEEDED, now, DROP_TOO_BIG,
                            mtu=out.mtu)
            return False
        dpod = out.pod
        assert dpod is not None and dpod.mac is not None
        try:
            if h:
                frames = gso.segment(memoryview(buf)[h:n], VnetHdr.parse(buf))
                ip_packets = [f[14:] for f in frames]
            else:
                ip_packets = [bytes(buf[ip:ip + total])]
            eth = packets.eth_header(dpod.mac, self.gw_mac, ETH_P_IP)
            for p in ip_packets:
                for frag in packets.fragment(p, out.mtu):
                    self._emit(out, eth + frag, 0, now)
        except (Malformed, ValueError):
            port.drop(DROP_MALFORMED)
        return False

    def _not_ipv4(self, port: Port, pod: Pod, buf: bytearray, h: int, n: int,
                  now: float) -> None:
        self.touched = True
        if n < h + 14:
            port.drop(DROP_MALFORMED)
            return
        etype = buf[h + 12] << 8 | buf[h + 13]
        if etype == ETH_P_ARP:
            self._arp(port, pod, buf, h, n, now)
        elif etype == ETH_P_IP:
            port.drop(DROP_MALFORMED)
        elif etype == 0x86DD:
            port.drop(DROP_IPV6)
        else:
            port.drop(DROP_ETHERTYPE)

    def _arp(self, port: Port, pod: Pod, buf: bytearray, h: int, n: int, now: float) -> None:
        try:
            arp = packets.Arp.parse(memoryview(buf)[h + 14:n])
        except Malformed:
            port.drop(DROP_MALFORMED)
            return
        if arp.spa != pod.ip and arp.spa != b"\0\0\0\0":
            port.drop(DROP_SPOOFED)
            return
        if arp.spa == pod.ip and (pod.mac is None or not pod.mac_fixed) and pod.mac != arp.sha:
            if arp.sha[0] & 1 == 0:
                pod.mac = arp.sha
                self._release(pod, now)
        if arp.op != ARP_REQUEST:
            return
        tpa = arp.tpa
        # Never answer for the requester's own address: gratuitous ARP and RFC 5227
        # probes would see a conflict.
        if tpa == arp.spa or tpa == pod.ip:
            return
        t = _from_bytes(tpa, "big")
        if t & self.mask != self.net or tpa == self.bcast or t == self.net:
            return
        reply = packets.arp_frame(ARP_REPLY, self.gw_mac, tpa, arp.sha, arp.spa, arp.sha)
        self._emit(port, reply, 0, now)

    def _learn(self, pod: Pod, buf: bytearray, h: int, now: float) -> None:
        self.touched = True
        mac = bytes(buf[h + 6:h + 12])
        if mac[0] & 1 == 0:
            pod.mac = mac
            self._release(pod, now)

    def _not_pod(self, port: Port, buf: bytearray, h: int, n: int, ip: int, ihl: int,
                 dst: bytes, now: float) -> Port | None:
        self.touched = True
        if dst in self.local_ips:
            if (self.synack is not None and dst == self.gw_ip and buf[ip + 9] == PROTO_TCP
                    and ip + ihl + 14 <= n and buf[ip + ihl + 13] & 0x12 == 0x12):
                l4 = ip + ihl
                self.synack(bytes(buf[ip + 12:ip + 16]), buf[l4] << 8 | buf[l4 + 1],
                            buf[l4 + 2] << 8 | buf[l4 + 3], now)
            if (dst == self.gw_ip and self.dhcp is not None and port.pod is not None
                    and self._dhcp(port, port.pod, buf, h, n, ip, ihl, dst, now)):
                return None  # a renewal, unicast to the server
            if self.local is not None:
                return self._to_l3(self.local, port, buf, h, n, now)
            if dst == self.gw_ip:
                self._to_gateway(port, buf, h, n, ip, ihl, now)
                return None
        svc = self.vips.get(dst)
        if svc is not None:
            assert self.services is not None
            return self.services.to_service(svc, port, buf, h, n, ip, now)
        d = _from_bytes(dst, "big")
        if d >> 28 == 0xE:
            port.drop(DROP_MULTICAST)
        elif dst == self.bcast or d == 0xFFFFFFFF:
            if not (self.dhcp is not None and port.pod is not None
                    and self._dhcp(port, port.pod, buf, h, n, ip, ihl, dst, now)):
                port.drop(DROP_BROADCAST)
        elif d & self.mask == self.net:
            self.icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_HOST, now, DROP_NO_ROUTE)
        elif self.egress is not None and self.uplink is not None:
            return self._to_egress(port, buf, h, n, ip, now)
        else:
            self.icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_NET, now, DROP_NO_ROUTE)
        return None

    def _dns(self, port: Port, buf: bytearray, h: int, ip: int, ihl: int, total: int,
             now: float) -> bool:
        """Answer a DNS query to the gateway in the data plane; False to pass it on.
        (receive() checked the IPv4 header and that the packet lies within the frame.)"""
        l4 = ip + ihl
        # the length first: the buffer may end with the frame (replay, embedders)
        if total < ihl + 20 or buf[l4 + 2] or buf[l4 + 3] != 53:
            return False
        if buf[ip + 6] & 0x3F or buf[ip + 7]:  # fragments: let the kernel reassemble
            return False
        if not (h and buf[0] & F_NEEDS_CSUM) and (buf[l4 + 6] or buf[l4 + 7]):
            psum = checksum.pseudo_header_sum(bytes(buf[ip + 12:ip + 16]), self.gw_ip,
                                              PROTO_UDP, total - ihl)
            if checksum.add(checksum.ones_sum(memoryview(buf)[l4:ip + total]), psum) != 0xFFFF:
                port.drop(DROP_BAD_CHECKSUM)
                return True
        assert self.dns_local is not None
        seconds = self.dns_seconds
        if seconds is None:
            reply = self.dns_local(bytes(buf[l4 + 8:ip + total]), now)
        else:
            t = _clock()
            reply = self.dns_local(bytes(buf[l4 + 8:ip + total]), now)
            if reply:
                # Histogram.observe, inline (it runs per answer): nearly every answer
                # from the zone falls in the first bucket, so no bisect for those.
                t = _clock() - t
                if t <= seconds.bounds[0]:
                    seconds.counts[0] += 1
                else:
                    seconds.counts[bisect_left(seconds.bounds, t)] += 1
                seconds.sum += t
        if reply is None:
            return False
        size = len(reply)
        if (size and port in self.gso_ports and port.capture is None
                and size + 28 <= port.mtu and size <= _GATHER_MAX):
            # Gathered: a client that keeps several queries in flight gets their replies
            # in one write (one wake-up of the client), not one each. A super-frame
            # carries datagrams of one size, so a socket's replies of different sizes
            # (an A and an AAAA, say) leave in separate frames, and the order between
            # those frames is not the queries' order: UDP promises none, and clients
            # match replies to queries by id and question (glibc's stub sends A and
            # AAAA on one socket and takes the answers in either order).
            key = (port, buf[l4] << 8 | buf[l4 + 1], size)
            run = self.replies.get(key)
            if run is None:
                self.replies[key] = [reply]
            else:
                run.append(reply)
                if len(run) == DNS_RUN_MAX:
                    del self.replies[key]
                    self._emit_replies(port, key[1], run)
            return True
        pod = port.pod
        if reply and pod is not None and pod.l2 is not None:
            # What send_ip(udp_packet(...)) would queue, built in one pack: both checksums
            # are sums of big-endian integers modulo 0xFFFF (fabric.net.checksum).
            dst = bytes(buf[ip + 12:ip + 16])
            sport = buf[l4] << 8 | buf[l4 + 1]
            ulen = 8 + len(reply)
            addrs = _from_bytes(self.gw_ip, "big") + _from_bytes(dst, "big")
            s = (_DNS_IP_WORDS + addrs + 20 + ulen) % 0xFFFF
            ipsum = 0xFFFF - s if s else 0
            data = _from_bytes(reply, "big") << 8 if ulen & 1 else _from_bytes(reply, "big")
            s = (addrs + PROTO_UDP + 53 + sport + 2 * ulen + data) % 0xFFFF
            frame = _DNS_REPLY.pack(pod.l2, ETH_P_IP, 0x45, 0, 20 + ulen, 0, 0, 64, PROTO_UDP,
                                    ipsum, self.gw_ip, dst, 53, sport, ulen,
                                    0xFFFF - s if s else 0xFFFF) + reply
            self._emit(port, ZERO_HDR + frame if port.hlen else frame, port.hlen, now)
        return True

    def end_batch(self) -> None:
        """The data plane's read batch is over: the gathered DNS replies to the outputs."""
        replies = self.replies
        for (port, sport, _), run in replies.items():
            self._emit_replies(port, sport, run)
        replies.clear()

    def _emit_replies(self, port: Port, sport: int, run: list[bytes]) -> None:
        """One frame for a run of equal-sized replies to one client socket: a UDP GSO
        super-frame the pod's kernel cuts back into the datagrams (one of them: a plain
        frame). The UDP checksum is left to the kernel (NEEDS_CSUM, the pseudo-header
        sum in the field) as for every frame a pod's own stack sends over its TAP."""
        pod = port.pod
        if pod is None or pod.l2 is None:  # (cannot happen within one read batch)
            return
        k = len(run)
        size = len(run[0])
        hkey = (port, sport, pod.l2, size, k)
        head = self._reply_heads.get(hkey)
        if head is None:
            head = self._reply_head(pod, sport, size, k)
            if len(self._reply_heads) >= REPLY_HEADS:
                self._reply_heads.clear()
            self._reply_heads[hkey] = head
        port.tx_packets += k
        port.tx_bytes += k * (52 + size)
        self.outputs.append((port, head + (run[0] if k == 1 else b"".join(run))))

    def _reply_head(self, pod: Pod, sport: int, size: int, k: int) -> bytes:
        """virtio-net, Ethernet, IPv4 and UDP headers of k replies of `size` bytes."""
        assert pod.l2 is not None
        ulen = 8 + k * size
        addrs = _from_bytes(self.gw_ip, "big") + _from_bytes(pod.ip, "big")
        s = (_DNS_IP_WORDS + addrs + 20 + ulen) % 0xFFFF
        psum = (addrs + PROTO_UDP + ulen) % 0xFFFF
        vnet = _VNET_LE.pack(F_NEEDS_CSUM, GSO_UDP_L4 if k > 1 else GSO_NONE, 42,
                             size if k > 1 else 0, 34, 6)
        return vnet + _DNS_REPLY.pack(pod.l2, ETH_P_IP, 0x45, 0, 20 + ulen, 0, 0, 64,
                                      PROTO_UDP, 0xFFFF - s if s else 0, self.gw_ip, pod.ip,
                                      53, sport, ulen, psum)

    def _dhcp(self, port: Port, pod: Pod, buf: bytearray, h: int, n: int, ip: int, ihl: int,
              dst: bytes, now: float) -> bool:
        """A DHCP request from `pod` (UDP to port 67 of the gateway or a broadcast
        address): answered by the DHCP core for the pod's own MAC only, or dropped. False
        when it is not one, for the caller's own handling. The IPv4 header was checked up
        to its lengths; its checksum is checked here (the 0.0.0.0 path comes before the
        fast path's check)."""
        total = buf[ip + 2] << 8 | buf[ip + 3]
        l4 = ip + ihl
        if (buf[ip + 9] != PROTO_UDP or total < ihl + 8 or ip + total > n
                or (buf[l4 + 2] << 8 | buf[l4 + 3]) != 67):
            return False
        if dst != self.gw_ip and dst != self.bcast and dst != BROADCAST_IP:
            return False
        self.touched = True
        if _from_bytes(buf[ip:ip + ihl], "big") % 0xFFFF:
            port.drop(DROP_BAD_CHECKSUM)
            return True
        if (buf[ip + 6] << 8 | buf[ip + 7]) & 0x3FFF or (h and buf[1] & ~GSO_ECN != GSO_NONE):
            port.drop(DROP_MALFORMED)  # fragmented or a super-frame: no client sends one
            return True
        ulen = buf[l4 + 4] << 8 | buf[l4 + 5]
        if ulen < 8 or ulen > total - ihl:
            port.drop(DROP_MALFORMED)
            return True
        if not (h and buf[0] & F_NEEDS_CSUM) and (buf[l4 + 6] or buf[l4 + 7]):
            psum = checksum.pseudo_header_sum(bytes(buf[ip + 12:ip + 16]), dst, PROTO_UDP,
                                              ulen)
            if checksum.add(checksum.ones_sum(memoryview(buf)[l4:l4 + ulen]), psum) != 0xFFFF:
                port.drop(DROP_BAD_CHECKSUM)
                return True
        assert self.dhcp is not None
        mac = pod.mac
        binding = (pod.ip, pod.name)
        reply = self.dhcp.answer(bytes(buf[l4 + 8:l4 + ulen]),
                                 lambda chaddr: binding if chaddr == mac else None)
        if reply is not None and mac is not None:
            payload, to, bcast = reply
            pkt = packets.udp_packet(self.gw_ip, to, 67, 68, payload, flags_frag=0)
            eth = packets.eth_header(BROADCAST_MAC if bcast else mac, self.gw_mac, ETH_P_IP)
            self._emit(port, eth + pkt, 0, now)
        return True

    def _to_gateway(self, port: Port, buf: bytearray, h: int, n: int, ip: int, ihl: int,
                    now: float) -> None:
        proto = buf[ip + 9]
        total = buf[ip + 2] << 8 | buf[ip + 3]
        frag = (buf[ip + 6] << 8 | buf[ip + 7]) & 0x3FFF
        if proto == PROTO_ICMP and not frag and total >= ihl + 8:
            icmp = ip + ihl
            if buf[icmp] == ICMP_ECHO_REQUEST:
                msg = bytes(buf[icmp:ip + total])
                if checksum.ones_sum(msg) != 0xFFFF:
                    port.drop(DROP_BAD_CHECKSUM)
                    return
                ident, seq = struct.unpack_from("!HH", msg, 4)
                reply = packets.icmp_echo(self.gw_ip, bytes(buf[ip + 12:ip + 16]), ident, seq,
                                          msg[8:], reply=True)
                self.send_ip(port, reply, now)
                return
        if proto in (PROTO_TCP, PROTO_UDP):
            self.icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_PORT, now, DROP_GATEWAY_PORT)
        else:
            port.drop(DROP_GATEWAY_PORT)

    # --- pods that cannot take the frame now: hold, ARP, or another worker ---------------

    def _not_deliverable(self, dpod: Pod, port: Port, buf: bytearray, h: int, n: int,
                         ip: int, now: float) -> None:
        self.touched = True
        if dpod.remote is not None:
            if self.tunnel_id is None:
                self.icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_HOST, now, DROP_NO_TUNNEL)
            else:
                self._to_remote(dpod.remote, port, buf, h, n, ip, now)
            return
        hold = self.hold
        if not hold.add(dpod, h, bytes(buf[:n]), now):
            port.drop(DROP_HOLD_OVERFLOW)
            return
        if hold.wants_arp(dpod, now):
            self._arp_for(dpod, now)

    def _release(self, pod: Pod, now: float) -> None:
        out = pod.port
        if out is None or pod.mac is None or not pod.pending:
            return
        for _, h, frame in self.hold.take(pod):
            b = bytearray(frame)
            b[h:h + 12] = pod.l2
            ip = h + 14
            total = b[ip + 2] << 8 | b[ip + 3]
            if total > out.mtu:
                # The egress MTU was unknown when the frame was held: apply it now, with
                # drops and ICMP going to the sender (counted here if it left meanwhile).
                sender = self.by_ip.get(bytes(b[ip + 12:ip + 16]))
                sport = sender.port if sender is not None else None
                tmp = sport or Port(vnet=False, mtu=0)
                ok = self._fits(out, tmp, b, h, len(b), ip, (b[ip] & 15) << 2, total, now)
                if sport is None:
                    for reason, k in tmp.drops.items():
                        self.count(reason, k)
                if not ok:
                    continue
            self._emit(out, b, h, now)

    def _arp_for(self, pod: Pod, now: float) -> None:
        port = pod.port
        if port is None:
            return
        req = packets.arp_frame(ARP_REQUEST, self.gw_mac, self.gw_ip, b"\0" * 6, pod.ip,
                                BROADCAST_MAC)
        self.hold.arped(pod, now)
        self._emit(port, req, 0, now)

    def _to_remote(self, worker: str, port: Port, buf: bytearray, h: int, n: int, ip: int,
                   now: float) -> None:
        """A packet for a pod on another worker: plain, clamped, fitting packets become
        outputs of the worker's tunnel attachment (fabric.router.remote)."""
        mtu = self.tunnel_mtu
        try:
            pkts, too_big = tunnel_packets(buf, h, n, ip, mtu)
        except Malformed:
            port.drop(DROP_BAD_OFFLOAD)
            return
        if pkts:
            tp = self._tunnels.get(worker)
            if tp is None:
                assert self.tunnel_id is not None
                tp = self._tunnels[worker] = tunnel_port(worker, self.tunnel_id, mtu)
            outputs = self.outputs
            for p in pkts:
                tp.tx_packets += 1
                tp.tx_bytes += len(p)
                outputs.append((tp, p))
        if too_big is not None:
            b = bytearray(h + packets.ETH_HLEN) + too_big
            self.icmp_error(port, b, h + packets.ETH_HLEN, ICMP_UNREACH, UNREACH_FRAG_NEEDED,
                            now, DROP_TOO_BIG, mtu=mtu)

    def receive_remote(self, worker: str, packet: bytes, now: float,
                       vnet_hdr: bytes | None = None) -> None:
        """A packet from a pod on another worker (already authenticated by the tunnel):
        deliver it to its local pod. Its source must be a pod that lives on that worker."""
        self.touched = True
        drops = self.drops
        n = len(packet)
        if n < 20 or packet[0] >> 4 != 4:
            drops[DROP_MALFORMED] = drops.get(DROP_MALFORMED, 0) + 1
            return
        ihl = (packet[0] & 15) << 2
        total = packet[2] << 8 | packet[3]
        if ihl < 20 or total < ihl or total > n:
            drops[DROP_MALFORMED] = drops.get(DROP_MALFORMED, 0) + 1
            return
        if _from_bytes(packet[:ihl], "big") % 0xFFFF:
            drops[DROP_BAD_CHECKSUM] = drops.get(DROP_BAD_CHECKSUM, 0) + 1
            return
        spod = self.by_ip.get(packet[12:16])
        if spod is None or spod.remote != worker:
            drops[DROP_SPOOFED] = drops.get(DROP_SPOOFED, 0) + 1
            return
        dpod = self.by_ip.get(packet[16:20])
        if dpod is None or dpod.remote is not None:
            drops[DROP_NO_ROUTE] = drops.get(DROP_NO_ROUTE, 0) + 1
            return
        # A coalesced super-frame from the tunnel keeps its virtio-net header (GSO).
        h = len(vnet_hdr) if vnet_hdr is not None else 0
        b = bytearray(vnet_hdr or b"") + bytearray(packets.ETH_HLEN) + packet[:total]
        ip = h + packets.ETH_HLEN
        if spod.ip in self.backend_ips:  # a remote backend answering a service flow
            assert self.services is not None
            dpod = self.by_ip.get(self.services.from_backend(spod.ip, b, h, ip, total, now))
            if dpod is None or dpod.remote is not None:
                drops[DROP_NO_ROUTE] = drops.get(DROP_NO_ROUTE, 0) + 1
                return
        if not decrement_ttl(b, ip):
            drops[DROP_TTL] = drops.get(DROP_TTL, 0) + 1
            return
        b[h + 12] = 8
        b[h + 13] = 0
        out = dpod.port
        if out is None or dpod.l2 is None:
            b[h + 6:h + 12] = self.gw_mac
            self._not_deliverable(dpod, self._released_port, b, h, len(b), ip, now)
            return
        b[h:h + 12] = dpod.l2
        if total > out.mtu and not self._fits(out, self._released_port, b, h, len(b), ip,
                                              ihl, total, now):
            return
        self._emit(out, b, h, now)

    # --- L3 ports: the local stack and the egress uplink --------------------------------

    def to_local(self, port: Port, buf: bytearray, h: int, n: int, now: float) -> Port | None:
        """Hand a pod's frame to the local stack (a VIP's port terminated there)."""
        local = self.local
        if local is None:
            port.drop(DROP_NO_ROUTE)
            return None
        self.touched = True
        return self._to_l3(local, port, buf, h, n, now)

    def _to_l3(self, out: Port, port: Port, buf: bytearray, h: int, n: int,
               now: float) -> Port | None:
        """Hand a pod's frame to an L3 port: drop the Ethernet header in place (the
        virtio-net header moves up to sit right before the IP header)."""
        if out.hlen != h:
            self._emit(out, bytes(buf[:n]), h, now)
            return None
        if h:
            shift_vnet(buf, 0, L3_OFF, -L3_OFF)
        out.tx_packets += 1
        out.tx_bytes += n - L3_OFF
        return out

    def _to_egress(self, port: Port, buf: bytearray, h: int, n: int, ip: int,
                   now: float) -> Port | None:
        nat = self.egress
        out = self.uplink
        assert nat is not None and out is not None
        if not decrement_ttl(buf, ip):
            self.icmp_error(port, buf, ip, ICMP_TIME_EXCEEDED, 0, now, DROP_TTL)
            return None
        total = buf[ip + 2] << 8 | buf[ip + 3]
        verdict = nat.outbound(buf, ip, total, now, bool(h and buf[0] & F_NEEDS_CSUM))
        if verdict != verdicts.OK:
            if verdict == verdicts.DENIED:
                self.icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_ADMIN, now,
                                DROP_EGRESS_DENIED)
            elif verdict == verdicts.FULL:
                port.drop(DROP_EGRESS_FULL)
            elif verdict == verdicts.UNSUPPORTED:
                port.drop(DROP_EGRESS_UNSUPPORTED)
            else:
                port.drop(DROP_MALFORMED)
            return None
        if total > out.mtu:
            ihl = (buf[ip] & 15) << 2
            if not self._fits(out, port, buf, h, n, ip, ihl, total, now):
                return None
        return self._to_l3(out, port, buf, h, n, now)

    def receive_l3(self, port: Port, buf: bytearray, n: int, now: float) -> Port | None:
        """A packet from the local stack: buf[L3_OFF:n] holds it (virtio-net header and
        IPv4, no Ethernet). Returns the pod port to write buf[:n] to, or None."""
        self.touched = True
        port.rx_packets += 1
        port.rx_bytes += n - L3_OFF
        h = port.hlen
        ip = L3_OFF + h
        total = self._l3_header(port, buf, ip, n)
        if not total:
            return None
        src, dst = _ADDRS.unpack_from(buf, ip + 12)
        if src not in self.local_ips and src not in self.stream_vips:
            port.drop(DROP_SPOOFED)
            return None
        return self._l3_to_pod(port, buf, h, n, ip, total, dst, now, False)

    def receive_egress(self, port: Port, buf: bytearray, n: int, now: float) -> Port | None:
        """A packet from the uplink addressed to this namespace's egress address (the
        shell demultiplexes by address): translate it back and deliver it to its pod."""
        self.touched = True
        h = port.hlen
        ip = L3_OFF + h
        total = self._l3_header(port, buf, ip, n)
        nat = self.egress
        if not total or nat is None:
            return None
        v = nat.inbound(buf, ip, total, now, bool(h and buf[L3_OFF] & F_NEEDS_CSUM))
        if v != verdicts.OK:
            port.drop(DROP_EGRESS_UNSUPPORTED if v == verdicts.UNSUPPORTED else
                      DROP_MALFORMED if v == verdicts.MALFORMED else DROP_NO_FLOW)
            return None
        return self._l3_to_pod(port, buf, h, n, ip, total, bytes(buf[ip + 16:ip + 20]), now,
                               True)

    def _l3_header(self, port: Port, buf: bytearray, ip: int, n: int) -> int:
        """The IPv4 total length of a packet from an L3 port, or 0 if it must be dropped."""
        if n < ip + 20:
            port.drop(DROP_MALFORMED)
            return 0
        vihl = buf[ip]
        ihl = (vihl & 15) << 2
        total = buf[ip + 2] << 8 | buf[ip + 3]
        if vihl >> 4 != 4 or ihl < 20 or total < ihl or ip + total > n:
            port.drop(DROP_MALFORMED if vihl >> 4 == 4 else DROP_IPV6)
            return 0
        if _from_bytes(buf[ip:ip + ihl], "big") % 0xFFFF:
            port.drop(DROP_BAD_CHECKSUM)
            return 0
        return total

    def _l3_to_pod(self, port: Port, buf: bytearray, h: int, n: int, ip: int, total: int,
                   dst: bytes, now: float, routed: bool) -> Port | None:
        """Put an Ethernet header (and the virtio-net header) in front of the packet in
        place, turning buf[:n] into a frame for the pod that owns `dst`."""
        dpod = self.by_ip.get(dst)
        if dpod is None:
            port.drop(DROP_NO_ROUTE)
            return None
        if routed and not decrement_ttl(buf, ip):
            port.drop(DROP_TTL)
            return None
        if h:
            shift_vnet(buf, L3_OFF, 0, L3_OFF)
        buf[h + 6:h + 14] = self._gw_ethertype
        # The IP header now sits at h + 14, which is `ip` (L3_OFF == 14).
        return self.deliver(dpod, port, buf, h, n, ip, total, now)

    # --- what the router sends itself ---------------------------------------------------------

    def icmp_error(self, port: Port, buf: bytearray, ip: int, icmp_type: int, code: int,
                   now: float, reason: str, mtu: int = 0) -> None:
        """Drop the packet with `reason` and tell its sender, unless ICMP must stay quiet
        (fabric.router.icmp)."""
        port.drop(reason)
        if must_stay_quiet(buf, ip):
            return
        own = port.icmp
        if own is None:
            own = port.icmp = IcmpLimiter(PER_SENDER_RATE, PER_SENDER_BURST)
        if not own.allow(now) or (not (icmp_type == 3 and code == 4)
                                  and not self.icmp.allow(now)):
            port.drop(DROP_ICMP_RATELIMIT)
            return
        total = buf[ip + 2] << 8 | buf[ip + 3]
        msg = packets.icmp_error(self.gw_ip, memoryview(buf)[ip:ip + total], icmp_type, code,
                                 mtu=mtu)
        sender = self.by_ip.get(bytes(buf[ip + 12:ip + 16]))
        if sender is not None and sender.port is not None:
            self.send_ip(sender.port, msg, now)

    def send_ip(self, port: Port, packet: bytes, now: float) -> None:
        """An IPv4 packet from the gateway to the pod behind `port`."""
        pod = port.pod
        if pod is None or pod.mac is None:
            return
        self._emit(port, packets.eth_header(pod.mac, self.gw_mac, ETH_P_IP) + packet, 0, now)

    def _emit(self, out: Port, frame: bytes | bytearray, h: int, now: float) -> None:
        """Queue a frame for `out`, converting between framings: virtio-net frames going to
        a port without offloads are segmented and get full checksums."""
        if h == out.hlen:
            frames = [bytes(frame)]
        elif out.hlen:
            frames = [ZERO_HDR + bytes(frame)]
        else:
            try:
                frames = gso.segment(memoryview(frame)[h:], VnetHdr.parse(frame))
            except Malformed:
                out.drop(DROP_BAD_OFFLOAD)
                return
        oh = out.hlen
        if out.l3:
            frames = [strip_l2(f, oh) for f in frames]
        for f in frames:
            out.tx_packets += 1
            out.tx_bytes += len(f)
            if out.capture is not None:
                out.capture(now, f[oh:], True)
            self.outputs.append((out, f))

    # --- timers --------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        t = self.hold.next_timer()
        if self.egress is not None:
            e = self.egress.next_timer()
            if e is not None and (t is None or e < t):
                t = e
        if self.services is not None:
            s = self.services.next_timer()
            if s is not None and (t is None or s < t):
                t = s
        return t

    def handle_timer(self, now: float) -> None:
        """Expire held frames (their senders get ICMP host unreachable), retry ARP, and
        let egress NAT and services do what is due."""
        if self.egress is not None:
            self.egress.handle_timer(now)
        if self.services is not None:
            self.services.handle_timer(now)
        for h, frame in self.hold.expired(now):
            b = bytearray(frame)
            sender = self.by_ip.get(bytes(b[h + 26:h + 30]))
            if sender is not None and sender.port is not None:
                self.icmp_error(sender.port, b, h + 14, ICMP_UNREACH, UNREACH_HOST, now,
                                DROP_HOLD_TIMEOUT)
            else:
                self.count(DROP_HOLD_TIMEOUT, 1)
        for pod in self.hold.arp_due(now):
            self._arp_for(pod, now)

    # --- counters ------------------------------------------------------------------------

    def count(self, reason: str, k: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + k

    def held(self) -> int:
        return self.hold.held()
