"""The replay harness (fabric/activator/harness) on small synthetic captures: TCP
reassembly corner cases, the simulated backend's pacing, failures and expectations, and
`fabricd activator test` itself (in process and as a subprocess)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from fabric.activator.harness.backend import SimBackend
from fabric.activator.harness.capture import CaptureError, read_capture
from fabric.activator.harness.expect import Expectation
from fabric.activator.harness.replay import HarnessError, guess_port, replay
from fabric.activator.harness.tcpflows import ClientEvent, Conversation, ServerChunk, conversations
from fabric.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
ACT = ROOT / "activators"
TCP_WASM = ACT / "tcp" / "tcp.wasm"
STREAM_WASM = ACT / "stream" / "stream.wasm"
CLIENT, SERVER = "10.0.0.2", "10.0.0.100"


def seg(t: float, flags: str, seq: int, ack: int = 0, data: bytes = b"", *,
        to_server: bool = True, sport: int = 40000, dport: int = 80) -> Ether:
    """One Ethernet frame at capture time `t`."""
    if to_server:
        ip, tcp = IP(src=CLIENT, dst=SERVER), TCP(sport=sport, dport=dport)
    else:
        ip, tcp = IP(src=SERVER, dst=CLIENT), TCP(sport=dport, dport=sport)
    tcp.flags, tcp.seq, tcp.ack = flags, seq, ack
    p = Ether() / ip / tcp / data if data else Ether() / ip / tcp
    p.time = 1000.0 + t
    return p


def write(tmp: Path, name: str, pkts: list[Ether]) -> Path:
    path = tmp / name
    wrpcap(str(path), pkts, linktype=1)
    return path


def handshake(c: int = 100, s: int = 500, sport: int = 40000) -> list[Ether]:
    return [seg(0.0, "S", c, sport=sport), seg(0.001, "SA", s, c + 1, to_server=False,
                                                sport=sport),
            seg(0.002, "A", c + 1, s + 1, sport=sport)]


REQ = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def http_session(tmp: Path) -> Path:
    """One request, its reply, both FINs."""
    pkts = handshake() + [
        seg(0.010, "PA", 101, 501, REQ),
        seg(0.020, "PA", 501, 101 + len(REQ), REPLY, to_server=False),
        seg(0.030, "FA", 101 + len(REQ), 501 + len(REPLY)),
        seg(0.031, "FA", 501 + len(REPLY), 102 + len(REQ), to_server=False),
    ]
    return write(tmp, "http.pcap", pkts)


# --- reassembly ------------------------------------------------------------------------


def test_retransmits_overlaps_and_reordering_deliver_each_byte_once(tmp_path: Path) -> None:
    data = b"abcdefghijklmnopqrstuvwxyz"
    pkts = handshake() + [
        seg(0.010, "PA", 101, 501, data[0:5]),
        seg(0.011, "PA", 101, 501, data[0:5]),  # retransmission
        seg(0.012, "PA", 111, 501, data[10:15]),  # early: waits for 5..10
        seg(0.013, "PA", 103, 501, data[2:10]),  # overlaps what came, fills the gap
        seg(0.014, "PA", 120, 501, data[19:26]),  # early again
        seg(0.015, "FA", 126, 501),  # FIN before the gap 15..19 is filled
        seg(0.016, "PA", 116, 501, data[15:19]),  # fills it: data then the close
    ]
    conv, = conversations(read_capture(write(tmp_path, "r.pcap", pkts)).packets, 80)
    kinds = [(round(e.ts - 1000, 3), e.kind, e.data) for e in conv.client_events]
    assert kinds == [(0.010, "data", b"abcde"), (0.013, "data", b"fghijklmno"),
                     (0.016, "data", b"pqrstuvwxyz"), (0.016, "close", b"")]
    assert b"".join(e.data for e in conv.client_events) == data
    assert conv.retransmitted >= 2 and conv.out_of_order == 2
    assert conv.syn_seen and conv.client == (CLIENT, 40000) and conv.server == (SERVER, 80)


def test_rst_ends_the_client_and_a_refused_syn_is_marked(tmp_path: Path) -> None:
    pkts = handshake() + [seg(0.01, "PA", 101, 501, b"hi"), seg(0.02, "R", 103, 0),
                          seg(0.03, "S", 900, sport=40001),
                          seg(0.031, "RA", 0, 901, to_server=False, sport=40001)]
    a, b = conversations(read_capture(write(tmp_path, "r.pcap", pkts)).packets, 80)
    assert [e.kind for e in a.client_events] == ["data", "reset"]
    assert not a.refused and b.refused


def test_a_repeated_syn_is_one_connection_and_port_reuse_another(tmp_path: Path) -> None:
    pkts = [seg(0.0, "S", 100), seg(1.0, "S", 100)] + [
        seg(1.001, "SA", 500, 101, to_server=False), seg(1.002, "A", 101, 501),
        seg(1.003, "FA", 101, 501), seg(1.004, "FA", 501, 102, to_server=False),
        seg(2.0, "S", 7000)]  # same ports, new ISN, after both FINs
    convs = conversations(read_capture(write(tmp_path, "r.pcap", pkts)).packets, 80)
    assert len(convs) == 2 and convs[1].opened == pytest.approx(1002.0)


def test_server_bytes_remember_how_much_the_client_had_sent(tmp_path: Path) -> None:
    conv, = conversations(read_capture(http_session(tmp_path)).packets, 80)
    chunk = conv.server_chunks[0]
    assert chunk.data == REPLY and chunk.client_before == len(REQ)
    assert conv.server_chunks[-1].end == "close"
    assert conv.client_events[-1].server_before == len(REPLY)


def test_the_service_port_is_guessed_from_syns_or_refused_when_ambiguous(tmp_path: Path
                                                                         ) -> None:
    one = read_capture(http_session(tmp_path)).packets
    assert guess_port(one) == 80
    two = write(tmp_path, "two.pcap", [seg(0, "S", 1), seg(0.1, "S", 1, dport=443)])
    with pytest.raises(HarnessError, match="several ports.*80.*443.*--service-port"):
        guess_port(read_capture(two).packets)
    none = write(tmp_path, "none.pcap", [seg(0, "PA", 1, 1, b"x")])
    with pytest.raises(HarnessError, match="no TCP connection attempt"):
        guess_port(read_capture(none).packets)


def test_raw_ip_and_cooked_captures_are_read_and_pcapng_is_refused(tmp_path: Path) -> None:
    ip = bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=1, dport=80, flags="S"))
    for linktype, head in ((101, b""), (113, b"\x00" * 14 + b"\x08\x00")):
        path = tmp_path / f"{linktype}.pcap"
        path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
                         + struct.pack("<IIII", 5, 0, len(head + ip), len(head + ip))
                         + head + ip)
        (p,) = read_capture(path).packets
        assert (p.dport, p.flags) == (80, 2)
    ng = tmp_path / "x.pcapng"
    ng.write_bytes(struct.pack("<I", 0x0A0D0D0A) + b"\0" * 28)
    with pytest.raises(CaptureError, match="pcapng.*editcap"):
        read_capture(ng)


def test_guest_log_text_stays_on_one_timeline_line() -> None:
    from fabric.activator import abi
    from fabric.activator.harness.timeline import action_record

    line = action_record(0.0012, abi.Log(2, "two\nlines\x1b[31m")).text()
    assert line.endswith("<- log                      warning: two\\nlines\\x1b[31m")
    assert "\n" not in line and line.lstrip().startswith("1.200 ms")


# --- the simulated backend ---------------------------------------------------------------


def _conv(client: list[bytes], server: list[tuple[int, bytes]]) -> Conversation:
    c = Conversation(0, (CLIENT, 1), (SERVER, 80), 0.0, True)
    t = 0.0
    for d in client:
        t += 1
        c.client_events.append(ClientEvent(t, "data", d))
    for before, d in server:
        c.server_chunks.append(ServerChunk(before + 0.5, before, d))
    return c


def test_a_reply_to_a_request_answered_locally_is_never_sent() -> None:
    # startup, a keep-alive the guest answers itself, then a real query
    conv = _conv([b"START", b"PING", b"QUERY"], [(5, b"hello"), (9, b"pong"), (14, b"rows")])
    b = SimBackend(conv)
    b.receive(b"START", 5)
    assert [ch.data for _, ch in b.due(0.0)] == [b"hello"]
    b.receive(b"QUERY", 14)  # found further on: PING never reached the backend
    assert [ch.data for _, ch in b.due(1.0)] == [b"rows"]
    assert b.dropped == 1


def test_replies_wait_for_what_they_answer_and_keep_their_order() -> None:
    conv = _conv([b"AAAA", b"BBBB"], [(4, b"a1"), (4, b"a2"), (8, b"b")])
    b = SimBackend(conv)
    assert b.due(0.0) == []
    b.receive(b"AAAA", 8)
    first = b.due(0.0)
    assert [ch.data for _, ch in first] == [b"a1", b"a2"]
    b.receive(b"BBBB", 8)
    (at, ch), = b.due(0.0)
    assert ch.data == b"b" and at >= first[-1][0]


# --- replays and the CLI -------------------------------------------------------------------


def test_a_stream_replay_wakes_relays_and_is_deterministic(tmp_path: Path) -> None:
    pcap = http_session(tmp_path)
    r1 = replay(STREAM_WASM, pcap, backend_ready_at="wake+0.5")
    r2 = replay(STREAM_WASM, pcap, backend_ready_at="wake+0.5")
    assert r1.text == r2.text and r1.ok
    assert r1.woke and r1.wake_at == 0.0 and r1.backend_ready_at == pytest.approx(0.5)
    assert r1.to_clients == {1: REPLY}
    assert "stream_open" in r1.text and '"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"' in r1.text


def test_without_a_backend_the_client_gets_nothing_and_need_stays_active(tmp_path: Path
                                                                         ) -> None:
    r = replay(STREAM_WASM, http_session(tmp_path))
    assert r.woke and r.final_need == "active" and not r.to_clients
    assert Expectation.parse("no-wake").check(r) == "no-wake: woken at 0.000 ms"


def test_a_packet_trap_names_the_function_and_exits_1(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    rc = main(["activator", "test", str(ACT / "testing" / "trap.wasm"), "--pcap",
               str(http_session(tmp_path)), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "traps" in err[0] and "unreachable" in err[0] and "fab_process (func[" in err[0]
    assert "fuel used" in err[0] and "packet(#1" in err[0]


def test_a_stream_trap_is_reported_with_its_event_batch(tmp_path: Path) -> None:
    pkts = handshake() + [seg(0.01, "PA", 101, 501, b"TRAP now")]
    r = replay(ACT / "testing" / "streamtrap.wasm", write(tmp_path, "t.pcap", pkts),
               backend_ready_at=0)
    f = r.failures[0]
    assert f["reason"] == "traps" and f["during"] == "process"
    assert any("fab_process" in fr for fr in f["frames"])
    assert "stream_data(#1, 8 B)" in f["events"] and f["fuel_used"] > 0
    assert "!! traps" in r.text and not r.ok
    assert r.core_counters["fallback_proxied"] == 1  # the host's fallback took the stream


def test_an_unmet_expectation_exits_1_with_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    rc = main(["activator", "test", str(TCP_WASM), "--pcap", str(http_session(tmp_path)),
               "--expect", "no-wake", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "expectation not met: no-wake: woken at 0.000 ms" in err


def test_expectations_that_hold_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    rc = main(["activator", "test", str(TCP_WASM), "--pcap", str(http_session(tmp_path)),
               "--backend-ready-at", "wake+0.1", "--expect", "wake", "--expect",
               "need=active", "--expect", "local-answers=0", "--expect", "count:x=0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "<- packet_decision          pkt 1 hold" in out
    assert "<- replay_packet            pkt 1" in out  # released when the backend came
    assert out.splitlines()[-1].startswith("# packet activator, port 80:")


def test_golden_files_are_written_matched_and_their_difference_shown(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pcap, golden = str(http_session(tmp_path)), tmp_path / "g.timeline"
    args = ["activator", "test", str(STREAM_WASM), "--pcap", pcap, "-q",
            "--expect", f"golden={golden}"]
    assert main(args) == 1
    assert "no such file (write it with --update-golden)" in capsys.readouterr().err
    assert main([*args, "--update-golden"]) == 0
    assert main(args) == 0
    lines = golden.read_text().splitlines()
    lines[1] += " (edited)"
    golden.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(args) == 1
    assert "line 2 differs" in capsys.readouterr().err


def test_json_output_has_records_and_a_summary(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["activator", "test", str(STREAM_WASM), "--pcap",
                 str(http_session(tmp_path)), "--backend-ready-at", "0.005", "-o",
                 "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    tick, first = doc["records"][:2]  # the host tells a port's first stream the time
    assert (tick["t_ms"], tick["kind"], tick["name"]) == (0.0, "event", "tick")
    assert (first["t_ms"], first["kind"], first["name"], first["stream"]) == (
        0.0, "event", "stream_open", 1)
    assert {"t_ms": 5.0, "kind": "sim", "name": "backend_ready",
            "detail": SERVER} in doc["records"]
    s = doc["summary"]
    assert s["mode"] == "stream" and s["failures"] == [] and s["fuel_used"] > 0
    assert s["woke"] is True and s["wake_at_ms"] == 0.0  # the open came before readiness
    assert s["bytes_to_clients"] == len(REPLY)
    assert {"need_history", "counters", "max_fuel_per_call", "traps"} <= set(s)


@pytest.mark.parametrize("argv, message", [
    (["x.wasm", "--pcap", "PCAP"], "x.wasm"),
    (["WASM", "--pcap", "/nonexistent.pcap"], "/nonexistent.pcap: no such file"),
    (["WASM", "--pcap", "README"], "not a pcap file"),
    (["README", "--pcap", "PCAP"], "not a WebAssembly module"),
    (["WASM", "--pcap", "PCAP", "--config", "{x"], "--config is not JSON"),
    (["WASM", "--pcap", "PCAP", "--config", "[1]"], "--config must be a JSON object"),
    (["WASM", "--pcap", "PCAP", "--expect", "bogus"], "--expect 'bogus'"),
    (["WASM", "--pcap", "PCAP", "--backend-ready-at", "soon"], "--backend-ready-at"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, argv: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    sub = {"WASM": str(TCP_WASM), "PCAP": str(http_session(tmp_path)),
           "README": str(ROOT / "README.md")}
    assert main(["activator", "test", *[sub.get(a, a) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_the_command_runs_as_a_subprocess_without_a_daemon(tmp_path: Path) -> None:
    pcap = str(http_session(tmp_path))
    cmd = [sys.executable, "-m", "fabric", "activator", "test"]
    ok = subprocess.run([*cmd, str(STREAM_WASM), "--pcap", pcap, "--backend-ready-at",
                         "wake+0.2", "--expect", "wake", "--expect", "client-bytes>=40"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "** backend_ready" in ok.stdout and ok.stderr == ""
    bad = subprocess.run([*cmd, str(TCP_WASM), "--pcap", str(ROOT / "README.md")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    helptext = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=ROOT,
                              timeout=60).stdout
    for word in ("--backend-ready-at", "--expect", "local-answers=N", "golden=FILE",
                 "no-wake", "--update-golden", "-o", "exit codes"):
        assert word in helptext


@pytest.mark.parametrize("module, reason", [("loop", "out_of_fuel"), ("garbage", "malformed")])
def test_fuel_exhaustion_and_malformed_answers_exit_1(tmp_path: Path, module: str, reason: str,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    rc = main(["activator", "test", str(ACT / "testing" / f"{module}.wasm"), "--pcap",
               str(http_session(tmp_path)), "--fuel", "200000", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"fabricd: activator test: {reason} at 0.000 ms")


def test_a_spinning_guest_hits_the_deadline_and_exits_1(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    rc = main(["activator", "test", str(ACT / "testing" / "loop.wasm"), "--pcap",
               str(http_session(tmp_path)), "--fuel", str(10**12), "--deadline-ms", "5",
               "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("fabricd: activator test: deadline at 0.000 ms")
    assert "interrupt at fab_process" in err
