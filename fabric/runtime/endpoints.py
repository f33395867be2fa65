"""Peer endpoints given as host names, resolved on the event loop's resolver threads.

The tunnel core and link only ever see numeric addresses: a name handed to `sendto()`
would be looked up (blocking, seconds with a dead nameserver) on the data-plane thread at
every send. Names are looked up when a peer is applied and again every
`REFRESH_INTERVAL`; a changed answer moves the peer, an unanswered lookup keeps the last
good address (or leaves the peer without one until a lookup succeeds).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

log = logging.getLogger("fabricd.tunnel")

RESOLVE_TIMEOUT = 5.0
REFRESH_INTERVAL = 60.0

Addr = tuple[str, int]


def is_numeric(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


class EndpointResolver:
    """The last answer for each named peer endpoint."""

    def __init__(self, timeout: float = RESOLVE_TIMEOUT) -> None:
        self.timeout = timeout
        self.answers: dict[str, Addr | None] = {}  # peer id -> last good answer
        self.failures = 0

    async def resolve(self, peer_id: str, endpoint: Addr | None) -> Addr | None:
        """The numeric endpoint to give the core: as is, looked up, or the last good one
        (None if there never was one)."""
        if endpoint is None:
            self.answers.pop(peer_id, None)
            return None
        host, port = endpoint
        if is_numeric(host):
            self.answers.pop(peer_id, None)
            return endpoint
        last = self.answers.get(peer_id)
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM),
                self.timeout)
            addr: Addr = (str(infos[0][4][0]), port)
        except (OSError, TimeoutError, IndexError) as e:
            self.failures += 1
            reason = "timed out" if isinstance(e, TimeoutError) else (
                getattr(e, "strerror", None) or str(e))
            log.warning("peer %s: cannot resolve %s (%s); %s", peer_id, host, reason,
                        f"keeping {last[0]}" if last else "no endpoint until it resolves")
            self.answers.setdefault(peer_id, None)
            return last
        if addr != last:
            log.info("peer %s: %s is %s", peer_id, host, addr[0])
        self.answers[peer_id] = addr
        return addr

    def forget(self, peer_id: str) -> None:
        self.answers.pop(peer_id, None)

    def named(self) -> list[str]:
        """Peers whose endpoint is a name (to look up again)."""
        return list(self.answers)
