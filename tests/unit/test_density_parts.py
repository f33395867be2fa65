"""The parts that make attaching fast, without root: the hand-built rtnetlink requests
(checked field by field against the kernel's layouts), the netns watch (inotify on a
directory of plain files stands in for /run/netns) and the port closer."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from fabric.ports import rtnl
from fabric.runtime.closer import Closer
from fabric.runtime.netnswatch import NetnsWatch, identity


def attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(data):
        n, kind = struct.unpack_from("=HH", data, off)
        out[kind] = data[off + 4:off + n]
        off += n + (-n % 4)
    assert off == len(data)
    return out


def test_link_up_sets_the_mac_mtu_queue_and_up_flag_only() -> None:
    msg = rtnl.link_up(7, bytes.fromhex("02000a400002"), 1500, 4096)
    family, _, index, flags, change = struct.unpack_from("=BxHiII", msg)
    assert (family, index, flags, change) == (socket.AF_UNSPEC, 7, rtnl.IFF_UP, rtnl.IFF_UP)
    a = attrs(msg[16:])
    assert a == {rtnl.IFLA_ADDRESS: bytes.fromhex("02000a400002"),
                 rtnl.IFLA_MTU: struct.pack("=I", 1500),
                 rtnl.IFLA_TXQLEN: struct.pack("=I", 4096)}
    assert len(rtnl.link_up(1)) == 16  # lo: only up


def test_address_and_default_route() -> None:
    ip = ipaddress.IPv4Address("10.64.1.2")
    msg = rtnl.address(7, ip, 16)
    assert struct.unpack_from("=BBBBi", msg) == (socket.AF_INET, 16, 0, 0, 7)
    assert attrs(msg[8:]) == {rtnl.IFA_LOCAL: ip.packed, rtnl.IFA_ADDRESS: ip.packed}
    gw = ipaddress.IPv4Address("10.64.0.1")
    msg = rtnl.default_route(7, gw)
    assert struct.unpack_from("=BBBBBBBBI", msg) == (
        socket.AF_INET, 0, 0, 0, rtnl.RT_TABLE_MAIN, rtnl.RTPROT_BOOT, 0, rtnl.RTN_UNICAST, 0)
    assert attrs(msg[12:]) == {rtnl.RTA_GATEWAY: gw.packed, rtnl.RTA_OIF: struct.pack("=i", 7)}


def test_netns_watch_calls_gone_when_the_name_goes_or_is_made_again(tmp_path: Path) -> None:
    w = NetnsWatch()
    assert w.available
    try:
        a, b = tmp_path / "a", tmp_path / "b"
        a.touch()
        b.touch()
        assert w.can_watch(str(a)) and not w.can_watch("/proc/1/ns/net")
        gone: list[str] = []
        w.add(str(a), identity(str(a)) or (0, 0), lambda: gone.append("a"))
        w.add(str(b), identity(str(b)) or (0, 0), lambda: gone.append("b"))
        w.readable()
        assert gone == []
        (tmp_path / "other").touch()  # another name: nothing
        w.readable()
        assert gone == []
        os.link(b, tmp_path / "kept")  # as the TAP keeps its namespace: no inode reuse
        b.unlink()
        b.touch()  # the same name made again is another namespace
        w.readable()
        assert gone == ["b"]
        a.unlink()
        w.readable()
        assert gone == ["b", "a"]
        a.touch()
        w.readable()
        assert gone == ["b", "a"]  # once, and a removed watch is not called
        c = tmp_path / "c"
        c.touch()
        token = w.add(str(c), identity(str(c)) or (0, 0), lambda: gone.append("c"))
        w.remove(str(c), token)
        c.unlink()
        w.readable()
        assert gone == ["b", "a"]
        w.add(str(c), (1, 2), lambda: gone.append("late"))  # already gone when added
        assert gone == ["b", "a", "late"]
    finally:
        w.close()


class Slow:
    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.closed = False

    def close(self) -> None:
        self.gate.wait(5)
        self.closed = True


def test_closer_closes_off_thread_and_a_new_port_waits_for_the_old_one() -> None:
    async def main() -> None:
        closer = Closer(2)
        gate = threading.Event()
        old = Slow(gate)
        closer.close(old, "/run/netns/x")
        waiter = asyncio.ensure_future(closer.wait("/run/netns/x"))
        await asyncio.sleep(0.05)
        assert not waiter.done() and not old.closed
        await closer.wait("/run/netns/other")  # nothing pending there
        gate.set()
        await asyncio.wait_for(waiter, 5)
        assert old.closed
        r, w = os.pipe()
        closer.shutdown()
        closer.close(os.fdopen(r), None)  # after shutdown: inline
        os.close(w)
        with pytest.raises(OSError):
            os.fstat(r)

    asyncio.run(main())
