"""DHCP through the real `Fabric` and data-plane thread, a pod on a socketpair: answered
by default, turned off and on again by re-applying the namespace (in place, the pod's
port kept, counters kept), and counted in the metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, UDP

from fabric.config.render import namespace_to_dict
from fabric.net import packets
from fabric.runtime.worker import Fabric
from tests.support.pods import SocketPod

CIDR = "10.10.0.0/24"


def discover(pod: SocketPod) -> None:
    """A DISCOVER from 0.0.0.0 to the broadcast address, as a client without an address."""
    msg = bytes(BOOTP(op=1, xid=7, chaddr=pod.macb + bytes(10))
                / DHCP(options=[("message-type", "discover"), "end"]))
    frame = packets.eth_header(packets.BROADCAST_MAC, pod.macb, packets.ETH_P_IP) + \
        packets.udp_packet(b"\0\0\0\0", b"\xff\xff\xff\xff", 68, 67, msg)
    pod.sock.send(frame)


def ping_gateway(pod: SocketPod, seq: int) -> None:
    pod.send_ip(packets.icmp_echo(pod.ipb, packets.ip_bytes("10.10.0.1"), 9, seq, b"x"))


def lease_of(pkt: bytes) -> int:
    opts = dict(o for o in IP(pkt)[DHCP].options if isinstance(o, tuple))
    return int(opts["lease_time"])


def counters(metrics: list[Any]) -> dict[str, float]:
    fam = next(m for m in metrics if m.name == "fabric_dhcp_total")
    return {lab["counter"]: v for lab, v in fam.samples if lab["namespace"] == "shop"}


def test_dhcp_follows_the_namespace_spec() -> None:
    pod = SocketPod("vm", "10.10.0.2", "02:00:0a:0a:00:02")

    async def main() -> None:
        async with Fabric(worker_id="w1", local_stack=False) as fab:
            ns: dict[str, Any] = {"name": "shop", "cidr": CIDR}
            await fab.apply_namespace(ns)
            await fab.attach_pod("shop", pod.spec(), fd=pod.take_fd(), vnet=False)
            discover(pod)
            got = await asyncio.to_thread(pod.recv_ip)
            assert got is not None and IP(got)[UDP].dport == 68
            assert IP(got)[BOOTP].yiaddr == "10.10.0.2" and lease_of(got) == 86400
            # off: the DISCOVER is dropped (a spoofed source); the echo reply that follows
            # it in order is the first thing the pod gets back
            # (the namespace as it is, the pod included, with only `dhcp` changed)
            ns = namespace_to_dict(fab.namespaces["shop"].spec)
            await fab.apply_namespace({**ns, "dhcp": False})
            discover(pod)
            ping_gateway(pod, 1)
            got = await asyncio.to_thread(pod.recv_ip)
            assert got is not None and IP(got).haslayer(ICMP), IP(got).summary()
            # on again with another lease time
            await fab.apply_namespace({**ns, "dhcp": {"lease": "2h"}})
            discover(pod)
            got = await asyncio.to_thread(pod.recv_ip)
            assert got is not None and lease_of(got) == 7200
            assert fab.namespaces["shop"].pods["vm"].port is not None  # never re-attached
            c = counters(await fab.metrics())
            assert (c["discover"], c["offer"]) == (2, 2)  # the counters outlive the off

    asyncio.run(asyncio.wait_for(main(), 60))
    pod.close()
