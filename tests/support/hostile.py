"""Hostile traffic for the campaigns, the soak and the flood benchmarks, run inside a
namespace the test made: `python -m tests.support.hostile KIND [options]`.

Every generator is bounded by a count and a time, seeded (the seed is printed), and ends
by printing one JSON line with what it sent (and what the kernel refused), so the
caller can report figures and reproduce a failure with the same seed.

  frames     raw Ethernet frames on a pod's eth0 through AF_PACKET: scapy-built valid
             frames, then mutated, truncated, random; with and without a virtio-net
             header, offload flags right and wrong
  dns        DNS queries to a gateway: random and mutated over UDP, over TCP, a slowloris
             and a client that never reads its answers (modes run side by side)
  dnsprobe   a well-behaved client: one query every interval, latencies reported
  flood      UDP datagrams at a fixed rate: empty, garbage type-1 handshakes, mac1-valid
             initiations, DNS pointer chains
  tunnel     the underlay attacker: sniffs a tunnel's datagrams, then sends empty,
             truncated, oversized, replayed and forged datagrams and handshake floods
  resolver   a tiny upstream resolver: every A question gets 192.0.2.99
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import random
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

GATEWAY_MAC = "02:fb:00:00:00:01"
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_VNET_HDR = 15


def say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def mac_of(iface: str) -> bytes:
    with open(f"/sys/class/net/{iface}/address") as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


# --- mutations ---------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One of: bit flips, a random byte, truncation, random tail, a field overwritten."""
    b = bytearray(data)
    op = rng.randrange(6)
    if not b:
        return bytes(rng.randbytes(rng.randrange(1, 64)))
    if op == 0:
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 2:
        del b[rng.randrange(len(b)):]
    elif op == 3:
        b += rng.randbytes(rng.randrange(1, 200))
    elif op == 4:
        i = rng.randrange(len(b))
        b[i:i + 2] = rng.choice((b"\x00\x00", b"\xff\xff", b"\x7f\xff", b"\x80\x00",
                                 b"\x00\x01", b"\xc0\x0c"))
    else:
        i = rng.randrange(len(b))
        j = rng.randrange(len(b))
        b[i], b[j] = b[j], b[i]
    return bytes(b)


# --- frames from a pod ---------------------------------------------------------------------


