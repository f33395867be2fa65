"""The drop log behind `fabricd get drops` and `fabricd monitor`: headers from frames,
bursts folded, live sinks filtered and rate-limited, and the router feeding it."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from fabric.router import droplog
from fabric.router.droplog import DropLog, Sink, describe
from fabric.runtime.monitor import MonitorSubscription


def test_describe_tcp_udp_icmp_arp() -> None:
    tcp = bytes(Ether(src="02:00:00:00:00:01") / IP(src="10.9.9.9", dst="10.1.0.3", ttl=7)
                / TCP(sport=4000, dport=80, flags="SA"))
    d = describe(tcp, False)
    assert (d["src"], d["dst"], d["proto"], d["sport"], d["dport"], d["flags"], d["ttl"]) == (
        "10.9.9.9", "10.1.0.3", "tcp", 4000, 80, "SA", 7)
    assert d["src_mac"] == "02:00:00:00:00:01" and d["length"] == 40
    udp = bytes(IP(src="10.1.0.2", dst="8.8.8.8") / UDP(sport=5353, dport=53))
    assert describe(udp, True)["dport"] == 53
    icmp = bytes(IP(src="10.1.0.2", dst="10.1.0.9") / ICMP(type=8))
    assert describe(icmp, True)["icmp_type"] == 8
    arp = bytes(Ether() / ARP(op=1, psrc="10.1.0.66", pdst="10.1.0.1"))
    a = describe(arp, False)
    assert (a["proto"], a["op"], a["src"], a["dst"]) == ("arp", "request", "10.1.0.66",
                                                         "10.1.0.1")
    v6 = bytes(Ether(type=0x86DD) / (b"\x60" + bytes(39)))
    assert describe(v6, False)["ethertype"] == "ipv6"
    frag = bytes(IP(src="1.2.3.4", dst="5.6.7.8", frag=100, proto=6) / (b"x" * 20))
    assert "sport" not in describe(frag, True) and describe(frag, True)["fragment"]


def test_describe_never_raises_on_junk() -> None:
    rnd = random.Random(7)
    for _ in range(3000):
        head = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 100)))
        describe(head, rnd.random() < 0.5)
        describe(b"\x08\x00" * 6 + b"\x08\x00" + head, False)


def test_bursts_fold_and_ring_is_bounded() -> None:
    log = DropLog("blue", keep=4)
    for i in range(1000):
        log.record("a", "spoofed_source", b"", False, 100.0 + i * 0.0001)
    log.record("b", "no_route", b"", False, 100.5)
    entries = log.entries()
    assert [(e["pod"], e["reason"], e["count"]) for e in entries] == [
        ("b", "no_route", 1), ("a", "spoofed_source", 1000)]
    for i in range(10):
        log.record(f"p{i}", "ttl_expired", b"", False, 101.0)
    assert len(log.entries()) == 4 and log.recorded == 1011
    assert log.last_minute(101.0) == 1011
    assert log.last_minute(170.0) == 0  # a minute later, nothing is recent


def test_sink_filters_and_rate_limits() -> None:
    got: list[dict[str, Any]] = []
    log = DropLog("blue")
    log.sinks = [Sink(got.append, "a", "spoofed_source", 0.0)]
    log.record("b", "spoofed_source", b"", False, 0.0)
    log.record("a", "no_route", b"", False, 0.0)
    assert got == []
    for _ in range(1000):
        log.record("a", "spoofed_source", b"", False, 0.0)
    assert len(got) == droplog.SINK_BURST
    log.record("a", "spoofed_source", b"", False, 1.0)  # a second later: tokens again
    assert got[-1]["suppressed"] == 1000 - droplog.SINK_BURST
    assert got[-1]["kind"] == "drop" and got[-1]["namespace"] == "blue"


def test_monitor_subscription_attaches_and_detaches() -> None:
    async def main() -> list[dict[str, Any]]:
        log = DropLog("blue")
        sub = MonitorSubscription([log], None, None, asyncio.get_running_loop())
        assert len(log.sinks) == 1
        frame = bytes(IP(src="10.1.0.2", dst="10.1.0.3") / UDP(sport=1, dport=2))
        log.record("a", "no_route", frame, True, 5.0)
        first = await asyncio.wait_for(sub.__anext__(), 2)
        sub.close()
        assert log.sinks == []
        log.record("a", "no_route", frame, True, 6.0)  # nobody listens: nothing queued
        return [first]

    (event,) = asyncio.run(main())
    assert event["dst"] == "10.1.0.3" and event["ts"] > 1e9  # wall time
