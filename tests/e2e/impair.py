"""A UDP relay that impairs what it carries: loss, delay and reordering, as `tc netem`
would on the underlay (this kernel has no netem). Run inside a namespace between two
workers: each worker's peer endpoint is the relay's address on its side.

python -m tests.e2e.impair A_LISTEN A_PEER B_LISTEN B_PEER --loss 0.05 --delay 0.02
    --reorder 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys


def hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


class Side(asyncio.DatagramProtocol):
    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay.carry(self.name, data)


class Relay:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.sides: dict[str, Side] = {}
        self.peers = {"a": hostport(args.a_peer), "b": hostport(args.b_peer)}
        self.loop = asyncio.get_running_loop()

    def carry(self, came_from: str, data: bytes) -> None:
        a = self.args
        if self.rng.random() < a.loss:
            return
        delay = a.delay
        if self.rng.random() < a.reorder:
            delay += a.delay / 2 + 0.005  # overtaken by the packets behind it
        to = "b" if came_from == "a" else "a"
        self.loop.call_later(delay, self._send, to, data)

    def _send(self, to: str, data: bytes) -> None:
        t = self.sides[to].transport
        if t is not None:
            t.sendto(data, self.peers[to])


async def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a_listen")
    ap.add_argument("a_peer")
    ap.add_argument("b_listen")
    ap.add_argument("b_peer")
    ap.add_argument("--loss", type=float, default=0.05)
    ap.add_argument("--delay", type=float, default=0.02)
    ap.add_argument("--reorder", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    relay = Relay(args)
    loop = asyncio.get_running_loop()
    for name, listen in (("a", args.a_listen), ("b", args.b_listen)):
        _, proto = await loop.create_datagram_endpoint(lambda n=name: Side(relay, n),
                                                       local_addr=hostport(listen))
        relay.sides[name] = proto
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
