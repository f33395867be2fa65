"""Attaching into a big namespace keeps every check of a small one: the kept index of
names, addresses, MACs and netns slots (what makes an attach O(1)) must say exactly
what re-validating the whole namespace said, and must forget what a detach frees.
Driven without root: the real `Fabric`, pods on other workers (no port to make)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fabric.errors import ConfigError
from fabric.runtime.worker import Fabric

PODS = 5000
CIDR = "10.77.0.0/16"


def ip(i: int) -> str:
    return f"10.77.{(i + 2) // 256}.{(i + 2) % 256}"


def remote(i: int, **kw: Any) -> dict[str, Any]:
    return {"name": f"p{i}", "ip": ip(i), "worker": "w2", **kw}


async def refused(fab: Fabric, spec: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        await fab.attach_pod("big", spec)
    return e.value.message


def test_a_bad_attach_at_5000_pods_gets_the_same_error_as_in_a_small_namespace() -> None:
    async def main() -> None:
        async with Fabric(worker_id="w1", local_stack=False) as fab:
            await fab.apply_namespace({
                "name": "big", "id": 4, "cidr": CIDR,
                "pods": [remote(0, mac="02:00:00:00:00:01"),
                         {"name": "lost", "ip": ip(1), "netns": "/run/netns/fbt-none"}],
                "services": [{"name": "web", "ip": "10.77.250.1", "ports": [80]}]})
            for i in range(2, PODS):  # one by one, as a runtime does
                await fab.attach_pod("big", remote(i))
            assert len(fab.namespaces["big"].spec.pods) == PODS
            src = "attach_pod big"
            cases = {
                f"{src}: ip: {ip(17)} is already used by pod p17":
                    remote(PODS, ip=ip(17)),
                f"{src}: ip: 10.78.0.5 is not inside cidr {CIDR}":
                    remote(PODS, ip="10.78.0.5"),
                f"{src}: ip: 10.77.0.1 is the gateway address of {CIDR}":
                    remote(PODS, ip="10.77.0.1"),
                f"{src}: ip: 10.77.250.1 is already used by service web":
                    remote(PODS, ip="10.77.250.1"),
                f"{src}: name: web is already a service name":
                    remote(PODS) | {"name": "web"},
                f"{src}: mac: 02:00:00:00:00:01 is already used by pod p0":
                    remote(PODS, mac="02:00:00:00:00:01"),
                f"{src}: netns: netns /run/netns/fbt-none already has eth0 (pod lost); "
                "give a different ifname":
                    {"name": "again", "ip": ip(PODS), "netns": "/run/netns/fbt-none"},
            }
            for message, spec in cases.items():
                assert await refused(fab, spec) == message
            # The same refusals, word for word, in a namespace of two pods.
            await fab.apply_namespace({
                "name": "small", "id": 5, "cidr": CIDR,
                "pods": [remote(17), remote(0, mac="02:00:00:00:00:01")]})
            with pytest.raises(ConfigError) as e:
                await fab.attach_pod("small", remote(PODS, ip=ip(17)))
            assert e.value.message == f"attach_pod small: ip: {ip(17)} is already used by pod p17"
            assert len(fab.namespaces["big"].spec.pods) == PODS  # nothing was added

            # What a detach or a replace frees is free at once; what stays, stays taken.
            await fab.detach_pod("big", "p17")
            await fab.attach_pod("big", remote(PODS, ip=ip(17)))
            await fab.attach_pod("big", remote(18, ip=ip(PODS + 1)))  # p18 moves
            await fab.attach_pod("big", remote(PODS + 2, ip=ip(18)))
            assert await refused(fab, remote(PODS + 3, ip=ip(PODS + 1))) == (
                f"{src}: ip: {ip(PODS + 1)} is already used by pod p18")
            spec = fab.namespaces["big"].spec
            assert len(spec.pods) == PODS + 1 and spec.pod("p17") is None
            assert spec.pods[-1].name == f"p{PODS + 2}"
            ns = fab.namespaces["big"]
            assert ns.records.lookup_a(f"p{PODS}.big.fabric.internal") is not None
            assert ns.records.lookup_a("p17.big.fabric.internal") is None

    asyncio.run(asyncio.wait_for(main(), 120))
