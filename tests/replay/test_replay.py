"""Replay every case under pcaps/ through the router and compare with the expected captures.

FABRIC_REGEN_PCAPS=1 rewrites the expected captures from the current router instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fabric.net import packets
from fabric.net.pcap import write_pcap
from fabric.router.model import DROP_ACTIVATOR
from fabric.router.router import Router
from fabric.services.core import Signal
from tests.replay import harness

REQUIRED = {"arp_ping", "garp_probe", "spoofed_source", "ttl_expiry", "hold_release",
            "hold_timeout", "frag_needed", "tcp_handshake",
            "svc_syn_storm", "svc_retransmits", "svc_rst_and_strays", "svc_hold_timeout"}
CASES = harness.case_dirs()


def test_required_cases_exist() -> None:
    assert REQUIRED <= {c.name for c in CASES}
    readme = (harness.PCAPS / "README.md").read_text()
    for c in CASES:
        assert f"`{c.name}`" in readme, f"pcaps/README.md does not describe {c.name}"


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_replay(case_dir: Path) -> None:
    harness.check(case_dir)


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_cases_are_not_trivial(case_dir: Path) -> None:
    """Every case feeds frames and, except where silence is the point, expects some."""
    case = harness.load_case(case_dir)
    inputs = sum(len(harness.read_frames(case_dir / f"{p.name}.in.pcap")) for p in case.pods)
    outputs = sum(len(v) for v in harness.expected(case_dir).values())
    assert inputs > 0
    assert outputs > 0


# --- services: what the captures cannot show (counters, signals, timing) -----------------

VIP = packets.ip_bytes("10.0.0.100")


def _replay_svc(name: str, hooks: list | None = None
                ) -> tuple[Router, dict[str, harness.Frames], list[tuple[str, Signal]]]:
    """Replay a service case, keeping the router and the signals it raised."""
    seen: list[Router] = []

    def setup(router: Router, case: harness.Case) -> None:
        seen.append(router)

    got = harness.replay(harness.PCAPS / name, setup, hooks or [])
    glue = seen[0].services
    assert glue is not None and isinstance(glue.signals, harness.SignalLog)
    return seen[0], got, list(glue.signals)


def test_svc_syn_storm_wakes_once_and_releases_nothing_early() -> None:
    before: dict[str, int] = {}

    def just_before_ready(router: Router, now: float) -> None:
        svc = router.vips[VIP]
        before.update(held=svc.held_packets, sent=router.pods["web"].port.tx_packets)

    router, got, signals = _replay_svc("svc_syn_storm", [(0.999, just_before_ready)])
    c = router.vips[VIP].counters
    assert before == {"held": 50, "sent": 0}
    assert (c["held"], c["released"], c["dnat_flows"], c["activations"]) == (50, 50, 50, 1)
    assert [t for t, _ in got["web"]] == [1.0] * 50
    assert [(n, s.kind, s.reason) for n, s in signals] == [("web", "activate", "held")]
    assert str(signals[0][1].flow).startswith("tcp 10.0.0.11:")


def test_svc_retransmits_wake_once_and_are_all_released() -> None:
    router, got, signals = _replay_svc("svc_retransmits")
    c = router.vips[VIP].counters
    assert c["activations"] == 1 and len(signals) == 1
    # Not deduped: three held, three released on one pinned flow.
    assert (c["held"], c["released"], c["dnat_flows"], c["dnat_packets"]) == (3, 3, 1, 3)
    assert len(got["web"]) == 3


def test_svc_rst_and_strays_are_dropped_without_a_wake() -> None:
    at: dict[str, int] = {}

    def before_syn(router: Router, now: float) -> None:
        svc = router.vips[VIP]
        at.update(activations=svc.counters["activations"], held=svc.held_packets,
                  drops=router.pods["c1"].port.drops.get(DROP_ACTIVATOR, 0))

    router, got, signals = _replay_svc("svc_rst_and_strays", [(1.0, before_syn)])
    assert at == {"activations": 0, "held": 0, "drops": 3}
    c = router.vips[VIP].counters
    assert (c["activations"], c["held"], c["released"]) == (1, 1, 1)
    assert router.pods["c1"].port.drops == {DROP_ACTIVATOR: 3}
    assert [(s.kind, str(s.flow)) for _, s in signals] == [
        ("activate", "tcp 10.0.0.11:41004 -> 10.0.0.100:80")]
    assert len(got["web"]) == 1


def test_svc_hold_timeout_counts() -> None:
    router, got, _ = _replay_svc("svc_hold_timeout")
    c = router.vips[VIP].counters
    assert (c["held"], c["hold_timeout"], c["released"], c["activations"]) == (2, 2, 0, 1)
    assert router.drops.get("hold_timeout") == 2
    assert router.vips[VIP].held_packets == 0


# --- the harness itself -------------------------------------------------------------------

GW_MAC = packets.mac_bytes("02:fb:00:00:00:01")
A, B, GW = packets.ip_bytes("10.0.0.2"), packets.ip_bytes("10.0.0.3"), packets.ip_bytes(
    "10.0.0.1")
MAC_A, MAC_B = packets.mac_bytes("02:00:00:00:00:0a"), packets.mac_bytes("02:00:00:00:00:0b")


def _udp(src_mac: bytes, src: bytes, dst: bytes, payload: bytes, ttl: int = 64) -> bytes:
    return packets.eth_header(GW_MAC, src_mac, packets.ETH_P_IP) + packets.udp_packet(
        src, dst, 1, 2, payload, ttl=ttl)


def _fwd(dst_mac: bytes, src: bytes, dst: bytes, payload: bytes) -> bytes:
    return packets.eth_header(dst_mac, GW_MAC, packets.ETH_P_IP) + packets.udp_packet(
        src, dst, 1, 2, payload, ttl=63)


def _write_case(d: Path, spec: dict, ins: dict[str, list[tuple[float, bytes]]]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "case.json").write_text(json.dumps(spec))
    for name, frames in ins.items():
        (d / f"{name}.in.pcap").write_bytes(write_pcap(frames))
    return d


def test_harness_merges_by_time_attaches_and_runs_timers(tmp_path: Path) -> None:
    spec = {"cidr": "10.0.0.0/24", "until": 45.0, "pods": [
        {"name": "a", "ip": "10.0.0.2", "mac": "02:00:00:00:00:0a", "attach": 0.0},
        {"name": "b", "ip": "10.0.0.3", "mac": "02:00:00:00:00:0b", "attach": 3.0},
        {"name": "c", "ip": "10.0.0.4", "mac": None, "attach": None},
    ]}
    d = _write_case(tmp_path / "t", spec, {
        "a": [(1.0, _udp(MAC_A, A, B, b"one")), (2.0, _udp(MAC_A, A, packets.ip_bytes(
            "10.0.0.4"), b"for c")), (4.0, _udp(MAC_A, A, B, b"four"))],
        "b": [(3.5, _udp(MAC_B, B, A, b"three and a half"))],
    })
    got = harness.replay(d)
    assert got["b"] == [(3.0, _fwd(MAC_B, A, B, b"one")), (4.0, _fwd(MAC_B, A, B, b"four"))]
    assert [t for t, _ in got["a"]] == [3.5, 32.0]  # b's frame, then c's hold timeout
    assert got["a"][0][1] == _fwd(MAC_A, B, A, b"three and a half")
    held = packets.udp_packet(A, packets.ip_bytes("10.0.0.4"), 1, 2, b"for c", ttl=63)
    assert got["a"][1][1] == packets.eth_header(MAC_A, GW_MAC, packets.ETH_P_IP) + \
        packets.icmp_error(GW, held, packets.ICMP_UNREACH, packets.UNREACH_HOST)
    assert got["c"] == []


def test_harness_stops_timers_at_until(tmp_path: Path) -> None:
    spec = {"cidr": "10.0.0.0/24", "until": 20.0, "pods": [
        {"name": "a", "ip": "10.0.0.2", "mac": "02:00:00:00:00:0a", "attach": 0.0},
        {"name": "b", "ip": "10.0.0.3", "mac": None, "attach": None}]}
    d = _write_case(tmp_path / "t", spec, {"a": [(1.0, _udp(MAC_A, A, B, b"x"))]})
    assert harness.replay(d) == {"a": [], "b": []}


def test_harness_vnet_pods_and_setup_hook(tmp_path: Path) -> None:
    spec = {"cidr": "10.0.0.0/24", "pods": [
        {"name": "a", "ip": "10.0.0.2", "mac": "02:00:00:00:00:0a", "attach": 0.0,
         "vnet": True},
        {"name": "b", "ip": "10.0.0.3", "mac": "02:00:00:00:00:0b", "attach": 0.0}]}
    d = _write_case(tmp_path / "t", spec, {"a": [(1.0, _udp(MAC_A, A, B, b"v"))],
                                           "b": [(2.0, _udp(MAC_B, B, A, b"w"))]})
    seen: list[Router] = []
    got = harness.replay(d, setup=lambda r, case: seen.append(r))
    assert len(seen) == 1 and set(seen[0].pods) == {"a", "b"}
    assert got == {"b": [(1.0, _fwd(MAC_B, A, B, b"v"))], "a": [(2.0, _fwd(MAC_A, B, A, b"w"))]}


def test_harness_services_and_timed_backend_events(tmp_path: Path) -> None:
    spec = {"cidr": "10.0.0.0/24", "pods": [
        {"name": "a", "ip": "10.0.0.2", "mac": "02:00:00:00:00:0a", "attach": 0.0},
        {"name": "b", "ip": "10.0.0.3", "mac": "02:00:00:00:00:0b", "attach": 0.0}],
        "services": [{"name": "s", "ip": "10.0.0.100", "backends": ["b"],
                      "ports": [{"port": 80, "target_port": 8080, "protocol": "udp"}]}],
        "events": [{"t": 1.0, "backend": "b", "ready": True},
                   {"t": 2.0, "backend": "b", "ready": False, "service": "s"}]}
    vip = packets.ip_bytes("10.0.0.100")

    def to_vip(sport: int, payload: bytes) -> bytes:
        return packets.eth_header(GW_MAC, MAC_A, packets.ETH_P_IP) + packets.udp_packet(
            A, vip, sport, 80, payload)

    d = _write_case(tmp_path / "t", spec, {"a": [
        (0.5, to_vip(1000, b"held")), (1.0, to_vip(1001, b"same time as ready")),
        (3.0, to_vip(1002, b"after unready"))]})
    got = harness.replay(d)
    assert [t for t, _ in got["b"]] == [1.0, 1.0]  # the event goes before a frame on a tie
    for (_, frame), payload in zip(got["b"], (b"held", b"same time as ready"), strict=True):
        ip = frame[14:]
        assert ip[16:20] == B and ip[22:24] == (8080).to_bytes(2, "big")
        assert ip[28:] == payload
    assert got["a"] == []
    spec["events"] = [{"t": 1.0, "backend": "nobody", "ready": True}]
    (d / "case.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="no service has backend nobody"):
        harness.replay(d)


def test_harness_rejects_frames_from_pods_without_port(tmp_path: Path) -> None:
    spec = {"cidr": "10.0.0.0/24", "pods": [
        {"name": "a", "ip": "10.0.0.2", "mac": None, "attach": 5.0}]}
    d = _write_case(tmp_path / "t", spec, {"a": [(1.0, _udp(MAC_A, A, B, b"early"))]})
    with pytest.raises(ValueError, match="has no port"):
        harness.replay(d)


def test_compare_finds_every_kind_of_difference() -> None:
    f1, f2 = _fwd(MAC_B, A, B, b"one"), _fwd(MAC_B, A, B, b"two")
    want = {"b": [(1.0, f1), (2.0, f2)]}
    assert harness.compare(want, {"b": [(1.0005, f1), (1.9995, f2)]}) == []
    changed = bytearray(f2)
    changed[-1] ^= 1
    problems = harness.compare(want, {"b": [(1.0, f1), (2.0, bytes(changed))]})
    assert len(problems) == 1 and f"at byte {len(f2) - 1}" in problems[0]
    assert "time" in harness.compare(want, {"b": [(1.0, f1), (2.002, f2)]})[0]
    assert "missing" in harness.compare(want, {"b": [(1.0, f1)]})[0]
    assert "unexpected" in harness.compare(want, {"b": [(1.0, f1), (2.0, f2), (3.0, f1)]})[0]
    assert "unexpected" in harness.compare({}, {"a": [(1.0, f1)]})[0]
    # Order matters.
    assert len(harness.compare(want, {"b": [(1.0, f2), (2.0, f1)]})) == 2


def test_regenerate_round_trip(tmp_path: Path) -> None:
    spec = {"cidr": "10.0.0.0/24", "pods": [
        {"name": "a", "ip": "10.0.0.2", "mac": "02:00:00:00:00:0a", "attach": 0.0},
        {"name": "b", "ip": "10.0.0.3", "mac": "02:00:00:00:00:0b", "attach": 0.0}]}
    d = _write_case(tmp_path / "t", spec, {"a": [(1.25, _udp(MAC_A, A, B, b"regen"))]})
    got = harness.replay(d)
    harness.regenerate(d, got)
    assert harness.expected(d) == got
    assert (d / "a.out.pcap").exists() and harness.read_frames(d / "a.out.pcap") == []
    harness.check(d)
    # A router that behaves differently fails the check.
    (d / "b.out.pcap").write_bytes(write_pcap([(1.25, _fwd(MAC_B, A, B, b"other"))]))
    with pytest.raises(AssertionError, match="differs"):
        harness.check(d)


def test_committed_captures_are_classic_pcap_ethernet() -> None:
    for d in CASES:
        for f in sorted(d.glob("*.pcap")):
            data = f.read_bytes()
            assert data[:4] == bytes.fromhex("d4c3b2a1"), f  # little-endian, microseconds
            assert int.from_bytes(data[20:24], "little") == 1, f  # LINKTYPE_ETHERNET
