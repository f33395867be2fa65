"""ServiceDispatch on the data plane: reloading a packet port's activator, replies of
services that share a backend, and the hold budget the worker's services share."""

from __future__ import annotations

import logging

import pytest

from fabric.config.specs import PortSpec
from fabric.net import packets
from fabric.net.packets import TCP_ACK, TCP_SYN
from fabric.router.model import Port
from fabric.router.router import Router
from fabric.services.core import HoldBudget, Service
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


def test_replies_of_two_services_with_one_backend_reach_the_right_vip() -> None:
    """Two VIPs in front of one pod, one client port toward both: the dispatch hands
    each backend reply to the service whose flow it is (bytes in, explicit time)."""
    r = Router("shop", "10.10.0.0/24")
    dispatch = ServiceDispatch(r)
    r.attach_services(dispatch)
    ports = (PortSpec(80, 8080, "tcp"),)
    a = Service("a", "10.10.0.50", ports, readiness="external")
    b = Service("b", "10.10.0.51", ports, readiness="external")
    for svc in (a, b):
        dispatch.add(svc)
        dispatch.set_backend(svc, "web", "10.10.0.3", True, 1.0)
    client, web = bytes([10, 10, 0, 2]), bytes([10, 10, 0, 3])
    assert r.backend_ips is dispatch.backend_ips and dispatch.backend_ips[web] == [a, b]
    sports = []
    for svc in (a, b):
        pkt = bytearray(packets.tcp_packet(client, svc.vip.packed, 40000, 80, 1, 0, TCP_SYN))
        assert svc.outbound(pkt, 0, len(pkt), 1.0, False) == 0  # FORWARD
        assert pkt[16:20] == web
        sports.append(pkt[20] << 8 | pkt[21])
    assert sports[0] != sports[1]
    for svc, sport in zip((a, b), sports, strict=True):
        reply = bytearray(packets.tcp_packet(web, client, 8080, sport, 9, 2,
                                             TCP_SYN | TCP_ACK))
        assert dispatch.from_backend(web, reply, 0, 0, len(reply), 1.1) == client
        assert reply[12:16] == svc.vip.packed
        assert reply[20:24] == bytes([0, 80, 0x9c, 0x40])  # 80 -> 40000
    dispatch.remove(a)
    assert dispatch.backend_ips[web] == [b]
    dispatch.remove_backend(b, "web", 2.0)
    assert web not in dispatch.backend_ips


def test_the_worker_hold_budget_spans_namespaces_and_warns_once_a_minute(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two namespaces' dispatches share one HoldBudget: once their dormant services hold
    it all, a new packet to hold is dropped (`service_hold_budget`), with one warning per
    service per minute; a removed service gives its bytes back."""
    client = bytes([10, 10, 0, 2])
    syn = packets.tcp_packet(client, bytes([10, 10, 0, 100]), 40000, 80, 1, 0, TCP_SYN)
    budget = HoldBudget(limit=2 * len(syn))
    ports = (PortSpec(80, 8080, "tcp"),)
    dispatches, services = [], []
    for ns in ("blue", "green"):
        d = ServiceDispatch(Router(ns, "10.10.0.0/24"), hold_budget=budget)
        svc = Service("site", "10.10.0.100", ports, readiness="external")
        d.add(svc)
        dispatches.append(d)
        services.append(svc)
    assert services[0].hold_budget is budget
    port = Port(vnet=False, mtu=1500)

    def send(d: ServiceDispatch, svc: Service, sport: int, now: float) -> None:
        pkt = bytearray(syn)
        pkt[20:22] = sport.to_bytes(2, "big")  # the checksum does not matter to a hold
        buf = bytearray(14) + pkt
        assert d.to_service(svc, port, buf, 0, len(buf), 14, now) is None

    caplog.set_level(logging.WARNING, "fabricd.services")
    send(dispatches[0], services[0], 1, 0.0)
    send(dispatches[1], services[1], 2, 0.0)
    assert budget.used == 2 * len(syn) and port.drops == {}
    for i in range(5):
        send(dispatches[1], services[1], 10 + i, 1.0 + i)
    send(dispatches[0], services[0], 20, 2.0)
    assert port.drops == {"service_hold_budget": 6}
    assert services[1].counters["hold_budget"] == 5
    warnings = [r for r in caplog.records if "budget is" in r.getMessage()]
    assert len(warnings) == 2  # one per service
    assert "namespace green: service site" in warnings[0].getMessage()
    send(dispatches[1], services[1], 30, 61.5)
    assert len([r for r in caplog.records if "budget is" in r.getMessage()]) == 3
    dispatches[1].remove(services[1])
    assert budget.used == len(syn) and services[1].hold_budget is None
    send(dispatches[0], services[0], 40, 62.0)
    assert services[0].held_packets == 2
