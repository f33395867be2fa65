"""The embedding API and its shells, driven without root: the real `Fabric`, namespaces,
data-plane thread, service manager, probes and tunnel link, with pods on socketpairs
and the tunnel on 127.0.0.1. No network namespace, TAP or TUN is needed."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP

from fabric.config.specs import TunnelPeerSpec, TunnelSpec
from fabric.errors import ConfigError, FabricError
from fabric.net import packets
from fabric.net.packets import TCP_SYN
from fabric.runtime.events import Event, Subscription
from fabric.runtime.prometheus import render
from fabric.runtime.worker import Fabric
from gateway import resolvconf
from tests.support.packets import valid
from tests.support.pods import SocketPod
from tests.support.procstat import Metrics
from tests.support.promcheck import problems, promtool
from tunnels.keys import generate_keypair

CIDR = "10.10.0.0/24"


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


@asynccontextmanager
async def fabric(**kw: Any) -> AsyncIterator[Fabric]:
    async with Fabric(worker_id=kw.pop("worker_id", "w1"), local_stack=False, **kw) as fab:
        yield fab


async def attach(fab: Fabric, ns: str, pod: SocketPod) -> dict[str, Any]:
    return await fab.attach_pod(ns, pod.spec(), fd=pod.take_fd(), vnet=pod.vnet)


async def next_event(sub: Subscription, kind: str, timeout: float = 5.0) -> Event:
    async def wait() -> Event:
        async for ev in sub:
            if ev.kind == kind:
                return ev
        raise AssertionError("subscription closed")
    return await asyncio.wait_for(wait(), timeout)


def test_a_starting_fabric_sweeps_resolv_conf_files_whose_netns_is_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a kill -9 the files of pods in netns that are gone stay behind: the next
    start removes them (gateway.resolvconf.sweep_stale), and leaves a live netns' file."""
    etc, netns_dir = tmp_path / "etc-netns", tmp_path / "run-netns"
    netns_dir.mkdir()
    monkeypatch.setattr(resolvconf, "ETC_NETNS", str(etc))
    monkeypatch.setattr(resolvconf, "RUN_NETNS", str(netns_dir))
    resolvconf.write("gone", "shop/a", "10.10.0.1", ["shop.fabric.internal"])
    resolvconf.write("alive", "shop/b", "10.10.0.1", ["shop.fabric.internal"])
    (netns_dir / "alive").touch()

    async def main() -> None:
        async with fabric():
            assert not (etc / "gone").exists()
            assert (etc / "alive" / "resolv.conf").exists()

    run(main)


def test_two_pods_talk_through_the_data_plane() -> None:
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02")
    b = SocketPod("b", "10.10.0.3", "02:00:0a:0a:00:03", vnet=True)

    async def main() -> None:
        async with fabric() as fab:
            await fab.apply_namespace({"name": "shop", "id": 7, "cidr": CIDR})
            await attach(fab, "shop", a)
            view = await attach(fab, "shop", b)
            assert view["attached"] and view["kind"] == "fd"
            for i in range(20):
                a.udp("10.10.0.3", 5000, 6000, b"n%d" % i)
            got = [await asyncio.to_thread(b.recv_ip) for _ in range(20)]
            assert [bytes(IP(p)[UDP].payload) for p in got if p] == [
                b"n%d" % i for i in range(20)]  # all of them, in order
            p = valid(got[0])
            assert p.ttl == 63 and p.src == "10.10.0.2"
            # Ping the gateway: without a local stack the router answers itself.
            a.send_ip(packets.icmp_echo(a.ipb, packets.ip_bytes("10.10.0.1"), 9, 1, b"hi"))
            reply = await asyncio.to_thread(a.recv_ip)
            assert reply is not None and IP(reply)[ICMP].type == 0
            rows = await fab.get_pods("shop")
            assert {r["name"]: r["rx_packets"] for r in rows}["a"] == 21
    try:
        run(main)
    finally:
        a.close()
        b.close()


