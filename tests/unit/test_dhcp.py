"""DHCPv4 on the gateway: the sans-IO core driven with bytes (requests built by scapy, an
independent codec, and replies read back with it), the router's interception (0.0.0.0
allowed for DHCP only, broadcast and unicast replies per RFC 2131 §4.1), hostile input."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from dnslib.label import DNSBuffer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from fabric.config.parse import parse_namespace
from fabric.config.render import namespace_to_dict
from fabric.config.specs import DhcpSpec, NamespaceSpec
from fabric.errors import ConfigError
from fabric.net import packets
from fabric.router.model import DROP_BAD_CHECKSUM, DROP_BROADCAST, DROP_SPOOFED, Port
from fabric.router.router import Router
from gateway import dhcp
from gateway.dhcp import DhcpCore, DhcpSettings, Reply

CIDR = ipaddress.IPv4Network("10.0.0.0/24")
GW = bytes([10, 0, 0, 1])
POD_IP = bytes([10, 0, 0, 2])
POD_MAC = bytes.fromhex("02000a000002")
OTHER_MAC = bytes.fromhex("02000a0000ee")
GW_MAC = packets.mac_bytes("02:fb:00:00:00:01")
SEARCH = ("shop.fabric.internal", "fabric.internal")


def core(lease: int = 86400, mtu: int = 1500) -> DhcpCore:
    return DhcpCore(DhcpSettings.for_network(CIDR, mtu, SEARCH[0], SEARCH, lease))


def lookup(chaddr: bytes) -> tuple[bytes, str] | None:
    return (POD_IP, "vm-1") if chaddr == POD_MAC else None


def request(msg_type: str | int, *, mac: bytes = POD_MAC, ciaddr: str = "0.0.0.0",
            flags: int = 0, giaddr: str = "0.0.0.0", opts: list[Any] | None = None,
            xid: int = 0x1234ABCD) -> bytes:
    options: list[Any] = [("message-type", msg_type)] + (opts or []) + ["end"]
    return bytes(BOOTP(op=1, xid=xid, flags=flags, ciaddr=ciaddr, giaddr=giaddr,
                       chaddr=mac + bytes(10)) / DHCP(options=options))


def options_of(payload: bytes) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for o in BOOTP(payload)[DHCP].options:
        if isinstance(o, tuple):
            if o[0] == 119:  # scapy has no name for it: concatenated (RFC 3396), decoded
                out[119] = out.get(119, b"") + o[1]
            else:
                out[o[0]] = o[1] if len(o) == 2 else o[1:]
    if 119 in out:
        out["domain_search"] = search_names(out[119])
    return out


def search_names(data: bytes) -> list[str]:
    """RFC 3397 names read with dnslib (an independent decoder)."""
    buf = DNSBuffer(data)
    names = []
    while buf.remaining():
        names.append(str(buf.decode_name()))
    return names


def test_discover_is_offered_the_pod_address_with_every_option() -> None:
    c = core()
    r = c.answer(request("discover", opts=[("param_req_list", [1, 3, 6, 12, 15, 26, 119])]),
                 lookup)
    assert r is not None
    b = BOOTP(r.payload)
    assert (b.op, b.xid, b.yiaddr, b.chaddr[:6]) == (2, 0x1234ABCD, "10.0.0.2", POD_MAC)
    o = options_of(r.payload)
    assert o["message-type"] == 2
    assert o["server_id"] == "10.0.0.1"
    assert o["subnet_mask"] == "255.255.255.0"
    assert o["router"] == "10.0.0.1"
    assert o["name_server"] == "10.0.0.1"
    assert o["broadcast_address"] == "10.0.0.255"
    assert o["interface-mtu"] == 1500
    assert o["lease_time"] == 86400
    assert o["renewal_time"] == 43200 and o["rebinding_time"] == 75600
    assert o["domain"] == b"shop.fabric.internal"
    assert o["hostname"] == b"vm-1"
    assert o["domain_search"] == [s + "." for s in SEARCH]
    assert len(r.payload) >= dhcp.MIN_REPLY
    # no broadcast flag, no ciaddr: unicast to the client's hardware address and yiaddr
    assert r.dst == POD_IP and r.broadcast is False
    assert c.counters["discover"] == 1 and c.counters["offer"] == 1


def test_broadcast_flag_is_honoured() -> None:
    r = core().answer(request("discover", flags=0x8000), lookup)
    assert r is not None and r.broadcast and r.dst == b"\xff" * 4
    assert BOOTP(r.payload).flags == 0x8000


def test_selecting_request_is_acked() -> None:
    c = core()
    r = c.answer(request("request", opts=[("server_id", "10.0.0.1"),
                                          ("requested_addr", "10.0.0.2")]), lookup)
    assert r is not None
    assert options_of(r.payload)["message-type"] == 5
    assert BOOTP(r.payload).yiaddr == "10.0.0.2"
    assert c.counters["ack"] == 1


def test_wrong_address_is_naked_by_broadcast() -> None:
    c = core()
    r = c.answer(request("request", opts=[("requested_addr", "10.0.0.9")]), lookup)
    assert r is not None
    o = options_of(r.payload)
    assert o["message-type"] == 6 and o["server_id"] == "10.0.0.1"
    assert "lease_time" not in o
    assert BOOTP(r.payload).yiaddr == "0.0.0.0"
    assert r.broadcast and r.dst == b"\xff" * 4
    assert c.counters["nak"] == 1


def test_renewal_is_acked_unicast_to_ciaddr() -> None:
    c = core()
    r = c.answer(request("request", ciaddr="10.0.0.2"), lookup)
    assert r is not None and r.dst == POD_IP and not r.broadcast
    assert BOOTP(r.payload).ciaddr == "10.0.0.2"
    assert options_of(r.payload)["message-type"] == 5
    # renewing someone else's address
    r = c.answer(request("request", ciaddr="10.0.0.7"), lookup)
    assert r is not None and options_of(r.payload)["message-type"] == 6


def test_request_for_another_server_is_ignored() -> None:
    c = core()
    assert c.answer(request("request", opts=[("server_id", "10.0.0.99"),
                                             ("requested_addr", "10.0.0.2")]), lookup) is None
    assert c.counters["not_for_us"] == 1


def test_unknown_mac_is_refused() -> None:
    c = core()
    assert c.answer(request("discover", mac=OTHER_MAC), lookup) is None
    assert c.counters["refused_unknown_mac"] == 1


def test_release_decline_counted_without_reply() -> None:
    c = core()
    assert c.answer(request("release", ciaddr="10.0.0.2",
                            opts=[("server_id", "10.0.0.1")]), lookup) is None
    assert c.answer(request("decline", opts=[("requested_addr", "10.0.0.2"),
                                             ("server_id", "10.0.0.1")]), lookup) is None
    assert (c.counters["release"], c.counters["decline"]) == (1, 1)
    assert c.counters["ack"] == c.counters["nak"] == 0


def test_inform_gets_options_without_lease() -> None:
    c = core()
    r = c.answer(request("inform", ciaddr="10.0.0.2"), lookup)
    assert r is not None and r.dst == POD_IP and not r.broadcast
    o = options_of(r.payload)
    assert o["message-type"] == 5 and "lease_time" not in o and o["router"] == "10.0.0.1"
    assert BOOTP(r.payload).yiaddr == "0.0.0.0"
    assert c.answer(request("inform", ciaddr="10.0.0.3"), lookup) is None
    assert c.counters["refused_wrong_address"] == 1


def test_bootp_relayed_and_server_messages_are_not_answered() -> None:
    c = core()
    bootp = bytes(BOOTP(op=1, chaddr=POD_MAC + bytes(10)) / DHCP(options=["end"]))
    assert c.answer(bootp, lookup) is None
    assert c.answer(request("discover", giaddr="10.0.0.50"), lookup) is None
    assert c.answer(request("offer"), lookup) is None
    reply = bytearray(request("discover"))
    reply[0] = 2
    assert c.answer(bytes(reply), lookup) is None
    assert (c.counters["bootp"], c.counters["relayed"], c.counters["unexpected_type"]) == \
        (1, 1, 2)


def test_client_id_is_echoed() -> None:
    r = core().answer(request("discover", opts=[("client_id", b"\x01" + POD_MAC)]), lookup)
    assert r is not None and options_of(r.payload)["client_id"] == b"\x01" + POD_MAC


def test_long_and_overloaded_options_are_read() -> None:
    # RFC 3396: a requested address split in two; the message type in the file field.
    base = bytearray(request("discover"))
    opts_at = dhcp.OPTIONS_AT
    base[opts_at:] = bytes([52, 1, 1, 50, 2, 10, 0, 50, 2, 0, 9, 255])
    base[108:111] = bytes([53, 1, 3])
    req = dhcp.parse(bytes(base))
    assert req.msg_type == dhcp.REQUEST
    assert req.options[dhcp.OPT_REQUESTED_IP] == bytes([10, 0, 0, 9])
    c = core()
    r = c.answer(bytes(base), lookup)
    assert r is not None and options_of(r.payload)["message-type"] == 6


def test_options_are_trimmed_to_the_client_size() -> None:
    long_search = tuple(f"{'x' * 60}.{'y' * 60}.{'z' * 60}.example" for _ in range(3))
    c = DhcpCore(DhcpSettings.for_network(CIDR, 1500, "a." + "b" * 60, long_search))
    r = c.answer(request("discover"), lookup)
    assert r is not None and len(r.payload) <= 576 - 28
    assert c.counters["options_trimmed"] == 1
    r = c.answer(request("discover", opts=[("max_dhcp_size", 1500)]), lookup)
    assert r is not None and len(r.payload) > 576 - 28
    # long search list split over several 119 options (RFC 3396), read back whole
    names = options_of(r.payload)["domain_search"]
    assert names == [n + "." for n in long_search]


def test_reconfigure_keeps_counters() -> None:
    c = core()
    c.answer(request("discover"), lookup)
    c.reconfigure(DhcpSettings.for_network(CIDR, 1400, "x.fabric.internal", (), 600))
    r = c.answer(request("discover"), lookup)
    assert r is not None
    o = options_of(r.payload)
    assert o["interface-mtu"] == 1400 and o["lease_time"] == 600 and "domain_search" not in o
    assert c.counters["offer"] == 2


# --- hostile input ------------------------------------------------------------------------


def test_malformed_messages_are_counted() -> None:
    good = request("discover")
    garbage_file = bytearray(good[:240] + bytes([53, 1, 1, 52, 1, 1, 255]))
    garbage_file[108:110] = bytes([50, 200])  # the overloaded file field overruns
    bad = [
        b"", b"\x01", good[:239], good[:236] + b"XXXX" + good[240:],
        good[:1] + b"\x06" + good[2:],  # not Ethernet
        good[:240] + bytes([53]),  # option without length
        good[:240] + bytes([53, 9, 1]),  # overruns
        good[:240] + bytes([53, 2, 1, 1, 255]),  # type of length 2
        good[:240] + bytes([53, 1, 1, 50, 3, 1, 2, 3, 255]),  # address of length 3
        good[:240] + bytes([53, 1, 1, 57, 1, 2, 255]),  # maximum size of length 1
        good[:240] + bytes([53, 1, 1, 52, 1, 7, 255]),  # bad overload
        bytes(garbage_file),
        good[:240] + bytes([53, 1, 99, 255]),  # unknown type
        good + bytes(dhcp.MAX_MESSAGE),  # huge
        request("request"),  # asks for no address at all
    ]
    c = core()
    for b in bad:
        assert c.answer(b, lookup) is None, b[:20]
    assert c.counters["malformed"] == len(bad)
    assert sum(c.counters[k] for k in ("offer", "ack", "nak")) == 0


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=700))
def test_random_bytes_never_raise(data: bytes) -> None:
    c = core()
    r = c.answer(data, lookup)
    assert r is None or isinstance(r, Reply)
    assert sum(c.counters.values()) >= 1


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=12),
       st.integers(0, 300), st.binary(max_size=40))
def test_hostile_options_never_raise(opts: list[tuple[int, bytes]], cut: int,
                                     tail: bytes) -> None:
    """Options with lengths that lie, overflow into the end, repeat, overload."""
    body = bytearray()
    for code, value in opts:
        body += bytes([code, len(value) & 0xFF]) + value[:255]
    msg = request("discover")[:dhcp.OPTIONS_AT] + bytes(body)
    msg = msg[:len(msg) - cut if cut < len(msg) else 0] + tail
    c = core()
    r = c.answer(msg, lookup)
    if r is not None:
        assert len(r.payload) <= 1500 - 28
        BOOTP(r.payload)  # scapy can read it


# --- the router ---------------------------------------------------------------------------


def router(with_dhcp: bool = True) -> tuple[Router, Port, DhcpCore]:
    r = Router("shop", CIDR)
    r.add_pod("vm-1", "10.0.0.2", packets.mac_str(POD_MAC))
    r.add_pod("b", "10.0.0.3", "02:00:0a:00:00:03")
    p = Port(vnet=False, mtu=1500)
    r.attach("vm-1", p, 0.0)
    pb = Port(vnet=False, mtu=1500)
    r.attach("b", pb, 0.0)
    c = core()
    if with_dhcp:
        r.attach_dhcp(c)
    r.outputs.clear()
    return r, p, c


def frame(payload: bytes, src: str = "0.0.0.0", dst: str = "255.255.255.255",
          mac: bytes = POD_MAC, chksum: int | None = None) -> bytearray:
    udp = UDP(sport=68, dport=67) if chksum is None else UDP(sport=68, dport=67, chksum=chksum)
    return bytearray(bytes(Ether(src=packets.mac_str(mac), dst="ff:ff:ff:ff:ff:ff")
                           / IP(src=src, dst=dst) / udp / payload))


def test_router_answers_discover_from_zero_address() -> None:
    r, p, c = router()
    f = frame(request("discover", flags=0x8000))
    assert r.receive(p, f, len(f), 1.0) is None
    assert len(r.outputs) == 1
    out, data = r.outputs[0]
    assert out is p
    e = Ether(data)
    assert e.dst == "ff:ff:ff:ff:ff:ff" and e.src == packets.mac_str(GW_MAC)
    assert (e[IP].src, e[IP].dst, e[UDP].sport, e[UDP].dport) == \
        ("10.0.0.1", "255.255.255.255", 67, 68)
    # checksums right (scapy recomputes them when deleted)
    ip = e[IP]
    ref = IP(bytes(ip))
    del ref.chksum, ref[UDP].chksum
    assert bytes(IP(bytes(ref))) == bytes(ip)
    assert e[BOOTP].yiaddr == "10.0.0.2"
    assert c.counters["offer"] == 1 and not p.drops


def test_router_unicast_reply_goes_to_the_pod_mac() -> None:
    r, p, _ = router()
    f = frame(request("discover"))
    r.receive(p, f, len(f), 1.0)
    e = Ether(r.outputs[0][1])
    assert e.dst == packets.mac_str(POD_MAC) and e[IP].dst == "10.0.0.2"


def test_router_renewal_to_the_gateway_and_rebinding_broadcast() -> None:
    r, p, c = router()
    f = frame(request("request", ciaddr="10.0.0.2"), src="10.0.0.2", dst="10.0.0.1")
    assert r.receive(p, f, len(f), 1.0) is None
    f = frame(request("request", ciaddr="10.0.0.2"), src="10.0.0.2", dst="255.255.255.255")
    assert r.receive(p, f, len(f), 1.0) is None
    assert c.counters["ack"] == 2 and not p.drops
    assert [Ether(d)[IP].dst for _, d in r.outputs] == ["10.0.0.2", "10.0.0.2"]


def test_router_refuses_a_foreign_chaddr_and_other_pods_port() -> None:
    r, p, c = router()
    # vm-1's port asking for b's MAC, and b asking for vm-1's MAC: neither answered
    f = frame(request("discover", mac=packets.mac_bytes("02:00:0a:00:00:03")))
    r.receive(p, f, len(f), 1.0)
    pb = r.pods["b"].port
    assert pb is not None
    f = frame(request("discover"))
    r.receive(pb, f, len(f), 1.0)
    assert r.outputs == [] and c.counters["refused_unknown_mac"] == 2


def test_router_unknown_pod_mac_is_refused() -> None:
    r = Router("shop", CIDR)
    r.add_pod("vm-1", "10.0.0.2")  # no MAC configured, none learned
    p = Port(vnet=False, mtu=1500)
    r.attach("vm-1", p, 0.0)
    c = core()
    r.attach_dhcp(c)
    r.outputs.clear()
    f = frame(request("discover"))
    r.receive(p, f, len(f), 1.0)
    assert r.outputs == [] and c.counters["refused_unknown_mac"] == 1
    assert r.pods["vm-1"].mac is None  # a 0.0.0.0 frame teaches the router nothing


def test_router_answers_a_learned_mac() -> None:
    r = Router("shop", CIDR)
    r.add_pod("vm-1", "10.0.0.2")  # an interface pod without `mac`
    p = Port(vnet=False, mtu=1500)
    r.attach("vm-1", p, 0.0)
    c = core()
    r.attach_dhcp(c)
    # one frame from its own address teaches the router its MAC (Router._learn)
    ping = packets.eth_header(GW_MAC, POD_MAC, packets.ETH_P_IP) + packets.icmp_echo(
        POD_IP, GW, 1, 1, b"x")
    f = bytearray(ping)
    r.receive(p, f, len(f), 1.0)
    assert r.pods["vm-1"].mac == POD_MAC
    r.outputs.clear()
    f = frame(request("request", ciaddr="10.0.0.2"), src="10.0.0.2", dst="10.0.0.1")
    r.receive(p, f, len(f), 2.0)
    assert c.counters["ack"] == 1 and Ether(r.outputs[-1][1]).dst == packets.mac_str(POD_MAC)


def test_zero_source_is_spoofed_unless_dhcp() -> None:
    r, p, c = router()
    # 0.0.0.0 to another pod, or to port 53: spoofed as before
    for f in (frame(request("discover"), dst="10.0.0.3"),
              bytearray(bytes(Ether(src=packets.mac_str(POD_MAC)) / IP(src="0.0.0.0",
                        dst="255.255.255.255") / UDP(sport=68, dport=53) / (b"x" * 300)))):
        r.receive(p, f, len(f), 1.0)
    assert p.drops == {DROP_SPOOFED: 2} and r.outputs == []


def test_dhcp_off_answers_nothing() -> None:
    r, p, c = router(with_dhcp=False)
    f = frame(request("discover"))
    r.receive(p, f, len(f), 1.0)
    f = frame(request("request", ciaddr="10.0.0.2"), src="10.0.0.2", dst="255.255.255.255")
    r.receive(p, f, len(f), 1.0)
    assert p.drops == {DROP_SPOOFED: 1, DROP_BROADCAST: 1}
    assert r.outputs == [] and sum(c.counters.values()) == 0


def test_router_drops_bad_udp_checksum_and_bad_ip_header() -> None:
    r, p, c = router()
    f = frame(request("discover"), chksum=0x1234)
    r.receive(p, f, len(f), 1.0)
    f = frame(request("discover"))
    f[14 + 10] ^= 0xFF  # IPv4 header checksum
    r.receive(p, f, len(f), 1.0)
    assert p.drops == {DROP_BAD_CHECKSUM: 2} and r.outputs == []
    f = frame(request("discover"), chksum=0)  # no UDP checksum: fine
    r.receive(p, f, len(f), 1.0)
    assert len(r.outputs) == 1


def test_router_udp_length_lies() -> None:
    r, p, c = router()
    f = frame(request("discover"), chksum=0)
    struct.pack_into("!H", f, 14 + 20 + 4, 5000)
    r.receive(p, f, len(f), 1.0)
    struct.pack_into("!H", f, 14 + 20 + 4, 3)
    r.receive(p, f, len(f), 1.0)
    assert sum(p.drops.values()) == 2 and r.outputs == []
    f = frame(b"\x01" * 20, chksum=0)  # a short UDP payload: the core's malformed
    r.receive(p, f, len(f), 1.0)
    assert c.counters["malformed"] == 1


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["0.0.0.0", "10.0.0.2"]),
       st.sampled_from(["255.255.255.255", "10.0.0.255", "10.0.0.1"]))
def test_router_fuzzed_dhcp_payloads(payload: bytes, src: str, dst: str) -> None:
    r, p, c = router()
    f = frame(payload, src=src, dst=dst)
    r.receive(p, f, len(f), 1.0)
    for _, data in r.outputs:
        Ether(data)


# --- configuration --------------------------------------------------------------------------


def ns_with(dhcp_value: Any) -> NamespaceSpec:
    data: dict[str, Any] = {"name": "shop", "cidr": "10.0.0.0/24"}
    if dhcp_value is not None:
        data["dhcp"] = dhcp_value
    return parse_namespace(data, "f.yaml", "w1", "namespaces[0]")


def test_config_dhcp_on_by_default_and_switchable() -> None:
    assert ns_with(None).dhcp == DhcpSpec(enabled=True, lease=86400.0)
    assert ns_with(False).dhcp.enabled is False
    assert ns_with({"enabled": False}).dhcp.enabled is False
    assert ns_with({"lease": "2h"}).dhcp == DhcpSpec(enabled=True, lease=7200.0)
    for spec in (ns_with(None), ns_with(False), ns_with({"lease": "90s"})):
        assert parse_namespace(namespace_to_dict(spec), "x", "w1") == spec


@pytest.mark.parametrize(("value", "key", "problem"), [
    ("no", "namespaces[0].dhcp", "expected a boolean or a mapping"),
    ({"enabled": "yes"}, "namespaces[0].dhcp.enabled", "expected a boolean"),
    ({"lease": "5s"}, "namespaces[0].dhcp.lease", "'5s' is outside 60s .. 8760h (a year)"),
    ({"lease": "soon"}, "namespaces[0].dhcp.lease", "soon"),
    ({"leases": "1h"}, "namespaces[0].dhcp.leases", "unknown key 'leases'"),
])
def test_config_dhcp_errors(value: Any, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        ns_with(value)
    assert e.value.key == key and problem in e.value.problem
    assert "\n" not in str(e.value)
