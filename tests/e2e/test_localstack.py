"""End-to-end tests of the local stack: a private kernel namespace behind a TUN fd.

The test process plays the router: it writes IPv4 packets (after a 10-byte virtio-net
header) into the TUN fd and reads what the kernel inside the stack sends back. Stacks are
created from a thread that joined a throwaway worker namespace (fabric.ports.netlink.run_in_netns)
although unshare() makes a fresh namespace wherever it is called: nothing here may touch
the test machine's own namespace, and it is also how the daemon runs.

Observed on kernel 6.18 with TUNSETOFFLOAD(CSUM|TSO4|TSO6|ECN): UDP replies and SYN-ACKs
come out with VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start 20 (relative to the IP header, as a
TUN has no Ethernet header) and csum_offset 6 (UDP) or 16 (TCP), the field holding the
pseudo-header sum; ICMP echo replies and UDP fragments come out complete (flags 0).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from fabric.errors import PortError
from fabric.net import packets as P
from fabric.net.gso import complete_checksum
from fabric.net.vnet import F_NEEDS_CSUM, VNET_HDR_LEN, ZERO_HDR, VnetHdr
from fabric.ports.localstack import LocalStack
from fabric.ports.netlink import run_in_netns
from fabric.tools.sandbox import Sandbox, prerequisites

_reason = prerequisites()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

CIDR = ipaddress.IPv4Network("10.70.0.0/24")
GW = ipaddress.IPv4Address("10.70.0.1")
CLIENT = P.ip_bytes("10.70.0.2")
GW_B = GW.packed
MTU = 1500
MSS_OPT = bytes([2, 4, 0x05, 0xB4])

Packet = tuple[VnetHdr, bytearray]


@pytest.fixture
def worker(sandbox: Sandbox) -> str:
    return sandbox.netns("worker")


@pytest.fixture
def stack(worker: str) -> Iterator[LocalStack]:
    ls = run_in_netns(worker, LocalStack.create, "ns1", CIDR, GW, MTU)
    try:
        yield ls
    finally:
        ls.close()


# --- helpers --------------------------------------------------------------------------


def send(ls: LocalStack, packet: bytes) -> None:
    """Hand an IPv4 packet to the stack the way the router does: zero vnet header first."""
    os.write(ls.fd, ZERO_HDR + packet)


def recv(ls: LocalStack, match: Callable[[bytearray], bool], timeout: float = 2.0) -> Packet:
    """The first packet out of the stack that `match`es; other IPv4 packets are skipped,
    IPv6 ones fail the test (the stack must not speak IPv6 into the fabric)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no matching packet came out of the local stack")
        r, _, _ = select.select([ls.fd], [], [], left)
        if not r:
            continue
        try:
            frame = os.read(ls.fd, 1 << 17)
        except BlockingIOError:
            continue
        hdr = VnetHdr.parse(frame)
        pkt = bytearray(frame[VNET_HDR_LEN:])
        assert pkt[0] >> 4 == 4, f"non-IPv4 packet out of the local stack: {pkt.hex()}"
        if match(pkt):
            return hdr, pkt


def silent(ls: LocalStack, match: Callable[[bytearray], bool], wait: float = 0.3) -> bool:
    try:
        recv(ls, match, wait)
    except AssertionError:
        return True
    return False


def drain(ls: LocalStack) -> None:
    while True:
        try:
            os.read(ls.fd, 1 << 17)
        except BlockingIOError:
            return


def ip_hdr(pkt: bytearray) -> P.IPv4:
    return P.IPv4.parse(pkt)


def is_echo_reply(src: bytes, dst: bytes, ident: int) -> Callable[[bytearray], bool]:
    def match(pkt: bytearray) -> bool:
        ip = ip_hdr(pkt)
        return (
            ip.proto == P.PROTO_ICMP
            and ip.src == src
            and ip.dst == dst
            and pkt[ip.ihl] == P.ICMP_ECHO_REPLY
            and struct.unpack_from("!H", pkt, ip.ihl + 4)[0] == ident
        )

    return match


def is_l4(proto: int, src: bytes, dst: bytes, dport: int) -> Callable[[bytearray], bool]:
    def match(pkt: bytearray) -> bool:
        ip = ip_hdr(pkt)
        return (
            ip.proto == proto
            and ip.src == src
            and ip.dst == dst
            and struct.unpack_from("!H", pkt, ip.ihl + 2)[0] == dport
        )

    return match