def test_a_dormant_service_wakes_runs_its_hook_and_releases_in_order(tmp_path: Path) -> None:
    client = SocketPod("client", "10.10.0.2", "02:00:0a:0a:00:02")
    web = SocketPod("web", "10.10.0.3", "02:00:0a:0a:00:03")
    marker = tmp_path / "hook"
    hook = (f"{sys.executable} -c \"import os; open({str(marker)!r}, 'w').write("
            f"os.environ['FABRIC_SERVICE'] + ' ' + os.environ['FABRIC_EVENT'])\"")

    async def main() -> None:
        async with fabric() as fab:
            sub = fab.events()
            await fab.apply_namespace({"name": "shop", "id": 7, "cidr": CIDR})
            await attach(fab, "shop", client)
            await fab.attach_pod("shop", {**web.spec(), "ready": False}, fd=web.take_fd(),
                                 vnet=False)
            row = await fab.apply_service("shop", {
                "name": "site", "ip": "10.10.0.100", "backends": ["web"],
                "ports": [{"port": 80, "target_port": 8080}], "on_activate": hook,
                "idle_timeout": "1s"})
            assert row["state"] == "dormant"
            for sport in (40000, 40001, 40002):
                client.send_ip(packets.tcp_packet(client.ipb, packets.ip_bytes("10.10.0.100"),
                                                  sport, 80, 1, 0, TCP_SYN))
            ev = await next_event(sub, "activate")
            assert ev.fields["service"] == "site" and ev.fields["reason"] == "held"
            for _ in range(50):
                if marker.exists():
                    break
                await asyncio.sleep(0.05)
            assert marker.read_text() == "site activate"
            (row,) = await fab.get_services("shop")
            assert row["state"] == "activating" and row["held_packets"] == 3
            fab.set_ready("shop", "web", True)  # no probe without a local stack
            got = [await asyncio.to_thread(web.recv_ip) for _ in range(3)]
            assert [IP(p)[TCP].sport for p in got if p] == [40000, 40001, 40002]
            assert all(IP(p).dst == "10.10.0.3" and IP(p)[TCP].dport == 8080 for p in got if p)
            # The backend resets them: no open flow is left, so the service goes idle.
            for p in got:
                assert p is not None
                ip = IP(p)
                web.send_ip(packets.tcp_packet(web.ipb, client.ipb, 8080, ip[TCP].sport, 0,
                                               ip[TCP].seq + 1, 0x14))
            rsts = [await asyncio.to_thread(client.recv_ip) for _ in range(3)]
            assert all(p is not None and IP(p).src == "10.10.0.100" for p in rsts)
            ev = await next_event(sub, "idle", timeout=5.0)
            assert ev.fields["service"] == "site"
            sub.close()
            # The wake in the metrics: one wake, through its hook, readiness and release.
            text = render(await fab.metrics())
            assert problems(text) == []
            m = Metrics(text)
            lab = {"namespace": "shop", "service": "site"}
            assert m.get("fabric_service_wakes_total", **lab) == 1
            assert m.get("fabric_service_wake_seconds_count", **lab) == 1
            for phase in ("hook", "ready", "release"):
                assert m.get("fabric_service_wake_phase_seconds_count", **lab,
                             phase=phase) == 1, phase
            assert m.get("fabric_service_hooks_total", **lab, result="run") == 1
            assert m.by("fabric_service_state", "state", **lab) == {
                "dormant": 1, "activating": 0, "ready": 0, "idle": 0}  # parked after idle
    try:
        run(main)
    finally:
        client.close()
        web.close()


def test_hold_timeout_is_exact() -> None:
    """A held frame's timeout fires at its deadline (a timerfd, not a polling tick)."""
    client = SocketPod("client", "10.10.0.2", "02:00:0a:0a:00:02")
    web = SocketPod("web", "10.10.0.3", "02:00:0a:0a:00:03")

    async def main() -> None:
        async with fabric() as fab:
            await fab.apply_namespace({"name": "shop", "id": 7, "cidr": CIDR})
            await attach(fab, "shop", client)
            await fab.attach_pod("shop", {**web.spec(), "ready": False}, fd=web.take_fd(),
                                 vnet=False)
            await fab.apply_service("shop", {
                "name": "site", "ip": "10.10.0.100", "backends": ["web"],
                "ports": [{"port": 80, "target_port": 8080}], "hold": {"timeout": "150ms"}})
            lateness = []
            for sport in range(41000, 41005):
                t0 = time.monotonic()
                client.send_ip(packets.tcp_packet(client.ipb, packets.ip_bytes("10.10.0.100"),
                                                  sport, 80, 1, 0, TCP_SYN))
                rst = await asyncio.to_thread(client.recv_ip, 3.0)
                took = time.monotonic() - t0
                assert rst is not None and IP(rst)[TCP].flags & 0x04, "an RST answers it"
                assert took >= 0.15
                lateness.append(took - 0.15)
            assert sorted(lateness)[2] < 0.05, lateness  # median: well under the old 100 ms
    try:
        run(main)
    finally:
        client.close()
        web.close()


