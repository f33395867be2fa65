"""Reloading a packet port's activator on the data plane (ServiceDispatch)."""

from __future__ import annotations

from fabric.config.specs import PortSpec
from fabric.router.router import Router
from fabric.services.core import Service
from fabric.services.dispatch import ServiceDispatch


def test_a_reloaded_packet_activator_takes_the_next_packet_and_the_old_is_closed() -> None:
    """dispatch.replace_activator: the new host hears that a backend is ready, the old
    one is closed; held packets stay with the service core."""
    class Host:
        def __init__(self) -> None:
            self.seen: list[object] = []
            self.closed = False

        def process(self, port: int, events: list[object]) -> list[object]:
            self.seen.extend(events)
            return []

        def close(self) -> None:
            self.closed = True

    r = Router("shop", "10.10.0.0/24")
    dispatch = ServiceDispatch(r)
    svc = Service("site", "10.10.0.100", (PortSpec(80, 8080, "tcp"),), readiness="external")
    old, new = Host(), Host()
    dispatch.add(svc, {(80, 6): old})  # type: ignore[dict-item]
    dispatch.set_backend(svc, "web", "10.10.0.3", True, 1.0)
    dispatch.replace_activator(svc, (80, 6), new)  # type: ignore[arg-type]
    assert old.closed and not new.closed
    assert dispatch.activators[svc][(80, 6)] is new
    assert [type(e).__name__ for e in new.seen] == ["BackendAvailable"]