def frame_corpus(me: bytes, my_ip: str, gw: str, peers: Sequence[str]) -> list[tuple[bytes, bytes]]:
    """(virtio-net header or b"", frame) pairs, valid or nearly so, built with scapy."""
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Dot1Q, Ether

    from fabric.net import vnet

    src = ":".join(f"{x:02x}" for x in me)
    eth = Ether(src=src, dst=GATEWAY_MAC)
    bcast = Ether(src=src, dst="ff:ff:ff:ff:ff:ff")
    other = peers[0]
    frames = [
        Ether(src=src, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=src, psrc=my_ip, pdst=gw),
        Ether(src=src, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=src, psrc=my_ip, pdst=other),
        Ether(src=src, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=src, psrc=other, pdst=gw),
        Ether(src=src, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=src, psrc="0.0.0.0",
                                                      pdst=my_ip),
        eth / IP(src=my_ip, dst=other) / ICMP(),
        eth / IP(src=my_ip, dst=gw) / ICMP(),
        eth / IP(src=my_ip, dst="198.51.100.7") / ICMP(),
        eth / IP(src=my_ip, dst="255.255.255.255") / UDP(dport=67),
        # DHCP: its own MAC (answered), another's (refused), truncated (malformed)
        bcast / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
        / BOOTP(chaddr=me + bytes(10)) / DHCP(options=[("message-type", "discover"), "end"]),
        bcast / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
        / BOOTP(chaddr=b"\x02\x00\x00\x00\x00\x99" + bytes(10))
        / DHCP(options=[("message-type", "request"), ("requested_addr", other), "end"]),
        bcast / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
        / (b"\x01\x01\x06" + b"\xff" * 40),
        eth / IP(src=my_ip, dst="224.0.0.251") / UDP(dport=5353),
        eth / IP(src=my_ip, dst=other) / UDP(sport=1234, dport=9) / (b"x" * 100),
        eth / IP(src=my_ip, dst=gw) / UDP(sport=3333, dport=53) / DNS(rd=1, qd=DNSQR(
            qname="b.shop.fabric.internal")),
        eth / IP(src=my_ip, dst=gw) / UDP(sport=3333, dport=9999) / b"hello",
        eth / IP(src=my_ip, dst=other) / TCP(sport=40000, dport=80, flags="S",
                                             options=[("MSS", 1460), ("WScale", 7)]),
        eth / IP(src=my_ip, dst=gw) / TCP(sport=40001, dport=53, flags="S"),
        eth / IP(src=my_ip, dst=other, options=[IPOption_RR()]) / ICMP(),
        eth / IP(src=my_ip, dst=other, flags="MF", frag=0) / UDP(dport=9) / (b"y" * 64),
        eth / IP(src=my_ip, dst=other, frag=185) / (b"z" * 64),
        eth / IP(src=my_ip, dst=other, ttl=1) / ICMP(),
        eth / IP(src=my_ip, dst=other, ttl=0) / ICMP(),
        eth / IP(src=other, dst=gw) / ICMP(),
        eth / IP(src="0.0.0.0", dst=other) / ICMP(),
        eth / IPv6(dst="fe80::1") / ICMP(),
        eth / Dot1Q(vlan=7) / IP(src=my_ip, dst=other) / ICMP(),
        Ether(src=src, dst=GATEWAY_MAC, type=0x88B5) / (b"\x00" * 46),
        eth / IP(src=my_ip, dst=other) / UDP(dport=9) / (b"j" * 8000),
    ]
    out = [(b"", bytes(f)) for f in frames]
    # Super-frames and checksum offload, as the kernel would hand them, then wrong.
    payload = b"p" * 30000
    tcp = bytes(eth / IP(src=my_ip, dst=other) / TCP(sport=40002, dport=5201, flags="PA")
                / payload)
    udp = bytes(eth / IP(src=my_ip, dst=other) / UDP(sport=40003, dport=9) / payload[:8000])
    hl = 14 + 20 + 20
    for gso_type, size in ((vnet.GSO_TCPV4, 1448), (vnet.GSO_TCPV4, 1),
                           (vnet.GSO_TCPV4, 536), (vnet.GSO_TCPV4 | vnet.GSO_ECN, 100),
                           (vnet.GSO_TCPV6, 1448), (vnet.GSO_UDP, 1000)):
        out.append((vnet.pack(vnet.F_NEEDS_CSUM, gso_type, hl, size, 34, 16), tcp))
    for size in (1400, 8, 1, 7):
        out.append((vnet.pack(vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, 42, size, 34, 6), udp))
    small = bytes(eth / IP(src=my_ip, dst=other) / UDP(sport=1, dport=9) / (b"c" * 10))
    for start, off in ((34, 6), (0, 0), (200, 6), (34, 0xFFF0), (1, 1)):
        out.append((vnet.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, start, off), small))
    out.append((vnet.pack(vnet.F_DATA_VALID), small))
    return out


def random_vnet(rng: random.Random) -> bytes:
    from fabric.net import vnet

    return vnet.pack(rng.choice((0, 1, 2, 3, 4, 0xFF)),
                     rng.choice((0, 1, 3, 4, 5, 0x81, 0x85, 0x7F, 0xFF)),
                     rng.choice((0, 14, 34, 54, 66, 200, 0xFFFF)),
                     rng.choice((0, 1, 7, 8, 535, 536, 1448, 9000, 0xFFFF)),
                     rng.choice((0, 14, 34, 60, 1000, 0xFFFF)),
                     rng.choice((0, 6, 16, 17, 0xFFFF)))


