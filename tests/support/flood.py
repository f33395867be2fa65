"""A flood of handshake initiations with a valid mac1 (what anyone who has a worker's
public key can send), for the e2e tests and the flood benchmark:
``python -m tests.support.flood HOST:PORT PUBLIC_KEY_B64 RATE SECONDS [init|junk]``
sends them from 64 source ports at RATE per second and prints how many it sent.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
import time

from tunnels import messages
from tunnels.cookie import hash32, mac16

SOURCES = 64  # the flooder's source ports


def initiations(public_key: bytes, n: int = 4096) -> list[bytes]:
    """`n` initiations with a valid mac1 for `public_key` and garbage Noise inside."""
    key = hash32(messages.LABEL_MAC1 + public_key)
    out = []
    for i in range(n):
        body = messages.INDEX_HEADER.pack(messages.TYPE_INITIATION, i + 1)
        body += os.urandom(messages.NOISE_MSG1_LEN)
        out.append(body + mac16(key, body) + bytes(messages.MAC_LEN))
    return out


def flood(target: tuple[str, int], public_key: bytes, rate: int, seconds: float,
          kind: str = "init") -> int:
    """Send initiations (or, `junk`, 148-byte datagrams of no known type, which cost no
    crypto anywhere) to `target` at `rate` for `seconds`; returns how many went."""
    if kind == "junk":
        msgs = [b"\x09\0\0\0" + os.urandom(144) for _ in range(4096)]
    else:
        msgs = initiations(public_key)
    socks = []
    for _ in range(SOURCES):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("0.0.0.0", 0))
        socks.append(s)
    sent = 0
    t0 = time.monotonic()
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= seconds:
            break
        due = int(elapsed * rate)
        while sent < due:
            try:
                socks[sent % SOURCES].sendto(msgs[sent & 4095], target)
            except (BlockingIOError, ConnectionRefusedError):
                pass
            sent += 1
        time.sleep(0.0005)
    return sent



def main(argv: list[str]) -> int:
    host, port = argv[0].rsplit(":", 1)
    print(flood((host, int(port)), base64.b64decode(argv[1]), int(argv[2]), float(argv[3]),
                argv[4] if len(argv) > 4 else "init"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
