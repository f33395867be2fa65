"""Re-record the captures of real clients that `fabricd activator test` replays in the suite.

Each session runs in two fresh network namespaces joined by a veth (client 10.77.0.1,
server 10.77.0.2), the real server in one and the real client in the other, with tcpdump
on the client's interface writing `<name>.pcap` here (Ethernet, only the service port).
Nothing goes through the fabric: these are what clients and servers say to each other,
which is what the harness replays. Run as root, under the end-to-end lock:

    sudo flock /tmp/fabricd-e2e.lock .venv/bin/python tests/replay/captures/record.py [NAME ...]

then regenerate the expected timelines (FABRIC_REGEN_TIMELINES=1, see
tests/replay/test_activator_captures.py) and review both differences before committing.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from fabric.tools.sandbox import Sandbox  # noqa: E402
from tests.support import pgwire  # noqa: E402

CLIENT, SERVER = "10.77.0.1", "10.77.0.2"

PING_CLIENT = textwrap.dedent("""
    import socket, time, h2.connection, h2.config, h2.events
    s = socket.create_connection(("10.77.0.2", 8080), timeout=10)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    for i in range(3):
        time.sleep(0.2)
        c.ping(b"keep%04d" % i)
        s.sendall(c.data_to_send())
        while not any(isinstance(e, h2.events.PingAckReceived)
                      for e in c.receive_data(s.recv(65536))):
            pass
    c.close_connection()
    s.sendall(c.data_to_send())
    s.close()
""")


class Session:
    """The two namespaces of one recording."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.client = sb.netns("client")
        self.server = sb.netns("server")
        self.cleanup: list[Callable[[], None]] = []
        sb.link(self.client, "eth0", f"{CLIENT}/24", self.server, "eth0", f"{SERVER}/24")
        # no offloads: segments on the wire as the peers' stacks cut them
        for ns in (self.client, self.server):
            sb.run(ns, "ethtool", "-K", "eth0", "tso", "off", "gso", "off", "gro", "off",
                   check=False)

    def record(self, name: str, port: int, clients: Callable[[Session], None]) -> None:
        tmp = Path(self.sb.tmp) / f"{name}.pcap"
        dump = self.sb.popen(self.client, "tcpdump", "-i", "eth0", "-s", "0", "-U", "-n",
                             "--immediate-mode", "-w", str(tmp), "tcp", "port", str(port))
        assert dump.stderr is not None
        dump.stderr.readline()  # "listening on eth0 ...": the capture has begun
        time.sleep(0.2)
        clients(self)
        time.sleep(0.3)
        self.sb.stop(dump, signal.SIGINT)
        print(dump.stderr.read().decode().strip().replace("\n", "; "))
        shutil.copy(tmp, HERE / f"{name}.pcap")
        print(f"{name}.pcap: {(HERE / f'{name}.pcap').stat().st_size} bytes")

    def run(self, *cmd: str, input: str | None = None) -> None:
        self.sb.run(self.client, *cmd, input=input, timeout=60)


def http_curl(s: Session) -> None:
    s.sb.http_server(s.server, 8080)

    def clients(s: Session) -> None:
        s.run("curl", "-sS", "-o", "/dev/null", "-o", "/dev/null",
              f"http://{SERVER}:8080/bytes/64", f"http://{SERVER}:8080/bytes/300")
        time.sleep(0.2)
        s.run("curl", "-sS", "-o", "/dev/null", f"http://{SERVER}:8080/bytes/32")

    s.record("http_curl", 8080, clients)


def http_healthz(s: Session) -> None:
    """An uptime monitor's checks, then a real request (for an HTTP/1.1 activator)."""
    s.sb.http_server(s.server, 8080)

    def clients(s: Session) -> None:
        for _ in range(3):
            s.run("curl", "-sS", "-o", "/dev/null", f"http://{SERVER}:8080/healthz")
            time.sleep(0.2)
        s.run("curl", "-sS", "-o", "/dev/null", f"http://{SERVER}:8080/bytes/100")

    s.record("http_healthz", 8080, clients)


def _nghttpd(s: Session) -> None:
    docs = Path(s.sb.tmp) / "htdocs"
    docs.mkdir(exist_ok=True)
    (docs / "index.html").write_text("<h1>hello from nghttpd</h1>\n")
    s.sb.popen(s.server, "nghttpd", "--no-tls", "-d", str(docs), "8080")
    s.sb.wait_port(s.server, 8080)


def h2_h2load(s: Session) -> None:
    _nghttpd(s)
    s.record("h2_h2load", 8080, lambda s: s.run("h2load", "-n", "10", "-c", "2", "-m", "5",
                                                f"http://{SERVER}:8080/"))


def h2_nghttp(s: Session) -> None:
    _nghttpd(s)
    s.record("h2_nghttp", 8080, lambda s: s.run("nghttp", "-n", f"http://{SERVER}:8080/"))


def h2_ping(s: Session) -> None:
    _nghttpd(s)
    s.record("h2_ping", 8080, lambda s: s.run(sys.executable, "-c", PING_CLIENT))


def _postgres(s: Session) -> pgwire.PgServer:
    root = Path(tempfile.mkdtemp(prefix="fbc-pg-"))  # postgres runs as nobody: not in tmp
    s.cleanup.append(lambda: shutil.rmtree(root, ignore_errors=True))
    return pgwire.PgServer(root, listen=SERVER, netns=s.server).start()


def pg_psql(s: Session) -> None:
    pg = _postgres(s)

    def clients(s: Session) -> None:
        # a session that works a little, then keeps itself alive with SELECT 1 while idle
        p = subprocess.Popen(["ip", "netns", "exec", s.client, "psql", "-X", "-q", "-h",
                              SERVER, "-U", "postgres", "postgres"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True)
        assert p.stdin is not None
        for line in ["SELECT count(*) FROM pg_class;"] + ["SELECT 1;"] * 4:
            time.sleep(0.3)
            p.stdin.write(line + "\n")
            p.stdin.flush()
        time.sleep(0.3)
        p.stdin.close()
        p.wait(30)

    try:
        s.record("pg_psql", 5432, clients)
    finally:
        pg.stop()


def pg_pgbench(s: Session) -> None:
    pg = _postgres(s)
    script = Path(s.sb.tmp) / "keepalive.sql"
    script.write_text("SELECT 1;\n")
    try:
        s.record("pg_pgbench", 5432, lambda s: s.run(
            "pgbench", "-n", "-h", SERVER, "-U", "postgres", "-c", "1", "-t", "5",
            "-M", "extended", "-f", str(script), "postgres"))
    finally:
        pg.stop()


SESSIONS: dict[str, Callable[[Session], None]] = {
    "http_curl": http_curl, "http_healthz": http_healthz, "h2_h2load": h2_h2load,
    "h2_nghttp": h2_nghttp, "h2_ping": h2_ping, "pg_psql": pg_psql, "pg_pgbench": pg_pgbench}


def main(argv: list[str]) -> int:
    names = argv or list(SESSIONS)
    unknown = [n for n in names if n not in SESSIONS]
    if unknown:
        print(f"unknown session(s) {unknown}; known: {', '.join(SESSIONS)}", file=sys.stderr)
        return 2
    for name in names:
        with Sandbox("fbc") as sb:
            session = Session(sb)
            try:
                SESSIONS[name](session)
            finally:
                for fn in session.cleanup:
                    fn()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
