"""Stream-level replay: real client sessions captured with tshark through the
PostgreSQL activator (pcaps/pg_sessions, made by pcaps/pg_capture.py: psql, then
psycopg), replayed through the activator and the real wasm host (StreamGuest).

Both captures are reassembled into TCP payloads per connection and direction. The
client side (client <-> VIP) and the backend side (VIP <-> db:5432) are merged by
capture time and fed to the guest as the host would: connection opened, client bytes,
the upstream connected, backend bytes, ends. Checked: the guest asks for an upstream
once per session; every byte it sends toward the backend is exactly what the database
received, every byte it sends the client exactly what the client received, in order;
the keep-alives it answered never reached the database; no call fails.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from fabric.net.pcap import read_pcap
from tests.support.streamguest import StreamGuest

ROOT = Path(__file__).resolve().parents[2]
CASE = ROOT / "pcaps" / "pg_sessions"
WASM = ROOT / "activators" / "postgres" / "postgres.wasm"
VIP = bytes([10, 42, 0, 100])
PORT = 5432
SYN, FIN, RST = 0x02, 0x01, 0x04


@dataclass
class Conn:
    """One TCP connection's payload per direction, as (time, bytes) segments."""

    syn: float
    synack: float | None = None
    fwd: list[tuple[float, bytes]] = field(default_factory=list)  # initiator -> responder
    rev: list[tuple[float, bytes]] = field(default_factory=list)
    fin: float | None = None  # the initiator's FIN or RST
    rfin: float | None = None
    _next: dict[bool, int] = field(default_factory=dict)

    def add(self, forward: bool, seq: int, data: bytes, t: float) -> None:
        """Append payload in sequence order, dropping what was already seen (retransmits)."""
        nxt = self._next.get(forward)
        if nxt is not None:
            skip = (nxt - seq) & 0xFFFFFFFF
            if skip >= len(data) or skip > 1 << 30:
                if skip > 1 << 30:  # a gap: keep it (captures here lose nothing)
                    skip = 0
                else:
                    return
            data = data[skip:]
            seq = (seq + skip) & 0xFFFFFFFF
        if data:
            (self.fwd if forward else self.rev).append((t, data))
            self._next[forward] = (seq + len(data)) & 0xFFFFFFFF


def connections(path: Path, server_port: int) -> list[Conn]:
    """TCP connections toward server_port in a capture, by SYN time."""
    conns: dict[tuple[bytes, int, bytes, int], Conn] = {}
    for t, frame in read_pcap(path.read_bytes()):
        if frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        if ip[9] != 6:
            continue
        total = struct.unpack_from("!H", ip, 2)[0]
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack_from("!HHI", tcp)
        flags = tcp[13]
        data = tcp[(tcp[12] >> 4) * 4:]
        src, dst = ip[12:16], ip[16:20]
        forward = dport == server_port
        key = (src, sport, dst, dport) if forward else (dst, dport, src, sport)
        c = conns.get(key)
        if c is None:
            if not (forward and flags & SYN):
                continue
            c = conns[key] = Conn(t)
        if flags & SYN:
            c._next[forward] = (seq + 1) & 0xFFFFFFFF
            if not forward:
                c.synack = t
            continue
        if data:
            c.add(forward, seq, data, t)
        if flags & (FIN | RST):
            if forward and c.fin is None:
                c.fin = t
            elif not forward and c.rfin is None:
                c.rfin = t
    return sorted(conns.values(), key=lambda c: c.syn)


def test_captured_sessions_replay_through_the_activator() -> None:
    clients = connections(CASE / "client.pcap", PORT)
    backends = [c for c in connections(CASE / "backend.pcap", PORT) if c.fwd]
    assert len(clients) == 2 and len(backends) == 2  # psql, then psycopg
    events: list[tuple[float, int, str, bytes]] = []
    for sid, (c, b) in enumerate(zip(clients, backends, strict=True), start=1):
        events.append((c.syn, sid, "open", b""))
        events += [(t, sid, "client", d) for t, d in c.fwd]
        assert b.synack is not None
        events.append((b.synack, sid, "connected", b""))
        events += [(t, sid, "backend", d) for t, d in b.rev]
        if c.fin is not None:
            events.append((c.fin, sid, "client_close", b""))
    events.sort(key=lambda e: e[0])
    g = StreamGuest(WASM, {"hold_timeout_ms": 30000}, port=PORT)
    sent_up = {1: b"", 2: b""}
    sent_down = {1: b"", 2: b""}
    try:
        for _t, sid, kind, data in events:
            if kind == "open":
                g.open(sid)
            elif kind == "client":
                g.client(sid, data)
            elif kind == "connected":
                assert g.streams[sid].connects == [0], "the guest connects once per session"
                g.connected(sid)
            elif kind == "backend":
                g.backend(sid, data)
            else:
                g.client_close(sid)
            for s in (1, 2):
                sent_up[s] += g.to_backend(s)
                sent_down[s] += g.to_client(s)
        assert g.failed == 0
    finally:
        g.close()
    for sid, (c, b) in enumerate(zip(clients, backends, strict=True), start=1):
        client_sent = b"".join(d for _, d in c.fwd)
        assert sent_up[sid] == b"".join(d for _, d in b.fwd), f"to the backend, session {sid}"
        assert sent_down[sid] == b"".join(d for _, d in c.rev), f"to the client, session {sid}"
        # The keep-alives the client sent never reached the database.
        assert b"select 1\0" in client_sent.lower(), f"no keep-alive in session {sid}"
    assert b"select 1\0" not in sent_up[1].lower()  # psql: simple Query "select 1"
    # psycopg: of its simple-Query "SELECT 1"s only the one inside the transaction went up
    q = b"Q\0\0\0\rSELECT 1\0"
    assert b"".join(d for _, d in clients[1].fwd).count(q) == 2 and sent_up[2].count(q) == 1
