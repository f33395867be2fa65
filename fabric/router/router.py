"""The per-namespace router: a static IP -> port table with proxy ARP, anti-spoofing,
TTL and MTU handling, and a bounded hold for pods whose port is not attached yet.

Sans-IO: `receive()` takes a frame in a buffer and the time; the fast path rewrites the
frame in place and returns the port to write it to, everything else (ARP and ICMP
replies, converted or released frames) is appended to `outputs` in the framing of the
port it goes to. The shell must flush `outputs` after each call that filled it, which
keeps frames in order. Timers: `next_timer()` and `handle_timer(now)`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol

from fabric.activator import abi as act_mod
from fabric.config.specs import DEFAULT_GATEWAY_MAC, TUNNEL_MTU
from fabric.flows import verdicts
from fabric.net import checksum, gso, packets
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
    VNET_HDR_LEN,
    ZERO_HDR,
    VnetHdr,
)
from fabric.services import core as svc_mod

HOLD_PACKETS = 64
HOLD_TIMEOUT = 30.0
ARP_RETRY = 1.0
ICMP_RATE = 1000.0  # ICMP errors per second per namespace
ICMP_BURST = 100.0

_ADDRS = struct.Struct("!4s4s")
L3_OFF = 14  # where an L3 port's frame starts in the shell's buffer
_from_bytes = int.from_bytes

# Drop reasons, named once so counters, metrics and docs agree.
DROP_MALFORMED = "malformed"
DROP_BAD_CHECKSUM = "bad_checksum"
DROP_SPOOFED = "spoofed_source"
DROP_IPV6 = "ipv6"
DROP_ETHERTYPE = "ethertype"
DROP_TTL = "ttl_expired"
DROP_NO_ROUTE = "no_route"
DROP_BROADCAST = "broadcast"
DROP_MULTICAST = "multicast"
DROP_TOO_BIG = "too_big"
DROP_HOLD_OVERFLOW = "hold_overflow"
DROP_HOLD_TIMEOUT = "hold_timeout"
DROP_NO_TUNNEL = "no_tunnel"
DROP_GATEWAY_PORT = "gateway_port_closed"
DROP_BAD_OFFLOAD = "bad_offload"
DROP_ICMP_RATELIMIT = "icmp_ratelimited"
DROP_TX_FULL = "tx_full"
DROP_TX_ERROR = "tx_error"
DROP_POD_REMOVED = "pod_removed"
DROP_EGRESS_DENIED = "egress_denied"
DROP_EGRESS_FULL = "egress_table_full"
DROP_EGRESS_UNSUPPORTED = "egress_unsupported"
DROP_NO_FLOW = "no_flow"
DROP_SERVICE_HOLD_FULL = "service_hold_full"
DROP_SERVICE_NO_BACKEND = "service_no_backend"
DROP_SERVICE_PORT = "service_port_closed"
DROP_SERVICE_TABLE_FULL = "service_table_full"
DROP_ACTIVATOR = "activator_drop"



class EgressCore(Protocol):
    """The namespace's egress NAT (gateway/egress.py), as the router drives it."""

    def outbound(self, pkt: bytearray, off: int, length: int, now: float,
                 partial: bool) -> int: ...

    def inbound(self, pkt: bytearray, off: int, length: int, now: float,
                partial: bool) -> int: ...

    def next_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


class Port:
    """The router's view of an attached pod port. `fd` is an opaque handle for the shell."""

    __slots__ = ("pod", "hlen", "l3", "mtu", "fd", "kind", "rx_packets", "rx_bytes",
                 "tx_packets", "tx_bytes", "drops", "capture")

    def __init__(self, *, vnet: bool, mtu: int, fd: int = -1, kind: str = "test",
                 l3: bool = False) -> None:
        self.pod: Pod | None = None
        self.hlen = VNET_HDR_LEN if vnet else 0
        # An L3 port (a TUN: the local stack, the egress uplink) carries IPv4 packets with
        # no Ethernet header. The fast path leaves its frames at buf[L3_OFF:n], and the
        # shell reads L3 ports into buf[L3_OFF:] so the router can put an Ethernet header
        # in front in place.
        self.l3 = l3
        self.mtu = mtu
        self.fd = fd
        self.kind = kind
        self.rx_packets = 0
        self.rx_bytes = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.drops: dict[str, int] = {}
        # Called as capture(now, ethernet_frame, outgoing) when someone captures this port.
        self.capture: Callable[[float, bytes, bool], None] | None = None

    @property
    def vnet(self) -> bool:
        return self.hlen != 0

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


