"""A real PostgreSQL server for tests, and the few wire-protocol helpers tests need.

Why our own: the PostgreSQL activator's tests compare what it answers with what a real
server answers, byte for byte, and run real clients (psql, pgbench, psycopg) through it.
``PgServer`` runs the installed PostgreSQL 15 (``initdb`` + ``postgres``) in a temporary
directory as an ordinary user (``nobody`` when we are root), trust authentication, a
unix socket in that directory and optionally a TCP address. Nothing here needs a
network namespace; the e2e tests start the same server inside a pod's namespace by
passing ``netns``.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

PGBIN = Path("/usr/lib/postgresql/15/bin")
PROTO_30 = 3 << 16
PROTO_32 = (3 << 16) | 2
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)


def available() -> bool:
    """Whether the PostgreSQL 15 server binaries are installed."""
    return (PGBIN / "postgres").is_file() and (PGBIN / "initdb").is_file()


def _as_user() -> list[str]:
    """A prefix that drops root (postgres refuses to run as root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


class PgServer:
    """One PostgreSQL cluster in ``root`` (created, started, stopped by this object)."""

    def __init__(self, root: Path, *, listen: str = "", port: int = 5432,
                 netns: str | None = None, ssl_cert: tuple[Path, Path] | None = None,
                 max_connections: int = 100) -> None:
        self.root = root
        self.data = root / "data"
        self.sockdir = root / "sock"
        self.listen = listen
        self.port = port
        self.netns = netns
        self.ssl_cert = ssl_cert
        self.max_connections = max_connections
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []

    def _cmd(self, argv: list[str]) -> list[str]:
        pre = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*pre, *_as_user(), *argv]

    def init(self) -> PgServer:
        """initdb and the server's files, without starting it (a hook may start it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            for p in (self.root, self.sockdir):
                os.chown(p, 65534, 65534)
        subprocess.run(self._cmd([str(PGBIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                                  "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        opts = ["-c", f"listen_addresses={self.listen}", "-k", str(self.sockdir), "-p",
                str(self.port), "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", f"max_connections={self.max_connections}",
                "-c", "shared_buffers=32MB"]
        if self.ssl_cert:
            cert, key = self.ssl_cert
            for src, name in ((cert, "server.crt"), (key, "server.key")):
                dst = self.data / name
                shutil.copy(src, dst)
                os.chmod(dst, 0o600)
                if os.geteuid() == 0:
                    os.chown(dst, 65534, 65534)
            opts += ["-c", "ssl=on", "-c", "ssl_cert_file=server.crt", "-c",
                     "ssl_key_file=server.key"]
        if self.listen:
            with open(self.data / "pg_hba.conf", "a") as f:
                f.write("host all all 0.0.0.0/0 trust\nhostssl all all 0.0.0.0/0 trust\n")
        self.argv = self._cmd([str(PGBIN / "postgres"), "-D", str(self.data), *opts])
        return self

    def start(self) -> PgServer:
        self.init()
        self.log = open(self.root / "postgres.log", "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not (self.sockdir / f".s.PGSQL.{self.port}").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("postgres did not start: "
                                   + (self.root / "postgres.log").read_text()[-2000:])
            time.sleep(0.05)
        # The socket file appears before the server accepts sessions; wait for one.
        while True:
            try:
                RawPg.unix(self.socket_path).close()
                break
            except (OSError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return self

    @property
    def socket_path(self) -> str:
        return str(self.sockdir / f".s.PGSQL.{self.port}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The postmaster and its children (to freeze and thaw them)."""
        out = [self.pid]
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    stat = (p / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.pid:
                    out.append(int(p.name))
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            for pid in self.pids():  # a frozen server cannot stop
                try:
                    os.kill(pid, 18)  # SIGCONT
                except ProcessLookupError:
                    pass
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- wire helpers ---------------------------------------------------------------------


def startup(user: str = "postgres", database: str = "postgres", proto: int = PROTO_30,
            **params: str) -> bytes:
    body = struct.pack("!i", proto)
    for k, v in {"user": user, "database": database, **params}.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def msg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


def parse(sql: str, name: str = "", types: tuple[int, ...] = ()) -> bytes:
    return msg(b"P", name.encode() + b"\0" + sql.encode() + b"\0"
               + struct.pack("!h", len(types)) + b"".join(struct.pack("!i", t) for t in types))


def bind(portal: str = "", stmt: str = "", result_formats: tuple[int, ...] = (0,),
         params: tuple[bytes | None, ...] = ()) -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!h", 0)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    body += struct.pack("!h", len(result_formats)) + b"".join(
        struct.pack("!h", f) for f in result_formats)
    return msg(b"B", body)


def describe(kind: bytes, name: str = "") -> bytes:
    return msg(b"D", kind + name.encode() + b"\0")


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", portal.encode() + b"\0" + struct.pack("!i", max_rows))


def close(kind: bytes, name: str = "") -> bytes:
    return msg(b"C", kind + name.encode() + b"\0")


SYNC = msg(b"S")
FLUSH = msg(b"H")
TERMINATE = msg(b"X")


def split(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split whole backend messages into (type, body); a partial tail is an error."""
    out = []
    i = 0
    while i < len(data):
        if len(data) - i < 5:
            raise ValueError(f"partial message header at {i}")
        (n,) = struct.unpack_from("!i", data, i + 1)
        if len(data) - i < 1 + n:
            raise ValueError(f"partial message at {i}")
        out.append((data[i:i + 1], data[i + 5:i + 1 + n]))
        i += 1 + n
    return out


def count_rfq(data: bytes) -> int:
    """ReadyForQuery messages among whole messages at the start of data."""
    n = 0
    i = 0
    while len(data) - i >= 5:
        (ln,) = struct.unpack_from("!i", data, i + 1)
        if len(data) - i < 1 + ln:
            break
        if data[i:i + 1] == b"Z":
            n += 1
        i += 1 + ln
    return n


class RawPg:
    """A hand-driven client connection to a real server (for capturing its answers)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)

    @classmethod
    def unix(cls, path: str, *, proto: int = PROTO_30) -> RawPg:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        c = cls(s)
        c.greeting = c.exchange(startup(proto=proto), 1)
        return c

    def exchange(self, data: bytes, rfq: int) -> bytes:
        """Send data, return everything up to and including the rfq-th ReadyForQuery."""
        if data:
            self.sock.sendall(data)
        got = b""
        while count_rfq(got) < rfq:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed")
            got += chunk
        return got

    def close(self) -> None:
        try:
            self.sock.sendall(TERMINATE)
        except OSError:
            pass
        self.sock.close()