def test_pods_on_two_workers_through_the_tunnel_on_loopback() -> None:
    k1, p1 = generate_keypair()
    k2, p2 = generate_keypair()
    port1, port2 = _free_udp_port(), _free_udp_port()
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02")
    b = SocketPod("b", "10.10.0.3", "02:00:0a:0a:00:03")

    def spec(me: int, key: bytes, peer: str, peer_pub: bytes, peer_port: int) -> TunnelSpec:
        return TunnelSpec(listen=("127.0.0.1", me), private_key=key,
                          peers=(TunnelPeerSpec(peer, peer_pub, ("127.0.0.1", peer_port)),))

    async def main() -> None:
        async with fabric(worker_id="w1", tunnel=spec(port1, k1, "w2", p2, port2)) as w1, \
                fabric(worker_id="w2", tunnel=spec(port2, k2, "w1", p1, port1)) as w2:
            for fab, local, other, worker in ((w1, a, b, "w2"), (w2, b, a, "w1")):
                await fab.apply_namespace({
                    "name": "shop", "id": 7, "cidr": CIDR,
                    "pods": [{"name": other.name, "ip": other.ip, "worker": worker}]})
                await attach(fab, "shop", local)
            for i in range(10):
                a.udp("10.10.0.3", 5000, 6000, b"x%d" % i)
            got = [await asyncio.to_thread(b.recv_ip, 5.0) for _ in range(10)]
            assert [bytes(IP(p)[UDP].payload) for p in got if p] == [
                b"x%d" % i for i in range(10)]
            b.udp("10.10.0.2", 6000, 5000, b"back")
            back = await asyncio.to_thread(a.recv_ip, 5.0)
            assert back is not None and bytes(IP(back)[UDP].payload) == b"back"
            (peer,) = await w1.get_peers()
            assert peer["id"] == "w2" and peer["last_handshake"] is not None
            names = {m.name for m in await w1.metrics()}
            assert {"fabric_tunnel_events_total", "fabric_tunnel_drops_total",
                    "fabric_tunnel_handshake_seconds", "fabric_peer_rx_bytes_total"} <= names
            texts = [render(await w.metrics()) for w in (w1, w2)]
            for text in texts:
                assert problems(text) == []
                assert promtool(text) in ("", None)
            # Both started a handshake; at least one of them completed its own.
            assert sum(Metrics(t).get("fabric_tunnel_handshake_seconds_count")
                       for t in texts) >= 1
    try:
        run(main)
    finally:
        a.close()
        b.close()


def _free_udp_port() -> int:
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def test_cross_namespace_rules_hold_for_runtime_attaches() -> None:
    """An interface used by one namespace cannot be attached in another, neither by a pod
    PUT nor by two namespace applies racing each other: the check runs under the lock."""
    def ns(name: str, cidr: str, iface: str) -> dict[str, Any]:
        return {"name": name, "cidr": cidr,
                "pods": [{"name": "p", "ip": cidr.replace("0/24", "2"), "interface": iface}]}

    async def main() -> None:
        async with fabric() as fab:
            # The interface does not exist here: the pod is retried, its claim stands.
            await fab.apply_namespace(ns("a", "10.20.0.0/24", "fbx-shared"))
            await fab.apply_namespace({"name": "b", "cidr": "10.21.0.0/24"})
            with pytest.raises(ConfigError, match="fbx-shared is already used by pod p in "
                               "namespace a"):
                await fab.attach_pod("b", {"name": "q", "ip": "10.21.0.2",
                                           "interface": "fbx-shared"})
            assert "q" not in fab.namespaces["b"].pods
            got = await asyncio.gather(
                fab.apply_namespace(ns("c", "10.22.0.0/24", "fbx-race")),
                fab.apply_namespace(ns("d", "10.23.0.0/24", "fbx-race")),
                return_exceptions=True)
            assert sum(isinstance(g, ConfigError) for g in got) == 1, got
            assert len({"c", "d"} & set(fab.namespaces)) == 1
    run(main)