class Pod:
    """A table entry: a pod's address, its MAC once known, and its port once attached."""

    __slots__ = ("name", "ip", "_mac", "l2", "gw_mac", "mac_fixed", "port", "remote",
                 "pending", "arp_due")

    def __init__(self, name: str, ip: bytes, mac: bytes | None, remote: str | None,
                 gw_mac: bytes) -> None:
        self.name = name
        self.ip = ip
        self.gw_mac = gw_mac
        # The 12 bytes of Ethernet addresses a frame toward this pod starts with (one slice
        # assignment on the fast path), None while the pod's MAC is unknown.
        self.l2: bytes | None = None
        self.mac = mac
        self.mac_fixed = mac is not None
        self.port: Port | None = None
        self.remote = remote
        # (arrival time, header length, frame with its virtio-net header if any)
        self.pending: deque[tuple[float, int, bytes]] = deque()
        self.arp_due = 0.0

    @property
    def mac(self) -> bytes | None:
        return self._mac

    @mac.setter
    def mac(self, mac: bytes | None) -> None:
        self._mac = mac
        self.l2 = None if mac is None else mac + self.gw_mac


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
        self.net = _from_bytes(self.cidr.network_address.packed, "big")
        self.mask = _from_bytes(self.cidr.netmask.packed, "big")
        self.bcast = self.cidr.broadcast_address.packed
        self.hold_packets = hold_packets
        self.hold_timeout = hold_timeout
        self.pods: dict[str, Pod] = {}
        self.by_ip: dict[bytes, Pod] = {}
        self.outputs: list[tuple[Port, bytes]] = []
        self.drops: dict[str, int] = {}  # drops not attributable to an ingress port
        # Pods with held frames; a dict so timers visit them in a reproducible order.
        self._held: dict[Pod, None] = {}
        self._icmp_tokens = ICMP_BURST
        self._icmp_last = 0.0
        # The local stack (gateway address, later L4-terminated VIPs) and egress, when the
        # namespace has them; without a local stack the router answers ping itself.
        self.local: Port | None = None
        self.local_ips: set[bytes] = {self.gw_ip}
        self.egress: EgressCore | None = None
        self.uplink: Port | None = None
        # Answers DNS queries for local names right here (see gateway.dns.answer_local):
        # returns the reply, b"" to drop, or None to pass the query to the local stack.
        self.dns_local: Callable[[bytes, float], bytes | None] | None = None
        # Sends IPv4 packets to a pod on another worker: tunnel_send(worker, packets, now)
        # (a list, so the segments of one super-frame leave in one batch).
        self.tunnel_send: Callable[[str, list[bytes], float], None] | None = None
        self.tunnel_mtu = TUNNEL_MTU
        # Services: VIP -> Service, and backend pod address -> the services it serves
        # (replies from backends are un-NATed before routing). Signals (activate, idle)
        # go to on_signal(service name, signal) as they happen.
        self.services: dict[bytes, svc_mod.Service] = {}
        self.backend_ips: dict[bytes, list[svc_mod.Service]] = {}
        self.on_signal: Callable[[str, svc_mod.Signal], None] | None = None
        self._packet_id = 0
        # Drops of released packets are counted here (their sender's port is unknown).
        self._released_port = Port(vnet=False, mtu=65535, kind="released")

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
        if pod.pending:
            self._count(DROP_POD_REMOVED, len(pod.pending))
            pod.pending.clear()
        self._held.pop(pod, None)
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
            port.drop(DROP_SPOOFED)
            return None
        if _from_bytes(buf[ip:ip + ihl], "big") % 0xFFFF:
            port.drop(DROP_BAD_CHECKSUM)
            return None
        if pod.mac is None:
            self._learn(pod, buf, h, now)
        if src in self.backend_ips:
            dst = self._from_backend(src, buf, h, ip, total, now)
        dpod = self.by_ip.get(dst)
        if dpod is None:
            return self._not_pod(port, buf, h, n, ip, ihl, dst, now)
        ttl = buf[ip + 8]
        if ttl <= 1:
            self._icmp_error(port, buf, ip, ICMP_TIME_EXCEEDED, 0, now, DROP_TTL)
            return None
        buf[ip + 8] = ttl - 1
        c = (buf[ip + 10] << 8 | buf[ip + 11]) + 0x100
        c = (c + (c >= 0xFFFF)) & 0xFFFF
        buf[ip + 10] = c >> 8
        buf[ip + 11] = c & 0xFF
        out = dpod.port
        l2 = dpod.l2
        if out is None or l2 is None:
            self._hold(dpod, port, buf, h, n, ip, now)
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

    # --- slow paths ----------------------------------------------------------------------

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
            self._icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_FRAG_NEEDED, now, DROP_TOO_BIG,
                             mtu=out.mtu)
            return False
        dpod = out.pod
        assert dpod is not None and dpod.mac is not None
        try:
            if h:
                frames = gso.segment(memoryview(buf)[h:n], VnetHdr.parse(buf))
                packets_ = [f[14:] for f in frames]
            else:
                packets_ = [bytes(buf[ip:ip + total])]
            eth = packets.eth_header(dpod.mac, self.gw_mac, ETH_P_IP)
            for p in packets_:
                for frag in packets.fragment(p, out.mtu):
                    self._emit(out, eth + frag, 0, now)
        except (Malformed, ValueError):
            port.drop(DROP_MALFORMED)
        return False

    def _not_ipv4(self, port: Port, pod: Pod, buf: bytearray, h: int, n: int,
                  now: float) -> None:
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
        mac = bytes(buf[h + 6:h + 12])
        if mac[0] & 1 == 0:
            pod.mac = mac
            self._release(pod, now)

    def _not_pod(self, port: Port, buf: bytearray, h: int, n: int, ip: int, ihl: int,
                 dst: bytes, now: float) -> Port | None:
        if dst in self.local_ips:
            if (dst == self.gw_ip and buf[ip + 9] == PROTO_UDP and self.dns_local is not None
                    and self._dns(port, buf, h, n, ip, ihl, now)):
                return None
            if self.local is not None:
                return self._to_l3(self.local, port, buf, h, n, now)
            if dst == self.gw_ip:
                self._to_gateway(port, buf, h, n, ip, ihl, now)
                return None
        svc = self.services.get(dst)
        if svc is not None:
            return self._to_service(svc, port, buf, h, n, ip, now)
        d = _from_bytes(dst, "big")
        if d >> 28 == 0xE:
            port.drop(DROP_MULTICAST)
        elif dst == self.bcast or d == 0xFFFFFFFF:
            port.drop(DROP_BROADCAST)
        elif d & self.mask == self.net:
            self._icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_HOST, now, DROP_NO_ROUTE)
        elif self.egress is not None and self.uplink is not None:
            return self._to_egress(port, buf, h, n, ip, now)
        else:
            self._icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_NET, now, DROP_NO_ROUTE)
        return None

    def _dns(self, port: Port, buf: bytearray, h: int, n: int, ip: int, ihl: int,
             now: float) -> bool:
        """Answer a DNS query to the gateway in the data plane; False to pass it on."""
        l4 = ip + ihl
        total = buf[ip + 2] << 8 | buf[ip + 3]
        if (buf[l4 + 2] << 8 | buf[l4 + 3]) != 53 or total < ihl + 20:
            return False
        if (buf[ip + 6] << 8 | buf[ip + 7]) & 0x3FFF:  # fragments: let the kernel reassemble
            return False
        if not (h and buf[0] & F_NEEDS_CSUM) and (buf[l4 + 6] or buf[l4 + 7]):
            psum = checksum.pseudo_header_sum(bytes(buf[ip + 12:ip + 16]), self.gw_ip,
                                              PROTO_UDP, total - ihl)
            if checksum.add(checksum.ones_sum(memoryview(buf)[l4:ip + total]), psum) != 0xFFFF:
                port.drop(DROP_BAD_CHECKSUM)
                return True
        assert self.dns_local is not None
        reply = self.dns_local(bytes(buf[l4 + 8:ip + total]), now)
        if reply is None:
            return False
        if reply:
            sport = buf[l4] << 8 | buf[l4 + 1]
            self._emit_ip(port, packets.udp_packet(self.gw_ip, bytes(buf[ip + 12:ip + 16]), 53,
                                                   sport, reply, flags_frag=0), now)
        return True

    # --- services ------------------------------------------------------------------------

    def add_service(self, svc: svc_mod.Service) -> None:
        self.services[svc.vip.packed] = svc

    def remove_service(self, svc: svc_mod.Service) -> None:
        self.services.pop(svc.vip.packed, None)
        for ip, lst in list(self.backend_ips.items()):
            if svc in lst:
                lst.remove(svc)
                if not lst:
                    del self.backend_ips[ip]

    def set_backend(self, svc: svc_mod.Service, name: str, ip: str, ready: bool,
                    now: float) -> None:
        """A backend's readiness changed (or it appeared): update the service and send what
        its hold can release now."""
        svc.set_backend(name, ip, ready, now)
        packed = ipaddress.IPv4Address(ip).packed
        lst = self.backend_ips.setdefault(packed, [])
        if svc not in lst:
            lst.append(svc)
        self.release_service(svc, now)

    def probe_result(self, svc: svc_mod.Service, name: str, ok: bool, now: float) -> None:
        svc.probe_result(name, ok, now)
        self.release_service(svc, now)

    def release_service(self, svc: svc_mod.Service, now: float) -> None:
        self._tell_activators(svc)
        if svc.releasable:
            self._service_actions(svc, list(svc.release(now)), now)
        self._service_signals(svc)

    def _tell_activators(self, svc: svc_mod.Service) -> None:
        """Activators learn when the service gains or loses its last ready backend (the
        core replays held packets itself; they forget theirs, and filter again once the
        service is dormant)."""
        if not svc.activators:
            return
        ready = svc.has_ready
        if ready == svc.activators_told:
            return
        svc.activators_told = ready
        ev = act_mod.BackendAvailable() if ready else act_mod.BackendUnavailable()
        for (port, _proto), host in svc.activators.items():
            host.process(port, [ev])

    def _from_backend(self, src: bytes, buf: bytearray, h: int, ip: int, total: int,
                      now: float) -> bytes:
        """A packet from a backend pod: un-NAT replies of service flows (the source
        becomes the VIP); returns the destination to route by."""
        partial = bool(h and buf[0] & F_NEEDS_CSUM)
        for svc in self.backend_ips[src]:
            if svc.reply(buf, ip, total, now, partial) == svc_mod.FORWARD:
                break
        return bytes(buf[ip + 16:ip + 20])

    def _to_service(self, svc: svc_mod.Service, port: Port, buf: bytearray, h: int, n: int,
                    ip: int, now: float) -> Port | None:
        if not _decrement_ttl(buf, ip):
            self._icmp_error(port, buf, ip, ICMP_TIME_EXCEEDED, 0, now, DROP_TTL)
            return None
        total = buf[ip + 2] << 8 | buf[ip + 3]
        partial = bool(h and buf[0] & F_NEEDS_CSUM)
        if svc.activators and not svc.has_ready and self._activator_drops(svc, buf, ip,
                                                                            total, now):
            port.drop(DROP_ACTIVATOR)
            return None
        v = svc.outbound(buf, ip, total, now, partial)
        out: Port | None = None
        if v == svc_mod.FORWARD:
            dpod = self.by_ip.get(bytes(buf[ip + 16:ip + 20]))
            if dpod is None:
                port.drop(DROP_NO_ROUTE)
            else:
                out = self._deliver(dpod, port, buf, h, n, ip, total, now)
        elif v == svc_mod.QUEUED:
            self.release_service(svc, now)
        elif v == svc_mod.HOLD_FULL:
            port.drop(DROP_SERVICE_HOLD_FULL)
        elif v == svc_mod.NO_BACKEND:
            port.drop(DROP_SERVICE_NO_BACKEND)
            resp = svc_mod.reject_response(bytes(buf[ip:ip + total]), partial)
            if resp is not None:
                self._emit_ip(port, resp, now)
        elif v == svc_mod.NOT_SERVICE:
            self._icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_PORT, now, DROP_SERVICE_PORT)
        elif v == svc_mod.TABLE_FULL:
            port.drop(DROP_SERVICE_TABLE_FULL)
        elif v != svc_mod.HELD:
            port.drop(DROP_MALFORMED)
        if svc.signals_pending:
            self._service_signals(svc)
        return out

    def _activator_drops(self, svc: svc_mod.Service, buf: bytearray, ip: int, total: int,
                         now: float) -> bool:
        """Ask the port's activator about a packet for a service with no ready backend:
        True when it says drop (an RST, a stray segment that must not wake anything).
        A failed activator (None) means plain hold-and-activate."""
        ihl = (buf[ip] & 15) << 2
        if buf[ip + 9] not in (PROTO_TCP, PROTO_UDP) or total < ihl + 4:
            return False
        proto = buf[ip + 9]
        dport = buf[ip + ihl + 2] << 8 | buf[ip + ihl + 3]
        host = svc.activators.get((dport, proto))
        if host is None:
            return False
        self._packet_id = (self._packet_id + 1) & 0xFFFFFFFF
        pid = self._packet_id
        flow = (_from_bytes(buf[ip + 12:ip + 20], "big") ^
                _from_bytes(buf[ip + ihl:ip + ihl + 4], "big")) & 0xFFFFFFFF
        actions = host.process(dport, [act_mod.Packet(pid, flow, bytes(buf[ip:ip + total]))])
        if actions is None:
            return False
        verdict = act_mod.HOLD
        wants = False
        for a in actions:
            if isinstance(a, act_mod.PacketDecision) and a.packet_id == pid:
                verdict = a.verdict
            elif isinstance(a, act_mod.SetBackendNeed) and a.need == act_mod.NEED_ACTIVE:
                wants = True
        # A held packet activates the service itself (with its flow); the activator's
        # own request matters when it asks for a backend without holding this packet.
        if wants and verdict != act_mod.HOLD:
            self._service_actions(svc, svc.activate(host.label, now), now)
        return verdict == act_mod.DROP

    def _deliver(self, dpod: Pod, port: Port, buf: bytearray, h: int, n: int, ip: int,
                 total: int, now: float) -> Port | None:
        """The tail of the fast path for a frame whose TTL is already done (the main path
        in receive() has these lines inline: it runs per packet)."""
        if dpod.remote is not None or dpod.port is None or dpod.l2 is None:
            self._hold(dpod, port, buf, h, n, ip, now)
            return None
        out = dpod.port
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

    def _service_actions(self, svc: svc_mod.Service, actions: list[svc_mod.Action],
                         now: float) -> None:
        for a in actions:
            if isinstance(a, svc_mod.Released):
                self._send_released(a, now)
            elif isinstance(a, svc_mod.HoldTimeout):
                if a.response is not None:
                    client = self.by_ip.get(a.response[16:20])
                    if client is not None and client.port is not None:
                        self._emit_ip(client.port, a.response, now)
                self._count(DROP_HOLD_TIMEOUT, 1)
            elif isinstance(a, svc_mod.Signal) and self.on_signal is not None:
                self.on_signal(svc.name, a)
        self._service_signals(svc)

    def _send_released(self, r: svc_mod.Released, now: float) -> None:
        h = r.off - packets.ETH_HLEN
        b = bytearray(r.frame)
        dpod = self.by_ip.get(bytes(b[r.off + 16:r.off + 20]))
        if dpod is None or h < 0:
            self._count(DROP_NO_ROUTE, 1)
            return
        if dpod.remote is not None or dpod.port is None or dpod.l2 is None:
            # Not deliverable yet (a pod on another worker, a port not attached, a MAC
            # not learned): the pod's own hold and ARP take over, as for any frame.
            self._hold(dpod, self._released_port, b, h, len(b), r.off, now)
            return
        b[h:h + 12] = dpod.l2
        self._emit(dpod.port, b, h, now)

    def _service_signals(self, svc: svc_mod.Service) -> None:
        if svc.signals_pending:
            sigs = svc.take_signals()
            if self.on_signal is not None:
                for sig in sigs:
                    self.on_signal(svc.name, sig)

    # --- pods on other workers -----------------------------------------------------------

    def _to_remote(self, worker: str, port: Port, buf: bytearray, h: int, n: int, ip: int,
                   now: float) -> None:
        """Hand a packet for a pod on another worker to the tunnel: super-frames are
        segmented and partial checksums completed first (the far side gets plain packets),
        TCP SYNs get their MSS clamped to the tunnel, and packets too big for the tunnel
        get fragmentation-needed (DF) or are fragmented."""
        send = self.tunnel_send
        assert send is not None
        try:
            if h and (buf[1] != GSO_NONE or buf[0] & F_NEEDS_CSUM):
                segs = [f[packets.ETH_HLEN:]
                        for f in gso.segment(memoryview(buf)[h:n], VnetHdr.parse(buf))]
            else:
                total = buf[ip + 2] << 8 | buf[ip + 3]
                segs = [bytes(buf[ip:ip + total])]
        except Malformed:
            port.drop(DROP_BAD_OFFLOAD)
            return
        mtu = self.tunnel_mtu
        out: list[bytes] = []
        for seg in segs:
            pkt = bytearray(seg)
            packets.clamp_mss(pkt, mtu - 40)
            if len(pkt) <= mtu:
                out.append(bytes(pkt))
            elif (pkt[6] << 8 | pkt[7]) & IP_DF:
                b = bytearray(h + packets.ETH_HLEN) + pkt
                self._icmp_error(port, b, h + packets.ETH_HLEN, ICMP_UNREACH,
                                 UNREACH_FRAG_NEEDED, now, DROP_TOO_BIG, mtu=mtu)
                break
            else:
                out.extend(packets.fragment(pkt, mtu))
        if out:
            send(worker, out, now)

    def receive_remote(self, worker: str, packet: bytes, now: float,
                       vnet_hdr: bytes | None = None) -> None:
        """A packet from a pod on another worker (already authenticated by the tunnel):
        deliver it to its local pod. Its source must be a pod that lives on that worker."""
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
        h = VNET_HDR_LEN if vnet_hdr is not None else 0
        b = bytearray(vnet_hdr or b"") + bytearray(packets.ETH_HLEN) + packet[:total]
        ip = h + packets.ETH_HLEN
        if spod.ip in self.backend_ips:  # a remote backend answering a service flow
            dpod = self.by_ip.get(self._from_backend(spod.ip, b, h, ip, total, now))
            if dpod is None or dpod.remote is not None:
                drops[DROP_NO_ROUTE] = drops.get(DROP_NO_ROUTE, 0) + 1
                return
        if not _decrement_ttl(b, ip):
            drops[DROP_TTL] = drops.get(DROP_TTL, 0) + 1
            return
        b[h + 12] = 8
        b[h + 13] = 0
        out = dpod.port
        if out is None or dpod.l2 is None:
            b[h + 6:h + 12] = self.gw_mac
            self._hold(dpod, self._released_port, b, h, len(b), ip, now)
            return
        b[h:h + 12] = dpod.l2
        if total > out.mtu and not self._fits(out, self._released_port, b, h, len(b), ip,
                                              ihl, total, now):
            return
        self._emit(out, b, h, now)

    # --- L3 ports: the local stack and the egress uplink --------------------------------

    def _to_l3(self, out: Port, port: Port, buf: bytearray, h: int, n: int,
               now: float) -> Port | None:
        """Hand a pod's frame to an L3 port: drop the Ethernet header in place (the
        virtio-net header moves up to sit right before the IP header)."""
        if out.hlen != h:
            self._emit(out, bytes(buf[:n]), h, now)
            return None
        if h:
            _shift_vnet(buf, 0, L3_OFF, -L3_OFF)
        out.tx_packets += 1
        out.tx_bytes += n - L3_OFF
        return out

    def _to_egress(self, port: Port, buf: bytearray, h: int, n: int, ip: int,
                   now: float) -> Port | None:
        nat = self.egress
        out = self.uplink
        assert nat is not None and out is not None
        if not _decrement_ttl(buf, ip):
            self._icmp_error(port, buf, ip, ICMP_TIME_EXCEEDED, 0, now, DROP_TTL)
            return None
        total = buf[ip + 2] << 8 | buf[ip + 3]
        verdict = nat.outbound(buf, ip, total, now, bool(h and buf[0] & F_NEEDS_CSUM))
        if verdict != verdicts.OK:
            if verdict == verdicts.DENIED:
                self._icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_ADMIN, now,
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
        port.rx_packets += 1
        port.rx_bytes += n - L3_OFF
        h = port.hlen
        ip = L3_OFF + h
        total = self._l3_header(port, buf, ip, n)
        if not total:
            return None
        src, dst = _ADDRS.unpack_from(buf, ip + 12)
        if src not in self.local_ips:
            port.drop(DROP_SPOOFED)
            return None
        return self._l3_to_pod(port, buf, h, n, ip, total, dst, now, False)

    def receive_egress(self, port: Port, buf: bytearray, n: int, now: float) -> Port | None:
        """A packet from the uplink addressed to this namespace's egress address (the
        shell demultiplexes by address): translate it back and deliver it to its pod."""
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
        if routed and not _decrement_ttl(buf, ip):
            port.drop(DROP_TTL)
            return None
        if h:
            _shift_vnet(buf, L3_OFF, 0, L3_OFF)
        buf[h + 6:h + 14] = self.gw_mac + b"\x08\x00"
        # The IP header now sits at h + 14, which is `ip` (L3_OFF == 14).
        return self._deliver(dpod, port, buf, h, n, ip, total, now)

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
                self._emit_ip(port, reply, now)
                return
        if proto in (PROTO_TCP, PROTO_UDP):
            self._icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_PORT, now, DROP_GATEWAY_PORT)
        else:
            port.drop(DROP_GATEWAY_PORT)

    def _hold(self, dpod: Pod, port: Port, buf: bytearray, h: int, n: int, ip: int,
              now: float) -> None:
        if dpod.remote is not None:
            if self.tunnel_send is None:
                self._icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_HOST, now,
                                 DROP_NO_TUNNEL)
            else:
                self._to_remote(dpod.remote, port, buf, h, n, ip, now)
            return
        if len(dpod.pending) >= self.hold_packets:
            port.drop(DROP_HOLD_OVERFLOW)
            return
        dpod.pending.append((now, h, bytes(buf[:n])))
        self._held[dpod] = None
        if dpod.port is not None and dpod.mac is None and now >= dpod.arp_due:
            self._arp_for(dpod, now)

    def _release(self, pod: Pod, now: float) -> None:
        out = pod.port
        if out is None or pod.mac is None or not pod.pending:
            return
        for _, h, frame in pod.pending:
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
                        self._count(reason, k)
                if not ok:
                    continue
            self._emit(out, b, h, now)
        pod.pending.clear()
        self._held.pop(pod, None)

    def _arp_for(self, pod: Pod, now: float) -> None:
        port = pod.port
        if port is None:
            return
        req = packets.arp_frame(ARP_REQUEST, self.gw_mac, self.gw_ip, b"\0" * 6, pod.ip,
                                BROADCAST_MAC)
        pod.arp_due = now + ARP_RETRY
        self._emit(port, req, 0, now)

    def _icmp_error(self, port: Port, buf: bytearray, ip: int, icmp_type: int, code: int,
                    now: float, reason: str, mtu: int = 0) -> None:
        """Drop the packet with `reason` and tell its sender, unless ICMP must stay quiet."""
        port.drop(reason)
        ihl = (buf[ip] & 15) << 2
        frag = (buf[ip + 6] << 8 | buf[ip + 7]) & 0x1FFF
        if frag or packets.is_icmp_error(memoryview(buf)[ip:], ihl):
            return
        src = _from_bytes(buf[ip + 12:ip + 16], "big")
        if src == 0 or src >> 28 == 0xE:
            return
        elapsed = now - self._icmp_last
        self._icmp_last = now
        self._icmp_tokens = min(ICMP_BURST, self._icmp_tokens + max(elapsed, 0.0) * ICMP_RATE)
        if self._icmp_tokens < 1.0:
            port.drop(DROP_ICMP_RATELIMIT)
            return
        self._icmp_tokens -= 1.0
        total = buf[ip + 2] << 8 | buf[ip + 3]
        msg = packets.icmp_error(self.gw_ip, memoryview(buf)[ip:ip + total], icmp_type, code,
                                 mtu=mtu)
        sender = self.by_ip.get(bytes(buf[ip + 12:ip + 16]))
        if sender is not None and sender.port is not None:
            self._emit_ip(sender.port, msg, now)

    def _emit_ip(self, port: Port, packet: bytes, now: float) -> None:
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
            frames = [_strip_l2(f, oh) for f in frames]
        for f in frames:
            out.tx_packets += 1
            out.tx_bytes += len(f)
            if out.capture is not None:
                out.capture(now, f[oh:], True)
            self.outputs.append((out, f))

    # --- timers --------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        t: float | None = self.egress.next_timer() if self.egress is not None else None
        for svc in self.services.values():
            st = svc.next_timer()
            if st is not None and (t is None or st < t):
                t = st
        for pod in self._held:
            if pod.pending:
                d = pod.pending[0][0] + self.hold_timeout
                t = d if t is None or d < t else t
            if pod.pending and pod.port is not None and pod.mac is None:
                t = pod.arp_due if t is None or pod.arp_due < t else t
        return t

    def handle_timer(self, now: float) -> None:
        """Expire held frames (their senders get ICMP host unreachable), retry ARP, and
        let egress NAT expire its flows."""
        if self.egress is not None:
            self.egress.handle_timer(now)
        for svc in list(self.services.values()):
            self._service_actions(svc, svc.handle_timer(now), now)
            self._tell_activators(svc)
        for pod in list(self._held):
            q = pod.pending
            # The same sum next_timer() computes, so handling a timer at its due time
            # always expires what made it due (now - timeout can round below it).
            while q and q[0][0] + self.hold_timeout <= now:
                _, h, frame = q.popleft()
                b = bytearray(frame)
                sender = self.by_ip.get(bytes(b[h + 26:h + 30]))
                if sender is not None and sender.port is not None:
                    self._icmp_error(sender.port, b, h + 14, ICMP_UNREACH, UNREACH_HOST, now,
                                     DROP_HOLD_TIMEOUT)
                else:
                    self._count(DROP_HOLD_TIMEOUT, 1)
            if not q:
                self._held.pop(pod, None)
            elif pod.port is not None and pod.mac is None and now >= pod.arp_due:
                self._arp_for(pod, now)

    # --- counters ------------------------------------------------------------------------

    def _count(self, reason: str, k: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + k

    def held(self) -> int:
        return sum(len(p.pending) for p in self.pods.values())


def _shift_vnet(buf: bytearray, src: int, dst: int, delta: int) -> None:
    """Move a virtio-net header from buf[src:] to buf[dst:], moving its offsets (which
    count from the start of the frame) by `delta` bytes, as when an Ethernet header is
    removed (-14) or added (+14) between the header and the IP packet."""
    hdr = bytes(buf[src:src + VNET_HDR_LEN])
    buf[dst:dst + VNET_HDR_LEN] = hdr
    hdr_len = hdr[2] | hdr[3] << 8
    if hdr_len:
        hdr_len = max(hdr_len + delta, 0)
        buf[dst + 2] = hdr_len & 0xFF
        buf[dst + 3] = hdr_len >> 8
    if hdr[0] & F_NEEDS_CSUM:
        start = max((hdr[6] | hdr[7] << 8) + delta, 0)
        buf[dst + 6] = start & 0xFF
        buf[dst + 7] = start >> 8


def _strip_l2(frame: bytes, h: int) -> bytes:
    """An L2 frame (with an h-byte virtio-net header) as an L3 port takes it."""
    if not h:
        return frame[packets.ETH_HLEN:]
    b = bytearray(frame)
    _shift_vnet(b, 0, L3_OFF, -L3_OFF)
    return bytes(b[L3_OFF:])


def _decrement_ttl(buf: bytearray, ip: int) -> bool:
    """TTL - 1 with the header checksum updated as Linux does (the router's main path
    has the same lines inline); False when the packet's time is up."""
    ttl = buf[ip + 8]
    if ttl <= 1:
        return False
    buf[ip + 8] = ttl - 1
    c = (buf[ip + 10] << 8 | buf[ip + 11]) + 0x100
    c = (c + (c >= 0xFFFF)) & 0xFFFF
    buf[ip + 10] = c >> 8
    buf[ip + 11] = c & 0xFF
    return True
