"""Capture real HTTP/2 client sessions for the stream-level replay of the HTTP/2
activator (tests/unit/test_http2_replay.py).

Each session runs in a fresh network namespace on its loopback: the real server
(nghttpd, or a grpcio server) on 127.0.0.1, the real client against it, tshark writing
`pcaps/h2_<name>/session.pcap`. Only the bytes matter to the replay (the client's stream
is fed to the activator, the server is played by python h2), so this is run only to
change a capture on purpose: `sudo .venv/bin/python pcaps/make_h2_pcaps.py [name ...]`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fabric.tools.sandbox import Sandbox

HERE = Path(__file__).resolve().parent

GRPC_SERVER = """
import grpc
from concurrent import futures
h = grpc.method_handlers_generic_handler("fab.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"echo:" + req),
    "Stream": grpc.unary_stream_rpc_method_handler(
        lambda req, ctx: (b"item%d" % i for i in range(int(req))))})
s = grpc.server(futures.ThreadPoolExecutor(4))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port("127.0.0.1:8080")
s.start()
s.wait_for_termination()
"""

GRPC_CLIENT = """
import grpc
ch = grpc.insecure_channel("127.0.0.1:8080", options=[("grpc.enable_http_proxy", 0)])
print(ch.unary_unary("/fab.Echo/Unary")(b"hi", timeout=10))
print(list(ch.unary_stream("/fab.Echo/Stream")(b"3", timeout=10)))
"""

PING_CLIENT = """
import socket, h2.connection, h2.config, h2.events
s = socket.create_connection(("127.0.0.1", 8080), timeout=10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
for i in range(3):
    c.ping(b"keep%04d" % i)
    s.sendall(c.data_to_send())
    while not any(isinstance(e, h2.events.PingAckReceived) for e in c.receive_data(s.recv(65536))):
        pass
c.close_connection()
s.sendall(c.data_to_send())
"""


def sessions(tmp: str) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (server argv, client argv)."""
    root = os.path.join(tmp, "docroot")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("hello over h2\n")
    nghttpd = ["nghttpd", "--no-tls", "-d", root, "8080"]
    py = sys.executable
    return {
        "h2load": (nghttpd, ["h2load", "-n", "20", "-c", "1", "-m", "5",
                             "http://127.0.0.1:8080/"]),
        "nghttp": (nghttpd, ["nghttp", "-n", "http://127.0.0.1:8080/",
                             "http://127.0.0.1:8080/index.html"]),
        "grpc": ([py, "-c", GRPC_SERVER], [py, "-c", GRPC_CLIENT]),
        "ping": (nghttpd, [py, "-c", PING_CLIENT]),
    }


def capture(sb: Sandbox, name: str, server: list[str], client: list[str]) -> None:
    ns = sb.netns(name)
    out = HERE / f"h2_{name}"
    out.mkdir(exist_ok=True)
    pcap = out / "session.pcap"
    srv = sb.popen(ns, *server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sb.wait_port(ns, 8080)
    cap = sb.popen(ns, "tshark", "-q", "-i", "lo", "-f", "tcp port 8080", "-F", "pcap",
                   "-w", str(pcap), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.5)  # tshark is listening
    sb.run(ns, *client, timeout=30)
    time.sleep(0.5)
    sb.stop(cap)
    sb.stop(srv)
    print(f"{pcap.relative_to(HERE.parent)}: {pcap.stat().st_size} bytes")


def main(argv: list[str]) -> int:
    with Sandbox("fbp") as sb, tempfile.TemporaryDirectory() as tmp:
        todo = sessions(tmp)
        for name in argv or list(todo):
            capture(sb, name, *todo[name])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