def finish(hdr: VnetHdr, pkt: bytearray) -> None:
    """Complete a NEEDS_CSUM packet like the router must before sending it anywhere else."""
    if hdr.flags & F_NEEDS_CSUM:
        complete_checksum(pkt, hdr.csum_start, hdr.csum_offset)


def l4_checksum_ok(pkt: bytearray) -> bool:
    ip = ip_hdr(pkt)
    seg = bytes(pkt[ip.ihl : ip.total_length])
    field = 6 if ip.proto == P.PROTO_UDP else 16
    stored = struct.unpack_from("!H", seg, field)[0]
    zeroed = bytearray(seg)
    zeroed[field : field + 2] = b"\0\0"
    return stored == P.l4_checksum(ip.src, ip.dst, ip.proto, zeroed)


def ping(ls: LocalStack, dst: bytes, ident: int, payload: bytes = b"fabric ping") -> bytearray:
    send(ls, P.icmp_echo(CLIENT, dst, ident, 1, payload))
    hdr, pkt = recv(ls, is_echo_reply(dst, CLIENT, ident))
    finish(hdr, pkt)
    return pkt


def udp_roundtrip(ls: LocalStack, dst: bytes, port: int, sock: socket.socket) -> None:
    """Datagram in through the TUN, reply from the socket out through the TUN."""
    send(ls, P.udp_packet(CLIENT, dst, 40000, port, b"query"))
    r, _, _ = select.select([sock], [], [], 2.0)
    assert r, "the datagram written into the TUN did not reach the socket"
    data, peer = sock.recvfrom(2048)
    assert data == b"query"
    assert peer == (P.ip_str(CLIENT), 40000)
    sock.sendto(b"answer", peer)
    hdr, pkt = recv(ls, is_l4(P.PROTO_UDP, dst, CLIENT, 40000))
    ip = ip_hdr(pkt)
    assert struct.unpack_from("!HH", pkt, ip.ihl) == (port, 40000)
    assert bytes(pkt[ip.ihl + 8 : ip.total_length]) == b"answer"
    # With TUN_F_CSUM the kernel leaves the UDP checksum partial (observed: NEEDS_CSUM,
    # csum_start 20 = IP header length, csum_offset 6); tolerate a complete one too.
    if hdr.flags & F_NEEDS_CSUM:
        assert (hdr.csum_start, hdr.csum_offset) == (ip.ihl, 6)
    finish(hdr, pkt)
    assert l4_checksum_ok(pkt)


def netns_refs(inode: int) -> list[str]:
    """Our tasks and fds that still reference the network namespace `inode`."""
    want = f"net:[{inode}]"
    refs = []
    for tid in os.listdir("/proc/self/task"):
        try:
            if os.readlink(f"/proc/self/task/{tid}/ns/net") == want:
                refs.append(f"task {tid}")
        except OSError:
            pass  # the task exited meanwhile
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == want:
                refs.append(f"fd {fd}")
        except OSError:
            pass
    return refs


# --- tests ----------------------------------------------------------------------------


