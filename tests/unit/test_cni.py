"""`fabricd-cni` run as the runtime runs it (a process, the CNI_* environment, the
network config on stdin) against the real control server on a unix socket, over a fake
fabric that keeps pods the way the daemon does (addresses from the real AddressBook).
The same plugin against the real daemon, with real network namespaces and podman, is
tests/e2e/test_cni.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from fabric.control.server import ControlServer
from fabric.errors import Conflict, NotFound, PortError
from fabric.runtime.addresses import AddressBook, lowest_free

CIDR = IPv4Network("10.1.0.0/24")
GW = IPv4Address("10.1.0.1")
CID = "0123456789abcdef" * 4


class CniFabric:
    """The slice of Fabric the plugin uses: namespaces, netns pods, address choice."""

    worker_id = "w-test"

    def __init__(self, state: str) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.book = AddressBook(state)
        self.deletes: list[str] = []

    def get_namespace(self, name: str) -> dict[str, Any]:
        if name != "shop":
            raise NotFound(f"namespace {name} not found")
        return {"name": "shop", "cidr": str(CIDR), "gateway": str(GW), "mtu": 1500}

    def get_pods(self, ns: str | None = None) -> list[dict[str, Any]]:
        self.get_namespace(ns or "shop")
        return list(self.pods.values())

    async def attach_pod(self, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
        self.get_namespace(ns)
        name = spec["name"]
        if not os.path.exists(spec["netns"]):
            raise PortError(f"netns {spec['netns']} does not exist")
        chosen = spec.get("ip") is None
        if chosen:
            used = {IPv4Address(p["ip"]) for n, p in self.pods.items() if n != name}
            used |= {ip for n, ip in self.book.booked(ns).items() if n != name}
            ip = self.book.get(ns, name) or lowest_free(CIDR, GW, used)
            if ip is None:
                raise Conflict("no free address")
        else:
            ip = IPv4Address(spec["ip"])
        octets = ip.packed
        self.pods[name] = {
            "namespace": ns, "name": name, "ip": str(ip), "kind": "netns",
            "mac": "02:00:" + ":".join(f"{b:02x}" for b in octets),
            "netns": spec["netns"], "ifname": spec.get("ifname", "eth0"),
            "cidr": str(CIDR), "gateway": str(GW), "mtu": 1500, "attached": True,
            "error": None,
            "dns": {"nameservers": [str(GW)], "search": ["shop.fabric.internal",
                                                         "fabric.internal"]},
        }
        if chosen:
            self.book.assign(ns, name, ip)
        return self.pods[name]

    async def detach_pod(self, ns: str, name: str) -> None:
        self.get_namespace(ns)
        self.deletes.append(name)
        released = self.book.release(ns, name)
        if self.pods.pop(name, None) is None and not released:
            raise NotFound(f"pod {name} not found in namespace {ns}")


class Daemon:
    """The real ControlServer on its own loop in a thread, like the daemon process."""

    def __init__(self, fabric: CniFabric, path: str) -> None:
        self.fabric = fabric
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ControlServer(fabric, path)  # type: ignore[arg-type]
        self._run(self.server.start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self._run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fcni", dir="/tmp"))  # short: AF_UNIX path limit
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(tmp: Path) -> Iterator[Daemon]:
    d = Daemon(CniFabric(str(tmp / "addresses.json")), str(tmp / "control.sock"))
    yield d
    d.stop()


def netns(tmp: Path, name: str) -> str:
    """Stands in for a netns path (the fake daemon only checks that it exists)."""
    path = tmp / name
    path.touch()
    return str(path)


def conf(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "shopnet", "type": "fabricd-cni",
            "namespace": "shop", "control": str(tmp / "control.sock"), **extra}


def cni(command: str, config: dict[str, Any] | bytes | None, *, netns: str | None = None,
        cid: str = CID, args: str = "", ifname: str = "eth0", path: str = "",
        env: dict[str, str] | None = None) -> tuple[int, Any]:
    """Run the plugin as a runtime would; (exit status, parsed stdout or None)."""
    e = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
         "CNI_IFNAME": ifname, "CNI_ARGS": args, "CNI_PATH": path}
    if netns is not None:
        e["CNI_NETNS"] = netns
    e.update(env or {})
    stdin = config if isinstance(config, bytes) else json.dumps(config or {}).encode()
    done = subprocess.run([sys.executable, "-m", "fabric.cni"], input=stdin, env=e,
                          capture_output=True, timeout=30, check=False)
    out = done.stdout.decode().strip()
    return done.returncode, (json.loads(out) if out else None)


def test_version_lists_1_0_0() -> None:
    rc, out = cni("VERSION", {"cniVersion": "1.0.0"}, env={"CNI_CONTAINERID": ""})
    assert rc == 0
    assert out["cniVersion"] == "1.0.0" and "1.0.0" in out["supportedVersions"]


def test_add_check_del_twice(daemon: Daemon, tmp: Path) -> None:
    ns = netns(tmp, "netns-a")
    args = "IgnoreUnknown=1;K8S_POD_NAME=Web_1"
    rc, res = cni("ADD", conf(tmp), netns=ns, args=args)
    assert rc == 0, res
    assert res["cniVersion"] == "1.0.0"
    assert res["interfaces"] == [{"name": "eth0", "mac": "02:00:0a:01:00:02", "sandbox": ns}]
    assert res["ips"] == [{"address": "10.1.0.2/24", "gateway": "10.1.0.1", "interface": 0}]
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]
    assert res["dns"] == {"nameservers": ["10.1.0.1"], "domain": "shop.fabric.internal",
                          "search": ["shop.fabric.internal", "fabric.internal"]}
    assert "web-1" in daemon.fabric.pods  # K8S_POD_NAME as a DNS label

    assert cni("CHECK", conf(tmp, prevResult=res), netns=ns, args=args) == (0, None)
    wrong = json.loads(json.dumps(res))
    wrong["ips"][0]["address"] = "10.1.0.9/24"
    rc, err = cni("CHECK", conf(tmp, prevResult=wrong), netns=ns, args=args)
    assert rc == 1 and err["code"] == 101 and "10.1.0.2" in err["msg"]

    assert cni("DEL", conf(tmp), netns=ns, args=args) == (0, None)
    assert cni("DEL", conf(tmp), netns=ns, args=args) == (0, None)
    assert "web-1" not in daemon.fabric.pods
    rc, err = cni("CHECK", conf(tmp, prevResult=res), netns=ns, args=args)
    assert rc == 1 and err["code"] == 3 and "recreate" in err["msg"]
    # the address is free again
    rc, res = cni("ADD", conf(tmp), netns=netns(tmp, "netns-b"), cid="b" * 64)
    assert rc == 0 and res["ips"][0]["address"] == "10.1.0.2/24"
    assert "bbbbbbbbbbbb" in daemon.fabric.pods  # a 64-hex id: its short form


def test_0_4_0_result_has_ip_version(daemon: Daemon, tmp: Path) -> None:
    rc, res = cni("ADD", conf(tmp, cniVersion="0.4.0"), netns=netns(tmp, "n"))
    assert rc == 0 and res["cniVersion"] == "0.4.0" and res["ips"][0]["version"] == "4"


def test_name_taken_by_another_container_is_refused(daemon: Daemon, tmp: Path) -> None:
    args = "K8S_POD_NAME=db"
    assert cni("ADD", conf(tmp), netns=netns(tmp, "n1"), args=args)[0] == 0
    rc, err = cni("ADD", conf(tmp), netns=netns(tmp, "n2"), args=args, cid="other")
    assert rc == 1 and err["code"] == 100 and "distinct names" in err["msg"]
    # nor does the other container's DEL detach it
    assert cni("DEL", conf(tmp), netns=str(tmp / "n2"), args=args, cid="other") == (0, None)
    assert "db" in daemon.fabric.pods


@pytest.mark.parametrize(("config", "code", "words"), [
    (b"{not json", 6, "not JSON"),
    ({"cniVersion": "9.9.9", "name": "x", "namespace": "shop"}, 1, "9.9.9"),
    ({"cniVersion": "1.0.0", "name": "x"}, 7, "namespace"),
    ({"cniVersion": "1.0.0", "name": "x", "namespace": "shop", "control": "rel.sock"}, 7,
     "absolute path"),
    ({"cniVersion": "1.0.0", "name": "x", "namespace": "shop", "ipam": {"subnet": "x"}}, 7,
     "ipam"),
])
def test_bad_config(tmp: Path, config: Any, code: int, words: str) -> None:
    rc, err = cni("ADD", config, netns=netns(tmp, "n"))
    assert rc == 1 and err["code"] == code and words in err["msg"], err
    assert err["cniVersion"] in ("1.0.0",)


def test_bad_environment(tmp: Path) -> None:
    rc, err = cni("ADD", conf(tmp), netns=None)
    assert rc == 1 and err["code"] == 4 and "CNI_NETNS" in err["msg"]
    rc, err = cni("BOGUS", conf(tmp))
    assert rc == 1 and err["code"] == 4 and "CNI_COMMAND" in err["msg"]


def test_unknown_fabric_namespace(daemon: Daemon, tmp: Path) -> None:
    rc, err = cni("ADD", conf(tmp, namespace="nope"), netns=netns(tmp, "n"))
    assert rc == 1 and err["code"] == 7 and "fabric namespace nope does not exist" in err["msg"]
    assert cni("DEL", conf(tmp, namespace="nope"), netns=str(tmp / "n")) == (0, None)


def test_missing_netns(daemon: Daemon, tmp: Path) -> None:
    rc, err = cni("ADD", conf(tmp), netns=str(tmp / "gone"))
    assert rc == 1 and err["code"] == 3 and "does not exist" in err["msg"]
    assert not daemon.fabric.pods
    assert cni("DEL", conf(tmp), netns=str(tmp / "gone")) == (0, None)  # DEL: still fine


def test_daemon_gone(tmp: Path) -> None:
    rc, err = cni("ADD", conf(tmp), netns=netns(tmp, "n"))
    assert rc == 1 and err["code"] == 11 and "control" in err["msg"]
    assert cni("DEL", conf(tmp), netns=str(tmp / "n")) == (0, None)
    assert cni("DEL", conf(tmp)) == (0, None)  # no netns either


def test_del_after_daemon_restart_frees_the_address(tmp: Path) -> None:
    state = str(tmp / "addresses.json")
    first = Daemon(CniFabric(state), str(tmp / "control.sock"))
    try:
        rc, res = cni("ADD", conf(tmp), netns=netns(tmp, "n"), args="K8S_POD_NAME=a")
        assert rc == 0
    finally:
        first.stop()
    second = Daemon(CniFabric(state), str(tmp / "control.sock"))  # forgot the pod
    try:
        rc, other = cni("ADD", conf(tmp), netns=netns(tmp, "m"), args="K8S_POD_NAME=b")
        assert other["ips"][0]["address"] == "10.1.0.3/24"  # .2 is still a's
        assert cni("DEL", conf(tmp), netns=str(tmp / "n"), args="K8S_POD_NAME=a") == (0, None)
        assert second.fabric.book.get("shop", "a") is None
    finally:
        second.stop()


IPAM = """#!/bin/sh
echo "$CNI_COMMAND $CNI_CONTAINERID $(cat)" >> "{log}"
case "$CNI_COMMAND" in
ADD) echo '{{"cniVersion":"1.0.0","ips":[{{"address":"{addr}"}}]}}' ;;
esac
"""


def _ipam(tmp: Path, addr: str) -> str:
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "fake-ipam"
    script.write_text(IPAM.format(log=tmp / "ipam.log", addr=addr))
    script.chmod(0o755)
    return str(bindir)


def test_delegated_ipam(daemon: Daemon, tmp: Path) -> None:
    path = _ipam(tmp, "10.1.0.77/24")
    c = conf(tmp, ipam={"type": "fake-ipam"})
    ns = netns(tmp, "n")
    rc, res = cni("ADD", c, netns=ns, path=path)
    assert rc == 0 and res["ips"][0]["address"] == "10.1.0.77/24"
    assert cni("DEL", c, netns=ns, path=path) == (0, None)
    log = (tmp / "ipam.log").read_text().splitlines()
    assert [line.split()[0] for line in log] == ["ADD", "DEL"]
    assert '"fake-ipam"' in log[0]  # the whole network config on its stdin


def test_ipam_outside_cidr_and_missing_plugin(daemon: Daemon, tmp: Path) -> None:
    path = _ipam(tmp, "192.168.9.9/24")
    c = conf(tmp, ipam={"type": "fake-ipam"})
    rc, err = cni("ADD", c, netns=netns(tmp, "n"), path=path)
    assert rc == 1 and err["code"] == 7 and "outside" in err["msg"]
    assert [ln.split()[0] for ln in (tmp / "ipam.log").read_text().splitlines()] == ["ADD",
                                                                                     "DEL"]
    rc, err = cni("ADD", conf(tmp, ipam={"type": "nothere"}), netns=str(tmp / "n"), path=path)
    assert rc == 1 and err["code"] == 7 and "not found in CNI_PATH" in err["msg"]
    assert not daemon.fabric.pods


def _call(args: str = "", cid: str = CID) -> Any:
    from fabric.cni.spec import parse_call

    return parse_call({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
                       "CNI_ARGS": args})


def test_pod_names_are_dns_labels() -> None:
    from fabric.cni.spec import pod_name

    assert pod_name(_call("K8S_POD_NAME=My_Web.1")) == "my-web-1"
    assert pod_name(_call()) == CID[:12]
    assert pod_name(_call(cid="Test_Container")) == "test-container"
    long_a = pod_name(_call("K8S_POD_NAME=" + "a" * 70))
    long_b = pod_name(_call("K8S_POD_NAME=" + "a" * 71))
    assert len(long_a) <= 63 and long_a != long_b
    assert pod_name(_call("K8S_POD_NAME=___")) == CID[:12]  # nothing usable: the id