def run_frames(a: argparse.Namespace) -> None:
    rng = random.Random(a.seed)
    me = mac_of(a.iface)
    corpus = frame_corpus(me, a.ip, a.gateway, a.peers.split(","))
    plain = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    plain.bind((a.iface, 0))
    withhdr = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    withhdr.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    withhdr.bind((a.iface, 0))
    for s in (plain, withhdr):
        s.setblocking(False)
    say({"seed": a.seed, "corpus": len(corpus)})
    sent = {"plain": 0, "vnet": 0}
    refused: dict[str, int] = {}
    kinds: dict[str, int] = {}
    t0 = time.monotonic()
    i = 0
    while i < a.count and time.monotonic() - t0 < a.seconds:
        i += 1
        hdr, frame = corpus[rng.randrange(len(corpus))]
        r = rng.random()
        if r < 0.15:
            kind = "valid"
        elif r < 0.55:
            kind = "mutated"
            frame = mutate(rng, frame)
        elif r < 0.75:
            kind = "truncated"
            frame = frame[:rng.randrange(0, min(len(frame), 80))]
        else:
            kind = "random"
            frame = rng.randbytes(rng.randrange(0, 1515))
            if rng.random() < 0.5 and len(frame) >= 14:  # past the MAC check, at least
                frame = GATEWAY_MAC_BYTES + me + frame[12:]
        use_vnet = bool(hdr) or rng.random() < 0.4
        if use_vnet:
            if not hdr or rng.random() < 0.3:
                hdr = random_vnet(rng) if rng.random() < 0.8 else bytes(10)
            elif rng.random() < 0.3:
                hdr = mutate(rng, hdr)[:10].ljust(10, b"\0")
            sock, data, side = withhdr, hdr + frame, "vnet"
        else:
            sock, data, side = plain, frame, "plain"
        kinds[kind] = kinds.get(kind, 0) + 1
        try:
            sock.send(data)
            sent[side] += 1
        except BlockingIOError:
            select.select([], [sock], [], 0.01)
        except OSError as e:
            key = f"{side}:{errno.errorcode.get(e.errno or 0, e.errno)}"
            refused[key] = refused.get(key, 0) + 1
    say({"done": True, "seed": a.seed, "tried": i, "sent": sent, "refused": refused,
         "kinds": kinds, "seconds": round(time.monotonic() - t0, 2)})


GATEWAY_MAC_BYTES = bytes.fromhex(GATEWAY_MAC.replace(":", ""))


# --- DNS -----------------------------------------------------------------------------------


def qname(name: str) -> bytes:
    return b"".join(bytes((len(p),)) + p.encode() for p in name.strip(".").split(".")) + b"\0"


def query(name: str, qtype: int = 1, qid: int = 0x1234, edns: bool = False) -> bytes:
    msg = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    msg += qname(name) + struct.pack("!HH", qtype, 1)
    if edns:
        msg += b"\0" + struct.pack("!HHIH", 41, 4096, 0, 0)
    return msg


def chain_query(size: int, name: str = "web-1.shop.fabric.internal") -> bytes:
    """The review's H1 query: records in the additional section, each name a compression
    pointer to the record before it (a quadratic walk for a naive parser)."""
    body = bytearray(qname(name) + struct.pack("!HH", 1, 1))
    prev = deepest = 12
    recs = 0
    while 12 + len(body) + 12 <= size:
        here = 12 + len(body)
        target = prev if prev < 0x4000 else deepest
        body += struct.pack("!H", 0xC000 | target) + struct.pack("!HHIH", 1, 1, 0, 0)
        if here < 0x4000:
            deepest = here
        prev = here
        recs += 1
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, recs) + bytes(body)


def dns_corpus(names: Sequence[str]) -> list[bytes]:
    out = []
    for n in names:
        for qt in (1, 28, 12, 16, 255, 33, 6):
            out.append(query(n, qt, edns=qt == 255))
    out += [
        query("example.com"), query("a" * 63 + ".example.com", 1, edns=True),
        query("1.0.46.10.in-addr.arpa", 12), query("x." + names[0], 1),
        chain_query(1472), chain_query(512),
        # a question whose name points at itself, and one pointing into the header
        struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack("!HH", 1, 1),
        struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\xc0\x02" + struct.pack("!HH", 1, 1),
        struct.pack("!HHHHHH", 7, 0x0100, 0, 0, 0, 0),
        struct.pack("!HHHHHH", 7, 0x0100, 2, 0, 0, 0) + qname(names[0]) + b"\0\1\0\1" * 2,
        struct.pack("!HHHHHH", 7, 0x8180, 1, 1, 0, 0) + qname(names[0]) + b"\0\1\0\1",
        struct.pack("!HHHHHH", 7, 0x2800, 1, 0, 0, 0) + qname(names[0]) + b"\0\1\0\1",
        struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 1) + qname(names[0]) + b"\0\1\0\1"
        + b"\0" + struct.pack("!HHIH", 41, 512, 0x00010000, 0),  # EDNS version 1
    ]
    return out


