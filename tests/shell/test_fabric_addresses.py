"""Addresses the fabric picks for pods without one: the lowest free, the same again for
the same pod, kept across a restart (a new Fabric on the same state directory), freed
on detach — on a real Fabric (pods on another worker need no privileges)."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from fabric import Fabric
from fabric.errors import Conflict, NotFound

NS = {"name": "shop", "id": 7, "cidr": "10.9.0.0/29",
      "services": [{"name": "web", "ip": "10.9.0.3", "ports": [{"port": 80}]}]}


async def _run(state: Path, steps: object) -> None:
    async with Fabric("w1", local_stack=False, state_dir=str(state)) as fab:
        await fab.apply_namespace(NS)
        await steps(fab)  # type: ignore[operator]


def test_allocation_kept_across_restart_and_freed_on_detach(tmp_path: Path) -> None:
    async def first(fab: Fabric) -> None:
        a = await fab.attach_pod("shop", {"name": "a", "worker": "w2"})
        b = await fab.attach_pod("shop", {"name": "b", "worker": "w2"})
        # .1 gateway, .3 the service: a and b get .2 and .4
        assert (a["ip"], b["ip"]) == ("10.9.0.2", "10.9.0.4")
        again = await fab.attach_pod("shop", {"name": "a", "worker": "w2"})
        assert again["ip"] == "10.9.0.2"
        assert again["gateway"] == "10.9.0.1" and again["cidr"] == "10.9.0.0/29"

    async def after_restart(fab: Fabric) -> None:
        # the daemon forgot both pods (API-made), not their addresses: c must not get .2
        c = await fab.attach_pod("shop", {"name": "c", "worker": "w2"})
        assert c["ip"] == "10.9.0.5"
        b = await fab.attach_pod("shop", {"name": "b", "worker": "w2"})
        assert b["ip"] == "10.9.0.4"
        await fab.detach_pod("shop", "a")  # not attached any more: only frees .2
        with pytest.raises(NotFound):
            await fab.detach_pod("shop", "a")  # twice: nothing left to free
        d = await fab.attach_pod("shop", {"name": "d", "worker": "w2"})
        assert d["ip"] == "10.9.0.2"
        await fab.detach_pod("shop", "d")
        e = await fab.attach_pod("shop", {"name": "e", "worker": "w2"})
        assert e["ip"] == "10.9.0.2"
        f = await fab.attach_pod("shop", {"name": "f", "worker": "w2"})
        assert f["ip"] == "10.9.0.6"
        with pytest.raises(Conflict, match="no free address left in 10.9.0.0/29"):
            await fab.attach_pod("shop", {"name": "g", "worker": "w2"})
        await fab.detach_pod("shop", "f")
        # an address the caller gives is the caller's: not booked
        await fab.detach_pod("shop", "e")
        await fab.attach_pod("shop", {"name": "e", "ip": "10.9.0.2", "worker": "w2"})

    asyncio.run(_run(tmp_path, first))
    asyncio.run(_run(tmp_path, after_restart))
    book = json.loads((tmp_path / "addresses.json").read_text())
    assert book["namespaces"] == {"shop": {"b": "10.9.0.4", "c": "10.9.0.5"}}


def test_restore_frees_the_address_of_a_pod_whose_netns_is_gone(tmp_path: Path) -> None:
    """A booked netns pod comes back only if its netns still exists (the e2e test shows
    one that does); here it does not, so the restart frees its address."""
    state = tmp_path / "state"
    state.mkdir()
    book = {"format": 1, "namespaces": {"shop": {"gone": "10.9.0.2"}},
            "where": {"shop": {"gone": {"netns": "/run/netns/fbt-surely-not-here",
                                        "ifname": "eth0"}}}}
    (state / "addresses.json").write_text(json.dumps(book))

    async def steps(fab: Fabric) -> None:
        assert fab.addresses.where("shop", "gone")["netns"].endswith("not-here")
        assert await fab.restore_pods() == 0
        assert fab.addresses.get("shop", "gone") is None
        a = await fab.attach_pod("shop", {"name": "a", "worker": "w2"})
        assert a["ip"] == "10.9.0.2"

    asyncio.run(_run(state, steps))


def test_a_choice_scans_from_a_hint_and_finds_what_was_freed_below_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """300 pods one by one: each choice starts where the last one ended (O(1)), yet a
    detach, a release and a namespace change below the hint are all seen."""
    import fabric.runtime.worker as worker

    starts: list[int] = []
    real = worker.first_free

    def counting(first: int, last: int, used: object) -> int | None:
        starts.append(first)
        return real(first, last, used)  # type: ignore[arg-type]

    monkeypatch.setattr(worker, "first_free", counting)
    big = {"name": "big", "id": 8, "cidr": "10.20.0.0/22"}

    async def run(fab: Fabric) -> None:
        await fab.apply_namespace(big)
        ips = [(await fab.attach_pod("big", {"name": f"p{i}", "worker": "w2"}))["ip"]
               for i in range(300)]
        assert ips[:3] == ["10.20.0.2", "10.20.0.3", "10.20.0.4"]
        assert len(set(ips)) == 300
        # each scan began at the previous choice, not at the CIDR's first host
        assert starts[-1] == int(IPv4Address(ips[-2]))
        await fab.detach_pod("big", "p100")  # frees ips[100], far below the hint
        q = await fab.attach_pod("big", {"name": "q", "worker": "w2"})
        assert q["ip"] == ips[100]
        # a namespace change (a service takes the next free host) is seen too
        nxt = IPv4Address(ips[-1]) + 1
        await fab.apply_namespace(dict(big, services=[
            {"name": "s", "ip": str(nxt), "ports": [{"port": 80}]}]))
        r = await fab.attach_pod("big", {"name": "r", "worker": "w2"})
        assert r["ip"] == str(nxt + 1)

    async def main() -> None:
        async with Fabric("w1", local_stack=False, state_dir=str(tmp_path)) as fab:
            await run(fab)

    asyncio.run(main())