def test_a_failed_replace_keeps_the_pod_as_it_was_and_the_api_checks_the_pool() -> None:
    """A PUT that would replace a pod with one whose port cannot be made leaves the old
    pod in the table, in DNS and in the spec; concurrent PUTs cannot both take an
    address; a namespace overlapping the egress pool is refused on the API path too."""
    from fabric.config.specs import EgressSpec

    async def main() -> None:
        async with fabric() as fab:
            await fab.apply_namespace({"name": "a", "cidr": "10.20.0.0/24", "pods": [
                {"name": "p", "ip": "10.20.0.2", "interface": "fbx-not-yet"}]})
            with pytest.raises(FabricError):  # no such netns: the strict attach fails
                await fab.attach_pod("a", {"name": "p", "ip": "10.20.0.9",
                                           "netns": "fbx-missing-netns"})
            ns = fab.namespaces["a"]
            assert [(p.name, str(p.ip)) for p in ns.spec.pods] == [("p", "10.20.0.2")]
            assert ns.pods["p"].spec.interface == "fbx-not-yet"
            assert ns.records.names()["p"].exploded == "10.20.0.2"
            # A pod on a handed-in fd cannot come back: it goes from the spec and DNS too.
            await attach(fab, "a", SocketPod("h", "10.20.0.3", "02:00:0a:14:00:03"))
            with pytest.raises(FabricError):
                await fab.attach_pod("a", {"name": "h", "ip": "10.20.0.3",
                                           "netns": "fbx-missing-netns"})
            assert "h" not in ns.pods and "h" not in ns.records.names()
            assert [p.name for p in ns.spec.pods] == ["p"]
            got = await asyncio.gather(*(
                attach(fab, "a", SocketPod(f"q{i}", "10.20.0.7", f"02:00:0a:14:00:1{i}"))
                for i in range(2)), return_exceptions=True)
            assert sum(isinstance(g, ConfigError) for g in got) == 1, got
            assert sum(1 for p in ns.spec.pods if str(p.ip) == "10.20.0.7") <= 1
            # (no TUN without root: the spec alone is what the check reads)
            fab.egress = EgressSpec(tun="fbx-egress", pool=IPv4Network("100.64.0.0/16"))
            with pytest.raises(ConfigError, match="overlaps the egress pool"):
                await fab.apply_namespace({"name": "x", "cidr": "100.64.3.0/24"})
    run(main)


def test_named_peer_endpoints_are_never_resolved_on_the_data_plane(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer given as `localhost:port` works, and no lookup ever runs on the packet
    thread (a blocking getaddrinfo there would freeze every namespace)."""
    lookups: list[str] = []
    real = socket.getaddrinfo

    def spy(*args: Any, **kw: Any) -> Any:
        lookups.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    k1, p1 = generate_keypair()
    k2, p2 = generate_keypair()
    port1, port2 = _free_udp_port(), _free_udp_port()
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02")
    b = SocketPod("b", "10.10.0.3", "02:00:0a:0a:00:03")

    def spec(me: int, key: bytes, peer: str, pub: bytes, host: str, port: int) -> TunnelSpec:
        return TunnelSpec(listen=("127.0.0.1", me), private_key=key,
                          peers=(TunnelPeerSpec(peer, pub, (host, port)),))

    async def main() -> None:
        async with fabric(worker_id="w1", tunnel=spec(port1, k1, "w2", p2, "localhost",
                                                      port2)) as w1, \
                fabric(worker_id="w2", tunnel=spec(port2, k2, "w1", p1, "127.0.0.1",
                                                   port1)) as w2:
            for fab, local, other, worker in ((w1, a, b, "w2"), (w2, b, a, "w1")):
                await fab.apply_namespace({
                    "name": "shop", "id": 7, "cidr": CIDR,
                    "pods": [{"name": other.name, "ip": other.ip, "worker": worker}]})
                await attach(fab, "shop", local)
            a.udp("10.10.0.3", 5000, 6000, b"named")
            got = await asyncio.to_thread(b.recv_ip, 5.0)
            assert got is not None and bytes(IP(got)[UDP].payload) == b"named"
            (peer,) = await w1.get_peers()
            assert peer["endpoint"] == f"127.0.0.1:{port2}"
            await w1._refresh_endpoints()  # the periodic lookup, also off the thread
            # An unresolvable name: the peer keeps its last good address.
            await w1.set_peer({"id": "w2", "public_key": base64.b64encode(p2).decode(),
                               "endpoint": "fbx-no-such-host.invalid:51820"})
            (peer,) = await w1.get_peers()
            assert peer["endpoint"] == f"127.0.0.1:{port2}"
    try:
        run(main)
    finally:
        a.close()
        b.close()
    assert lookups, "the name was never looked up"
    assert "fabric-dataplane" not in lookups, lookups


def test_the_shell_suite_needs_no_privileges() -> None:
    """When make test runs this suite as an ordinary user, it really is one."""
    if os.environ.get("FABRICD_UNPRIVILEGED") == "1":
        assert os.geteuid() != 0
        with open("/proc/self/status") as f:
            caps = {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        assert int(caps["CapEff"], 16) == 0
