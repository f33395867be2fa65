"""End-to-end tests of the pod port shells (TAP and AF_PACKET) in throwaway namespaces.

The test process plays the fabric worker: ports are created from a thread that joined a
private "worker" namespace (netns_util.call_in), and the pods are further namespaces. The
frames the data plane will see are checked byte by byte: 10-byte virtio_net_hdr + Ethernet.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from fabric.errors import PortError
from fabric.ports.afpacket import PacketPort
from fabric.ports.tap import TapPort
from tests.e2e import netns_util
from tests.e2e.netns_util import call_in, popen_in, run_in

_reason = netns_util.missing_prerequisites()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

VNET_HDR = 10
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
GSO_NONE = 0
GSO_TCPV4 = 1
BUF = 1 << 17

POD_MAC = "02:aa:00:00:00:02"
GW_MAC = "02:00:00:00:00:01"

_created: list[str] = []


def mac_bytes(mac: str) -> bytes:
    return bytes(int(b, 16) for b in mac.split(":"))


def arp_reply(src_mac: str, src_ip: str, dst_mac: str, dst_ip: str) -> bytes:
    """vnet header (no offload) + Ethernet + ARP reply, built by hand."""
    vnet = bytes(VNET_HDR)
    eth = mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 2)
    arp += mac_bytes(src_mac) + socket.inet_aton(src_ip)
    arp += mac_bytes(dst_mac) + socket.inet_aton(dst_ip)
    return vnet + eth + arp


def eth_type(frame: bytes) -> int:
    return int(struct.unpack_from("!H", frame, VNET_HDR + 12)[0])


def eth_src(frame: bytes) -> bytes:
    return frame[VNET_HDR + 6 : VNET_HDR + 12]


def eth_dst(frame: bytes) -> bytes:
    return frame[VNET_HDR : VNET_HDR + 6]


def vnet_fields(frame: bytes) -> tuple[int, int, int, int, int, int]:
    """flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (little-endian host)."""
    return struct.unpack_from("<BBHHHH", frame, 0)  # type: ignore[return-value]


def is_arp_request_for(ip: str) -> Callable[[bytes], bool]:
    def match(frame: bytes) -> bool:
        if eth_type(frame) != ETH_P_ARP:
            return False
        op = struct.unpack_from("!H", frame, VNET_HDR + 14 + 6)[0]
        tpa = frame[VNET_HDR + 14 + 24 : VNET_HDR + 14 + 28]
        return bool(op == 1 and tpa == socket.inet_aton(ip))

    return match


def is_icmp_to(dst_mac: str) -> Callable[[bytes], bool]:
    def match(frame: bytes) -> bool:
        return (
            eth_type(frame) == ETH_P_IP
            and eth_dst(frame) == mac_bytes(dst_mac)
            and frame[VNET_HDR + 14 + 9] == 1
        )

    return match


def read_frame(fd: int, match: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    """Read frames from a port fd until one matches; os.readv gives one frame per call."""
    buf = bytearray(BUF)
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            n = os.readv(fd, [buf])
        except BlockingIOError:
            continue
        frame = bytes(buf[:n])
        assert n >= VNET_HDR + 14, f"short frame ({n} bytes)"
        if match(frame):
            return frame
        seen.append(f"{n}B type={eth_type(frame):#06x}")
    raise AssertionError(f"no matching frame within {timeout}s; saw: {seen}")


def drain(fd: int) -> list[bytes]:
    frames: list[bytes] = []
    buf = bytearray(BUF)
    while True:
        try:
            n = os.readv(fd, [buf])
        except BlockingIOError:
            return frames
        frames.append(bytes(buf[:n]))


def links(ns: str) -> dict[str, dict[str, object]]:
    out = run_in(ns, "ip", "-j", "-d", "addr", "show").stdout
    return {item["ifname"]: item for item in json.loads(out)}


def neigh_lladdr(ns: str, ip: str, dev: str) -> str | None:
    out = run_in(ns, "ip", "-j", "neigh", "show", ip, "dev", dev).stdout
    entries = json.loads(out) if out.strip() else []
    return entries[0].get("lladdr") if entries else None


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def own_children() -> list[int]:
    """PIDs whose parent is this process (leaked helpers, e.g. pyroute2 netns forks)."""
    me = str(os.getpid())
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me:
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="module", autouse=True)
def no_leaks() -> Iterator[None]:
    """After all tests: every namespace we made is gone and no helper process survives."""
    yield
    left = [n for n in _created if os.path.exists(netns_util.ns_path(n))]
    for name in left:
        netns_util.delete_netns(name)
    assert not left, f"namespaces left behind: {left}"
    assert wait_for(lambda: not own_children()), f"child processes leaked: {own_children()}"


def _ns() -> Iterator[str]:
    with netns_util.test_netns("fbt") as name:
        _created.append(name)
        yield name


@pytest.fixture
def worker() -> Iterator[str]:
    yield from _ns()


@pytest.fixture
def pod_a() -> Iterator[str]:
    yield from _ns()


@pytest.fixture
def pod_b() -> Iterator[str]:
    yield from _ns()


def make_tap(worker: str, pod_ns: str, ip: str, mac: str = POD_MAC, **kw: object) -> TapPort:
    """TapPort.create as a worker living in `worker` would call it."""
    args = dict(ip=ip, prefixlen=24, gateway=ip.rsplit(".", 1)[0] + ".1", mac=mac, mtu=1500)
    args.update(kw)
    return call_in(worker, TapPort.create, "pod", pod_ns, **args)


def make_veth(worker: str, pod_ns: str, ip: str, mac: str = POD_MAC) -> str:
    """A veth with our end `fbv0` in the worker and the pod end as eth0 in the pod."""
    run_in(worker, "ip", "link", "add", "fbv0", "type", "veth",
           "peer", "name", "eth0", "netns", pod_ns)  # fmt: skip
    run_in(pod_ns, "ip", "link", "set", "eth0", "address", mac, "up")
    run_in(pod_ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
    return "fbv0"


def arp_roundtrip(port_fd: int, pod_ns: str, pod_ip: str, gw_ip: str) -> None:
    """Pod pings the gateway: we must read its ARP request (vnet hdr + Ethernet from the
    pod's MAC), answer it, and then see the echo request addressed to our answer."""
    ping = popen_in(pod_ns, "ping", "-c1", "-W2", gw_ip)
    try:
        req = read_frame(port_fd, is_arp_request_for(gw_ip))
        flags, gso_type, *_ = vnet_fields(req)
        assert gso_type == GSO_NONE
        assert eth_src(req) == mac_bytes(POD_MAC)
        assert eth_dst(req) == b"\xff" * 6
        n = os.write(port_fd, arp_reply(GW_MAC, gw_ip, POD_MAC, pod_ip))
        assert n == VNET_HDR + 42
        echo = read_frame(port_fd, is_icmp_to(GW_MAC))
        assert eth_src(echo) == mac_bytes(POD_MAC)
    finally:
        ping.communicate(timeout=10)
    assert neigh_lladdr(pod_ns, gw_ip, "eth0") == GW_MAC


def test_tap_port_configures_pod_and_moves_frames(worker: str, pod_a: str) -> None:
    port = make_tap(worker, pod_a, "10.99.0.2", mtu=1400)
    try:
        assert (port.vnet, port.gso, port.name, port.mac, port.mtu) == (
            True, True, "eth0", POD_MAC, 1400)  # fmt: skip
        assert os.get_blocking(port.fd) is False

        pod_links = links(pod_a)
        assert set(pod_links) == {"lo", "eth0"}
        eth0 = pod_links["eth0"]
        assert eth0["address"] == POD_MAC
        assert eth0["mtu"] == 1400
        assert "UP" in eth0["flags"]  # type: ignore[operator]
        addrs = [(a["local"], a["prefixlen"]) for a in eth0["addr_info"]  # type: ignore[attr-defined]
                 if a["family"] == "inet"]  # fmt: skip
        assert addrs == [("10.99.0.2", 24)]
        assert "UP" in pod_links["lo"]["flags"]  # type: ignore[operator]
        routes = json.loads(run_in(pod_a, "ip", "-j", "route", "show", "default").stdout)
        assert [(r["gateway"], r["dev"]) for r in routes] == [("10.99.0.1", "eth0")]
        # Offloads reached the device, so the pod's stack will hand us TSO super-frames.
        features = run_in(pod_a, "ethtool", "-k", "eth0").stdout
        assert "tcp-segmentation-offload: on" in features
        # Nothing stays behind in the worker namespace under the temporary name.
        assert set(links(worker)) == {"lo"}

        arp_roundtrip(port.fd, pod_a, "10.99.0.2", "10.99.0.1")
    finally:
        port.close()


def test_tap_close_removes_interface(worker: str, pod_a: str) -> None:
    port = make_tap(worker, pod_a, "10.99.0.2")
    assert "eth0" in links(pod_a)
    port.close()
    assert wait_for(lambda: "eth0" not in links(pod_a))
    port.close()  # idempotent
    assert port.closed


def test_tap_missing_netns_raises_and_leaves_nothing(worker: str) -> None:
    missing = "fbt-missing-" + os.urandom(3).hex()
    with pytest.raises(PortError, match="does not exist"):
        make_tap(worker, missing, "10.99.0.2")
    with pytest.raises(PortError, match="does not exist"):
        make_tap(worker, f"/run/netns/{missing}", "10.99.0.2")
    with pytest.raises(PortError, match="not a namespace"):
        make_tap(worker, "/etc/hostname", "10.99.0.2")
    assert not os.path.exists(netns_util.ns_path(missing)), "must never create a netns"
    assert set(links(worker)) == {"lo"}


def test_tap_accepts_netns_by_path(worker: str, pod_a: str) -> None:
    port = make_tap(worker, netns_util.ns_path(pod_a), "10.99.0.2")
    try:
        assert links(pod_a)["eth0"]["address"] == POD_MAC
    finally:
        port.close()


def test_tap_name_clash_in_pod_fails_cleanly(worker: str, pod_a: str) -> None:
    first = make_tap(worker, pod_a, "10.99.0.2")
    try:
        with pytest.raises(PortError, match="already exists"):
            make_tap(worker, pod_a, "10.99.0.3", mac="02:aa:00:00:00:03")
        # The second TAP reached the pod under its temporary name and must be gone again.
        assert wait_for(lambda: set(links(pod_a)) == {"lo", "eth0"})
        assert set(links(worker)) == {"lo"}
        assert links(pod_a)["eth0"]["address"] == POD_MAC
    finally:
        first.close()


def test_tap_from_fd_adopts_ready_fd(worker: str, pod_a: str) -> None:
    made = make_tap(worker, pod_a, "10.99.0.2")
    adopted = TapPort.from_fd(os.dup(made.fd), vnet=True, mtu=1500)
    try:
        assert (adopted.vnet, adopted.gso, adopted.name) == (True, True, "eth0")
        with pytest.raises(PortError, match="IFF_VNET_HDR"):
            TapPort.from_fd(adopted.fd, vnet=False)
        # A non-TUN fd (a VMM shim's socketpair) is taken as declared; a closed one is not.
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        shim = TapPort.from_fd(a.detach(), vnet=True, mtu=9000)
        try:
            assert (shim.vnet, shim.gso, shim.mtu) == (True, True, 9000)
            assert os.get_blocking(shim.fd) is False
        finally:
            shim.close()
            b.close()
        with pytest.raises(PortError, match="not an open file descriptor"):
            TapPort.from_fd(1 << 30, vnet=True)  # far above any open fd
    finally:
        adopted.close()
        made.close()
    assert wait_for(lambda: "eth0" not in links(pod_a))


def test_packet_port_moves_frames(worker: str, pod_b: str) -> None:
    ifname = make_veth(worker, pod_b, "10.98.0.2")
    port = call_in(worker, PacketPort.open, ifname)
    try:
        assert (port.vnet, port.gso, port.name, port.mtu) == (True, True, ifname, 1500)
        assert os.get_blocking(port.fd) is False
        ours = links(worker)[ifname]
        assert "UP" in ours["flags"]  # type: ignore[operator]
        # Promiscuous membership shows as the counter, not the user-visible PROMISC flag.
        assert ours["promiscuity"] == 1
        sysctl = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
        assert run_in(worker, "cat", sysctl).stdout.strip() == "1"

        arp_roundtrip(port.fd, pod_b, "10.98.0.2", "10.98.0.1")

        # Frames the worker's own stack sends on the interface are not ours to forward.
        drain(port.fd)
        rx_before = pod_rx_packets(pod_b)
        run_in(worker, "ip", "addr", "add", "10.97.0.1/24", "dev", ifname)
        run_in(worker, "ping", "-c1", "-W1", "10.97.0.9", check=False)
        assert pod_rx_packets(pod_b) > rx_before, "the host's ARP should reach the pod"
        leaked = [f for f in drain(port.fd) if is_arp_request_for("10.97.0.9")(f)]
        assert not leaked, "PACKET_IGNORE_OUTGOING should hide host-sent frames"
    finally:
        port.close()
    port.close()


def pod_rx_packets(ns: str) -> int:
    out = json.loads(run_in(ns, "ip", "-j", "-s", "link", "show", "eth0").stdout)
    return int(out[0]["stats64"]["rx"]["packets"])


def test_packet_port_refuses_host_interfaces(worker: str, pod_b: str) -> None:
    """An `interface:` typo must not hand a tenant the host's uplink, loopback or the
    fabric's own devices; a refused open changes nothing, a closed port gives IPv6 back."""
    ifname = make_veth(worker, pod_b, "10.98.0.2")
    sysctl = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    assert run_in(worker, "cat", sysctl).stdout.strip() == "0"
    with pytest.raises(PortError, match="loopback"):
        call_in(worker, PacketPort.open, "lo")
    with pytest.raises(PortError, match="belongs to the fabric"):
        call_in(worker, PacketPort.open, ifname, frozenset({ifname}))
    run_in(worker, "ip", "link", "set", ifname, "up")
    run_in(worker, "ip", "route", "add", "10.96.0.0/24", "dev", ifname)
    with pytest.raises(PortError, match="routes 10.96.0.0 through it"):
        call_in(worker, PacketPort.open, ifname)
    run_in(worker, "ip", "route", "del", "10.96.0.0/24", "dev", ifname)
    run_in(worker, "ip", "addr", "add", "10.97.0.1/24", "dev", ifname)
    with pytest.raises(PortError, match=r"addresses of this host \(10.97.0.1\)"):
        call_in(worker, PacketPort.open, ifname)
    assert run_in(worker, "cat", sysctl).stdout.strip() == "0", "a refused open changed it"
    run_in(worker, "ip", "addr", "flush", "dev", ifname)
    port = call_in(worker, PacketPort.open, ifname)
    assert run_in(worker, "cat", sysctl).stdout.strip() == "1"
    call_in(worker, port.close)
    assert run_in(worker, "cat", sysctl).stdout.strip() == "0", "close should give IPv6 back"


@pytest.mark.parametrize("kind", ["bridge", "bond"])
def test_packet_port_refuses_a_bridge_or_bond_port(worker: str, pod_b: str, kind: str) -> None:
    """docker's host end of a container's veth sits in docker0 with no address of its
    own: taking it as a pod port would steal the container's traffic. Refused, naming the
    master; out of the master it is accepted."""
    ifname = make_veth(worker, pod_b, "10.98.0.2")
    master = f"fbt-{kind}0"
    made = run_in(worker, "ip", "link", "add", master, "type", kind, check=False)
    if made.returncode != 0:
        pytest.skip(f"this kernel cannot make a {kind}: {made.stderr.strip()}")
    run_in(worker, "ip", "link", "set", ifname, "master", master)
    with pytest.raises(PortError, match=f"it is a port of {kind} {master}"):
        call_in(worker, PacketPort.open, ifname)
    run_in(worker, "ip", "link", "set", ifname, "nomaster")
    port = call_in(worker, PacketPort.open, ifname)
    call_in(worker, port.close)


def test_packet_port_missing_interface(worker: str) -> None:
    with pytest.raises(PortError, match="does not exist"):
        call_in(worker, PacketPort.open, "fbv-nope")


class Relay:
    """A two-port wire, the smallest data plane: copy frames verbatim, vnet header included,
    and record what went through so the test can see GSO super-frames."""

    def __init__(self, a: int, b: int) -> None:
        self.peer = {a: b, b: a}
        self.seen: list[tuple[int, int, int]] = []  # (length, gso_type, gso_size)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        buf = bytearray(BUF)
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(list(self.peer), [], [], 0.1)
                for fd in ready:
                    try:
                        n = os.readv(fd, [buf])
                    except BlockingIOError:
                        continue
                    _, gso_type, _, gso_size, _, _ = struct.unpack_from("<BBHHHH", buf)
                    self.seen.append((n, gso_type, gso_size))
                    try:
                        os.write(self.peer[fd], memoryview(buf)[:n])
                    except BlockingIOError:
                        pass  # full queue: drop, like a real wire
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.settimeout(20); n = 0
while (d := c.recv(1 << 16)):
    n += len(d)
print(n)
"""

CLIENT = """
import socket, sys, time
for _ in range(100):
    try:
        c = socket.create_connection((sys.argv[1], 5001), timeout=20); break
    except OSError:
        time.sleep(0.05)
c.sendall(bytes(int(sys.argv[2]))); c.close()
"""


def tcp_transfer(server_ns: str, server_ip: str, client_ns: str, size: int) -> int:
    server = popen_in(server_ns, sys.executable, "-c", SERVER, server_ip)
    try:
        time.sleep(0.2)
        run_in(client_ns, sys.executable, "-c", CLIENT, server_ip, str(size), timeout=30)
        out, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
        return int(out)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_tcp_between_tap_and_packet_ports_uses_gso(worker: str, pod_a: str, pod_b: str) -> None:
    """TCP pod A (TAP) <-> pod B (veth/AF_PACKET) through a verbatim relay: both port kinds
    speak the same vnet header, and TCP crosses as super-frames larger than the MTU."""
    tap = make_tap(worker, pod_a, "10.96.0.2", mac="02:aa:00:00:00:0a")
    pkt = call_in(worker, PacketPort.open, make_veth(worker, pod_b, "10.96.0.3"))
    try:
        size = 8 << 20
        with Relay(tap.fd, pkt.fd) as relay:
            assert tcp_transfer(pod_a, "10.96.0.2", pod_b, size) == size
            assert tcp_transfer(pod_b, "10.96.0.3", pod_a, size) == size
        assert not relay.errors, relay.errors
        big = [s for s in relay.seen if s[0] > VNET_HDR + 14 + 1500]
        assert big, "expected GSO super-frames larger than the MTU"
        assert all(gso_type == GSO_TCPV4 and gso_size > 0 for _, gso_type, gso_size in big)
        assert max(n for n, _, _ in big) <= VNET_HDR + 14 + 65535
    finally:
        tap.close()
        pkt.close()