def _dns_udp(a: argparse.Namespace, rng: random.Random, corpus: list[bytes],
             stats: dict[str, int], stop: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    n = 0
    while n < a.count and time.monotonic() < stop:
        n += 1
        q = corpus[rng.randrange(len(corpus))]
        r = rng.random()
        if r < 0.5:
            q = mutate(rng, q)
        elif r < 0.6:
            q = rng.randbytes(rng.randrange(0, 600))
        try:
            s.sendto(q, (a.server, 53))
            stats["udp_sent"] += 1
        except BlockingIOError:
            time.sleep(0.001)
        except OSError:
            stats["udp_errors"] += 1
        if n % 64 == 0:
            try:
                while True:
                    s.recv(65535)
                    stats["udp_answers"] += 1
            except OSError:
                pass
            if a.rate:
                time.sleep(64 / a.rate)
    s.close()


def _dns_tcp(a: argparse.Namespace, rng: random.Random, corpus: list[bytes],
             stats: dict[str, int], stop: float) -> None:
    while time.monotonic() < stop and stats["tcp_conns"] < a.count // 50:
        try:
            s = socket.create_connection((a.server, 53), timeout=2)
        except OSError:
            stats["tcp_connect_errors"] += 1
            time.sleep(0.05)
            continue
        stats["tcp_conns"] += 1
        try:
            for _ in range(rng.randrange(1, 20)):
                q = corpus[rng.randrange(len(corpus))]
                if rng.random() < 0.5:
                    q = mutate(rng, q)
                r = rng.random()
                if r < 0.05:
                    s.sendall(struct.pack("!H", len(q) + 50) + q)  # a lying length
                    break
                if r < 0.08:
                    s.sendall(struct.pack("!H", 0))
                    continue
                if r < 0.1:
                    s.sendall(b"\xff\xff" + rng.randbytes(rng.randrange(0, 3000)))
                    break
                s.sendall(struct.pack("!H", len(q)) + q)
                stats["tcp_queries"] += 1
            s.settimeout(0.2)
            try:
                while s.recv(65535):
                    stats["tcp_answer_chunks"] += 1
            except OSError:
                pass
        except OSError:
            stats["tcp_errors"] += 1
        finally:
            s.close()


def _dns_slowloris(a: argparse.Namespace, stats: dict[str, int], stop: float) -> None:
    """`a.slowloris` connections, each announcing a 512-byte query and dripping it one
    byte every two seconds; one the server closes is opened again."""
    def connect() -> socket.socket | None:
        try:
            s = socket.create_connection((a.server, 53), timeout=2)
            s.send(b"\x02\x00")
            return s
        except OSError:
            stats["slowloris_refused"] += 1
            return None

    conns = [c for c in (connect() for _ in range(a.slowloris)) if c is not None]
    stats["slowloris_open"] = len(conns)
    while time.monotonic() < stop:
        for i, s in enumerate(conns):
            try:
                s.send(b"\x00")
            except OSError:
                s.close()
                stats["slowloris_closed_by_server"] += 1
                conns[i] = connect() or s
        time.sleep(min(2.0, max(0.0, stop - time.monotonic())))
    for s in conns:
        s.close()


def _dns_noread(a: argparse.Namespace, stats: dict[str, int], stop: float,
                names: Sequence[str]) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.connect((a.server, 53))
    except OSError:
        stats["noread_connect_errors"] += 1
        return
    s.setblocking(False)
    msg = b"".join(struct.pack("!H", len(q)) + q
                   for q in (query(n, 255, qid=i, edns=True) for i, n in enumerate(names)))
    pending = b""
    while time.monotonic() < stop:
        if not pending:
            pending = msg
        try:
            n = s.send(pending)
            pending = pending[n:]
            stats["noread_bytes"] += n
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            stats["noread_closed_by_server"] += 1
            break
    s.close()


def run_dns(a: argparse.Namespace) -> None:
    rng = random.Random(a.seed)
    names = a.names.split(",")
    corpus = dns_corpus(names)
    stats: dict[str, int] = {k: 0 for k in (
        "udp_sent", "udp_errors", "udp_answers", "tcp_conns", "tcp_queries",
        "tcp_connect_errors", "tcp_errors", "tcp_answer_chunks", "slowloris_open",
        "slowloris_refused", "slowloris_closed_by_server", "noread_bytes",
        "noread_closed_by_server", "noread_connect_errors")}
    say({"seed": a.seed, "corpus": len(corpus), "modes": a.modes})
    stop = time.monotonic() + a.seconds
    threads = []
    modes = a.modes.split(",")
    if "slowloris" in modes:
        threads.append(threading.Thread(target=_dns_slowloris, args=(a, stats, stop)))
    if "noread" in modes:
        threads.append(threading.Thread(target=_dns_noread, args=(a, stats, stop, names)))
    if "tcp" in modes:
        threads.append(threading.Thread(target=_dns_tcp, args=(
            a, random.Random(a.seed + 1), corpus, stats, stop)))
    if "udp" in modes:
        threads.append(threading.Thread(target=_dns_udp, args=(a, rng, corpus, stats, stop)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    say({"done": True, "seed": a.seed, **stats})


def run_dnsprobe(a: argparse.Namespace) -> None:
    """One query every interval (UDP, and every tenth over TCP); latencies in ms."""
    udp_lat: list[float] = []
    tcp_lat: list[float] = []
    lost = tcp_failed = 0
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(a.timeout)
    stop = time.monotonic() + a.seconds
    i = 0
    print(json.dumps({"ready": True}), flush=True)
    while time.monotonic() < stop:
        i += 1
        q = query(a.name, qid=i & 0xFFFF)
        t = time.monotonic()
        try:
            s.sendto(q, (a.server, 53))
            while True:
                data = s.recv(65535)
                if data[:2] == q[:2]:
                    break
            udp_lat.append((time.monotonic() - t) * 1000)
        except OSError:
            lost += 1
        if i % 10 == 0:
            t = time.monotonic()
            try:
                with socket.create_connection((a.server, 53), timeout=a.timeout) as c:
                    c.settimeout(a.timeout)
                    c.sendall(struct.pack("!H", len(q)) + q)
                    head = c.recv(2)
                    if len(head) < 2:
                        raise OSError("closed")
                    tcp_lat.append((time.monotonic() - t) * 1000)
            except OSError:
                tcp_failed += 1
        time.sleep(a.interval)

    def pct(v: list[float], p: float) -> float | None:
        if not v:
            return None
        v = sorted(v)
        return round(v[min(len(v) - 1, int(len(v) * p / 100))], 2)

    say({"done": True, "queries": i, "answered": len(udp_lat), "lost": lost,
         "p50_ms": pct(udp_lat, 50), "p99_ms": pct(udp_lat, 99),
         "max_ms": round(max(udp_lat), 2) if udp_lat else None,
         "tcp": len(tcp_lat), "tcp_failed": tcp_failed, "tcp_p50_ms": pct(tcp_lat, 50),
         "tcp_max_ms": round(max(tcp_lat), 2) if tcp_lat else None})


# --- UDP floods ----------------------------------------------------------------------------


def paced(send: Callable[[int], None], rate: float, seconds: float, count: int) -> dict[str, Any]:
    """Call send(i) `rate` times a second (0: as fast as it goes) until `seconds` or
    `count`; what was achieved."""
    t0 = time.monotonic()
    sent = errors = 0
    batch = max(1, int(rate / 1000)) if rate else 256
    while sent < count:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        if rate:
            due = t0 + sent / rate
            if now < due:
                time.sleep(due - now)
        for _ in range(batch):
            try:
                send(sent)
            except OSError:
                errors += 1
            sent += 1
    took = time.monotonic() - t0
    return {"sent": sent, "errors": errors, "seconds": round(took, 3),
            "rate": round(sent / took) if took > 0 else 0}


def mac1_initiations(pub: bytes, n: int, rng: random.Random) -> list[bytes]:
    """Initiations whose mac1 is right (anyone who knows the public key can make them)
    and whose Noise part is garbage: each costs the responder a check, a cookie or a DH."""
    from tunnels.cookie import hash32, mac16
    from tunnels.messages import INDEX_HEADER, LABEL_MAC1, MAC_LEN, NOISE_MSG1_LEN

    key = hash32(LABEL_MAC1 + pub)
    out = []
    for _ in range(n):
        body = INDEX_HEADER.pack(1, rng.getrandbits(32)) + rng.randbytes(NOISE_MSG1_LEN)
        out.append(body + mac16(key, body) + bytes(MAC_LEN))
    return out


def garbage_initiations(n: int, rng: random.Random) -> list[bytes]:
    from tunnels.messages import INITIATION_LEN

    return [b"\x01\0\0\0" + rng.randbytes(INITIATION_LEN - 4) for _ in range(n)]


def flood_payloads(kind: str, rng: random.Random, pub: bytes | None) -> list[bytes]:
    if kind == "empty":
        return [b""]
    if kind == "garbage-init":
        return garbage_initiations(4096, rng)
    if kind == "mac1-init":
        if pub is None:
            raise SystemExit("mac1-init needs --pubkey")
        return mac1_initiations(pub, 4096, rng)
    if kind == "dns-chain":
        return [chain_query(1472)]
    raise SystemExit(f"unknown flood kind {kind}")


class MultiSender:
    """sendmmsg(2) through ctypes: a batch of prebuilt datagrams to one address in one
    system call, so that Python's own cost per datagram is nearly nothing and 20k/s
    take a few per cent of a CPU (what the kernel's UDP path costs stays)."""

    def __init__(self, sock: socket.socket, dst: tuple[str, int], payloads: list[bytes],
                 batch: int) -> None:
        import ctypes

        class Iovec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

        class Msghdr(ctypes.Structure):
            _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                        ("iov", ctypes.POINTER(Iovec)), ("iovlen", ctypes.c_size_t),
                        ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                        ("flags", ctypes.c_int)]

        class Mmsghdr(ctypes.Structure):
            _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]

        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = sock.fileno()
        addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", dst[1]) + \
            socket.inet_aton(dst[0]) + bytes(8)
        self._addr = ctypes.create_string_buffer(addr, len(addr))
        self._bufs = [ctypes.create_string_buffer(p, max(1, len(p))) for p in payloads]
        self.batch = batch
        self._vecs = []
        n = len(payloads)
        for start in range(0, n, batch):  # batches cycling through the payloads
            iovs = (Iovec * batch)()
            msgs = (Mmsghdr * batch)()
            for j in range(batch):
                k = (start + j) % n
                iovs[j].base = ctypes.cast(self._bufs[k], ctypes.c_void_p)
                iovs[j].len = len(payloads[k])
                msgs[j].hdr.name = ctypes.cast(self._addr, ctypes.c_void_p)
                msgs[j].hdr.namelen = len(addr)
                msgs[j].hdr.iov = ctypes.pointer(iovs[j])
                msgs[j].hdr.iovlen = 1
            self._vecs.append((iovs, msgs))
        self._i = 0

    def send(self) -> int:
        """One batch; how many the kernel took (a full socket buffer takes fewer)."""
        _, msgs = self._vecs[self._i]
        self._i = (self._i + 1) % len(self._vecs)
        r = self._libc.sendmmsg(self._fd, msgs, self.batch, 0)
        return max(0, r)


_stop = threading.Event()


def run_flood(a: argparse.Namespace) -> None:
    """`a.rate` datagrams a second (in batches of a millisecond's worth) until `seconds`,
    `count` or SIGTERM; then the rate achieved."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: _stop.set())
    rng = random.Random(a.seed)
    host, _, port = a.target.rpartition(":")
    pub = base64.b64decode(a.pubkey) if a.pubkey else None
    payloads = flood_payloads(a.kind, rng, pub)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    batch = max(1, min(64, int(a.rate / 1000))) if a.rate else 64
    sender = MultiSender(s, (host, int(port)), payloads, batch)
    say({"ready": True, "seed": a.seed, "kind": a.kind, "batch": batch})
    cpu0 = time.process_time()
    t0 = time.monotonic()
    sent = tried = 0
    while tried < a.count and not _stop.is_set():
        now = time.monotonic()
        if now - t0 >= a.seconds:
            break
        if a.rate:
            due = t0 + tried / a.rate
            if now < due:
                time.sleep(due - now)
        sent += sender.send()
        tried += batch
    took = time.monotonic() - t0
    say({"done": True, "kind": a.kind, "sent": sent, "refused": tried - sent,
         "seconds": round(took, 3), "rate": round(sent / took) if took > 0 else 0,
         "cpu_seconds": round(time.process_time() - cpu0, 2)})


# --- the tunnel's underlay -----------------------------------------------------------------


def sniff(iface: str, dst: tuple[str, int], seconds: float, limit: int) -> list[bytes]:
    """UDP payloads sent to `dst` seen on `iface` (both directions) for `seconds`."""
    # ETH_P_ALL: a socket bound to one protocol sees only what comes in, not what leaves.
    # With a virtio-net header, a UDP GSO batch leaving shows its segment size.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.bind((iface, ETH_P_ALL))
    s.settimeout(0.2)
    want = socket.inet_aton(dst[0])
    got: list[bytes] = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop and len(got) < limit:
        try:
            pkt = s.recv(65535)
        except TimeoutError:
            continue
        gso_size = struct.unpack_from("<H", pkt, 6)[0]
        ethertype = struct.unpack_from("!H", pkt, 10 + 12)[0] if len(pkt) >= 24 else 0
        pkt = pkt[10 + 14:]
        if ethertype != ETH_P_IP or len(pkt) < 28 or pkt[9] != 17 or pkt[16:20] != want:
            continue
        ihl = (pkt[0] & 15) * 4
        if struct.unpack_from("!H", pkt, ihl + 2)[0] != dst[1]:
            continue
        payload = bytes(pkt[ihl + 8:])
        step = gso_size or len(payload) or 1
        got += [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
    s.close()
    return got


def run_tunnel(a: argparse.Namespace) -> None:
    from tunnels.messages import DATA_HEADER, INITIATION_LEN, MAX_DATAGRAM

    rng = random.Random(a.seed)
    host, _, port = a.target.rpartition(":")
    dst = (host, int(port))
    pub = base64.b64decode(a.pubkey)
    captured: list[bytes] = []
    if a.sniff:
        say({"phase": "sniffing", "seconds": a.sniff_seconds})
        captured = sniff(a.sniff, dst, a.sniff_seconds, 2000)
    data = [d for d in captured if d[:1] == b"\x04"]
    inits = [d for d in captured if d[:1] == b"\x01" and len(d) == INITIATION_LEN]
    say({"phase": "attacking", "captured_data": len(data), "captured_initiations": len(inits)})
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    mac1 = mac1_initiations(pub, 1024, rng)
    garbage = garbage_initiations(1024, rng)

    def forged() -> bytes:
        if data and rng.random() < 0.8:  # a live receiver index, a counter ahead, no key
            _, index, counter = DATA_HEADER.unpack_from(data[rng.randrange(len(data))])
            n = rng.randrange(32, 1400)
            return DATA_HEADER.pack(4, index, counter + rng.randrange(1, 1 << 20)) + \
                rng.randbytes(n)
        return DATA_HEADER.pack(4, rng.getrandbits(32), rng.getrandbits(64)) + \
            rng.randbytes(rng.randrange(16, 1400))

    makers: dict[str, Callable[[], bytes]] = {
        "empty": lambda: b"",
        "truncated": lambda: rng.choice((b"\x01", b"\x04\0\0", b"\x01\0\0\0" + bytes(20),
                                         b"\x02\0\0\0" + bytes(40), b"\x04\0\0\0" + bytes(10),
                                         b"\x03\0\0\0" + bytes(30))),
        "oversized": lambda: b"\x04\0\0\0" + rng.randbytes(MAX_DATAGRAM - 4),
        "random": lambda: rng.randbytes(rng.randrange(1, 1500)),
        "mutated": lambda: mutate(rng, rng.choice(data or garbage)),
        "replayed": lambda: rng.choice(data + inits) if data or inits else b"",
        "forged": forged,
        "garbage_init": lambda: garbage[rng.randrange(len(garbage))],
        "mac1_init": lambda: mac1[rng.randrange(len(mac1))],
    }
    weights = {"empty": 10, "truncated": 10, "oversized": 0.2, "random": 10, "mutated": 10,
               "replayed": 10 if data or inits else 0, "forged": 15, "garbage_init": 15,
               "mac1_init": 15}
    names = list(makers)
    w = [weights[k] for k in names]
    sent = dict.fromkeys(names, 0)
    errors = 0
    t0 = time.monotonic()
    i = 0
    while i < a.count and time.monotonic() - t0 < a.seconds:
        kind = rng.choices(names, w)[0]
        try:
            s.sendto(makers[kind](), dst)
            sent[kind] += 1
        except OSError:
            errors += 1
        i += 1
        if a.rate and i % 50 == 0:
            due = t0 + i / a.rate
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
    say({"done": True, "seed": a.seed, "sent": sent, "errors": errors,
         "seconds": round(time.monotonic() - t0, 2)})


# --- an upstream resolver ------------------------------------------------------------------


def run_resolver(a: argparse.Namespace) -> None:
    host, _, port = a.listen.rpartition(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    say({"ready": True})
    while True:
        data, addr = s.recvfrom(65535)
        if len(data) < 17:
            continue
        end = data.find(b"\0", 12)
        if end < 0 or len(data) < end + 5:
            continue
        question = data[12:end + 5]
        qtype = struct.unpack_from("!H", data, end + 1)[0]
        answers = 1 if qtype == 1 else 0
        reply = data[:2] + struct.pack("!HHHHH", 0x8180, 1, answers, 0, 0) + question
        if answers:
            reply += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + bytes((192, 0, 2, 99))
        s.sendto(reply, addr)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.hostile")
    sub = ap.add_subparsers(dest="kind_", required=True)
    f = sub.add_parser("frames")
    f.add_argument("--iface", default="eth0")
    f.add_argument("--ip", required=True)
    f.add_argument("--gateway", required=True)
    f.add_argument("--peers", required=True, help="comma-separated neighbour addresses")
    d = sub.add_parser("dns")
    d.add_argument("--server", required=True)
    d.add_argument("--names", required=True, help="comma-separated names in the zone")
    d.add_argument("--modes", default="udp,tcp,slowloris,noread")
    d.add_argument("--slowloris", type=int, default=300)
    d.add_argument("--rate", type=float, default=0.0, help="UDP queries/s (0: flat out)")
    p = sub.add_parser("dnsprobe")
    p.add_argument("--server", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--timeout", type=float, default=1.0)
    fl = sub.add_parser("flood")
    fl.add_argument("--target", required=True)
    fl.add_argument("--kind", required=True,
                    choices=("empty", "garbage-init", "mac1-init", "dns-chain"))
    fl.add_argument("--rate", type=float, default=0.0)
    fl.add_argument("--pubkey")
    t = sub.add_parser("tunnel")
    t.add_argument("--target", required=True)
    t.add_argument("--pubkey", required=True, help="the target worker's public key (base64)")
    t.add_argument("--sniff", help="interface to capture the tunnel's own datagrams on")
    t.add_argument("--sniff-seconds", type=float, default=3.0)
    t.add_argument("--rate", type=float, default=0.0)
    r = sub.add_parser("resolver")
    r.add_argument("--listen", required=True)
    for sp in (f, d, p, fl, t, r):
        sp.add_argument("--seed", type=int, default=1)
        sp.add_argument("--count", type=int, default=10**9)
        sp.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args(argv)
    {"frames": run_frames, "dns": run_dns, "dnsprobe": run_dnsprobe, "flood": run_flood,
     "tunnel": run_tunnel, "resolver": run_resolver}[a.kind_](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