def test_stack_is_its_own_namespace(stack: LocalStack, worker: str) -> None:
    here = os.stat("/proc/thread-self/ns/net").st_ino
    there = stack.run(lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    worker_ino = run_in_netns(worker, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert there == os.fstat(stack.netns_fd).st_ino == stack.netns_inode
    assert there not in (here, worker_ino)
    names = [t.name for t in threading.enumerate()]
    assert "localstack-ns1" in names
    assert stack.vnet and stack.mtu == MTU and stack.name == "ns1"
    assert stack.addresses() == [(str(GW), 24)]

    # The sysctls landed in the stack's namespace (written from its thread).
    def sysctls() -> dict[str, str]:
        out = {}
        for key in (
            "ipv4/conf/all/rp_filter",
            "ipv4/conf/fab0/rp_filter",
            "ipv4/tcp_syncookies",
            "ipv4/ip_nonlocal_bind",
            "ipv6/conf/fab0/disable_ipv6",
        ):
            with open(f"/proc/sys/net/{key}") as f:
                out[key] = f.read().strip()
        return out

    got = stack.run(sysctls)
    assert got["ipv4/conf/fab0/rp_filter"] == "0" and got["ipv4/conf/all/rp_filter"] == "0"
    assert got["ipv6/conf/fab0/disable_ipv6"] == "1" and got["ipv4/tcp_syncookies"] == "1"


def test_run_propagates_errors_and_nests(stack: LocalStack) -> None:
    def boom() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        stack.run(boom)
    # A nested call from the stack's own thread runs inline instead of deadlocking.
    assert stack.run(lambda: stack.run(lambda: 42)) == 42
    assert stack.run(threading.current_thread).name == "localstack-ns1"


def test_gateway_answers_ping(stack: LocalStack) -> None:
    pkt = ping(stack, GW_B, 0x1234, b"hello gateway")
    ip = ip_hdr(pkt)
    assert P.checksum.verify(pkt[: ip.ihl])
    icmp = pkt[ip.ihl : ip.total_length]
    assert P.checksum.verify(icmp)
    assert struct.unpack_from("!HH", icmp, 4) == (0x1234, 1)
    assert bytes(icmp[8:]) == b"hello gateway"


def test_udp_listener_gets_datagrams_and_replies(stack: LocalStack) -> None:
    sock = stack.listen_udp(GW, 53)
    try:
        assert sock.getblocking() is False
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        udp_roundtrip(stack, GW_B, 53, sock)
        with pytest.raises(PortError, match="UDP listen on 10.70.0.1:53"):
            stack.listen_udp(GW, 53)  # no SO_REUSEPORT: a second bind fails clearly
    finally:
        sock.close()


def test_tcp_syn_gets_syn_ack(stack: LocalStack) -> None:
    lsock = stack.listen_tcp(GW, 80)
    try:
        assert lsock.getblocking() is False
        assert lsock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        send(stack, P.tcp_packet(CLIENT, GW_B, 40001, 80, 1000, 0, P.TCP_SYN, options=MSS_OPT))
        hdr, pkt = recv(stack, is_l4(P.PROTO_TCP, GW_B, CLIENT, 40001))
        ip = ip_hdr(pkt)
        sport, dport, _seq, ack, _off, flags = struct.unpack_from("!HHIIBB", pkt, ip.ihl)
        assert (sport, dport) == (80, 40001)
        assert flags & (P.TCP_SYN | P.TCP_ACK | P.TCP_RST) == P.TCP_SYN | P.TCP_ACK
        assert ack == 1001
        if hdr.flags & F_NEEDS_CSUM:  # observed: csum_start 20, csum_offset 16
            assert (hdr.csum_start, hdr.csum_offset) == (ip.ihl, 16)
        finish(hdr, pkt)
        assert l4_checksum_ok(pkt)
        # Nobody else listens: a SYN to another port gets a RST.
        send(stack, P.tcp_packet(CLIENT, GW_B, 40002, 81, 5, 0, P.TCP_SYN))
        _, rst = recv(stack, is_l4(P.PROTO_TCP, GW_B, CLIENT, 40002))
        assert rst[ip_hdr(rst).ihl + 13] & P.TCP_RST
    finally:
        lsock.close()


def test_connect_tcp_and_udp_socket_leave_through_the_tun(stack: LocalStack) -> None:
    peer = P.ip_bytes("10.70.0.7")
    result: list[socket.socket | BaseException] = []

    def connect() -> None:
        try:
            result.append(stack.connect_tcp(GW, "10.70.0.7", 8080, timeout=3.0))
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=connect)
    t.start()
    hdr, syn = recv(stack, is_l4(P.PROTO_TCP, GW_B, peer, 8080))
    ip = ip_hdr(syn)
    sport, _, seq = struct.unpack_from("!HHI", syn, ip.ihl)
    assert syn[ip.ihl + 13] == P.TCP_SYN
    finish(hdr, syn)
    assert l4_checksum_ok(syn)
    send(
        stack,
        P.tcp_packet(peer, GW_B, 8080, sport, 77, seq + 1, P.TCP_SYN | P.TCP_ACK, options=MSS_OPT),
    )
    t.join(5)
    assert len(result) == 1 and isinstance(result[0], socket.socket), result
    conn = result[0]
    try:
        assert conn.getblocking() is False
        assert conn.getsockname() == (str(GW), sport)
        assert conn.getpeername() == ("10.70.0.7", 8080)
    finally:
        conn.close()
    drain(stack)

    with pytest.raises(PortError, match="timed out"):
        stack.connect_tcp(GW, "10.70.0.8", 8080, timeout=0.3)  # nobody answers the SYN

    usock = stack.udp_socket(GW)
    try:
        assert usock.getblocking() is False
        usock.sendto(b"out", ("10.96.5.5", 5353))  # off-CIDR: the default route takes it
        hdr, pkt = recv(stack, is_l4(P.PROTO_UDP, GW_B, P.ip_bytes("10.96.5.5"), 5353))
        finish(hdr, pkt)
        assert l4_checksum_ok(pkt)
    finally:
        usock.close()


def test_extra_addresses(stack: LocalStack) -> None:
    second = ipaddress.IPv4Address("10.70.0.99")
    vip = ipaddress.IPv4Address("10.96.0.10")  # a service VIP outside the CIDR
    for addr in (second, vip):
        stack.add_address(addr)
        stack.add_address(addr)  # idempotent
    assert set(stack.addresses()) == {(str(GW), 24), (str(second), 32), (str(vip), 32)}
    for n, addr in enumerate((second, vip)):
        ping(stack, addr.packed, 0x200 + n)
        sock = stack.listen_udp(addr, 53)
        try:
            udp_roundtrip(stack, addr.packed, 53, sock)
        finally:
            sock.close()
    for addr in (second, vip):
        stack.remove_address(addr)
        stack.remove_address(addr)  # idempotent
    assert stack.addresses() == [(str(GW), 24)]
    send(stack, P.icmp_echo(CLIENT, second.packed, 0x300, 1, b"gone"))
    assert silent(stack, is_echo_reply(second.packed, CLIENT, 0x300))
    ping(stack, GW_B, 0x301)  # the gateway is untouched
    with pytest.raises(PortError):
        stack.add_address("10.70.0.300")


def test_close_releases_the_namespace(worker: str) -> None:
    ls = run_in_netns(worker, LocalStack.create, "gone", CIDR, GW, MTU)
    inode, tun_fd, ns_fd, tid = ls.netns_inode, ls.fd, ls.netns_fd, ls.thread_native_id
    assert inode and tid is not None
    assert sorted(netns_refs(inode)) == sorted([f"task {tid}", f"fd {ns_fd}"])
    assert os.readlink(f"/proc/self/fd/{tun_fd}") == "/dev/net/tun"
    sock = ls.listen_udp(GW, 53)
    sock.close()  # sockets hold the namespace too; the caller closes what it opened
    ls.close()
    ls.close()  # idempotent
    assert ls.closed and ls.fd == -1 and ls.netns_fd == -1
    assert "localstack-gone" not in [t.name for t in threading.enumerate()]
    deadline = time.monotonic() + 2.0
    while netns_refs(inode) and time.monotonic() < deadline:
        time.sleep(0.01)  # the kernel task may outlive Python's join() by a moment
    assert netns_refs(inode) == []
    for fd in (tun_fd, ns_fd):  # closed, or reused by something that is not ours
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            assert exc.errno == errno.ENOENT
        else:
            assert target not in ("/dev/net/tun", f"net:[{inode}]")
    with pytest.raises(PortError, match="closed"):
        ls.run(lambda: None)


def test_two_stacks_with_the_same_cidr(worker: str) -> None:
    a = run_in_netns(worker, LocalStack.create, "a", CIDR, GW, MTU)
    try:
        b = run_in_netns(worker, LocalStack.create, "b", CIDR, GW, MTU)
        try:
            assert a.netns_inode != b.netns_inode
            sa, sb = a.listen_udp(GW, 53), b.listen_udp(GW, 53)
            try:
                udp_roundtrip(a, GW_B, 53, sa)
                assert select.select([sb], [], [], 0.2)[0] == []  # b saw nothing
                udp_roundtrip(b, GW_B, 53, sb)
                assert select.select([sa], [], [], 0.2)[0] == []
            finally:
                sa.close()
                sb.close()
            ping(a, GW_B, 0x401)
            assert silent(b, is_echo_reply(GW_B, CLIENT, 0x401), 0.1)
            ping(b, GW_B, 0x402)
            assert silent(a, is_echo_reply(GW_B, CLIENT, 0x402), 0.1)
        finally:
            b.close()
    finally:
        a.close()


def test_bad_parameters_fail_before_anything_is_made(worker: str) -> None:
    with pytest.raises(PortError, match="outside"):
        LocalStack.create("x", CIDR, ipaddress.IPv4Address("10.71.0.1"), MTU)
    with pytest.raises(PortError, match="network or broadcast"):
        LocalStack.create("x", CIDR, CIDR.network_address, MTU)
    with pytest.raises(PortError, match="MTU"):
        LocalStack.create("x", CIDR, GW, 100)
    assert not [t for t in threading.enumerate() if t.name == "localstack-x"]
