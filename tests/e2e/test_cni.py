"""`fabricd-cni` end to end, against the real daemon in a worker namespace:

- driven directly with the spec's environment and stdin on `ip netns` namespaces (ADD,
  CHECK, DEL twice, VERSION, a bad config, a missing netns), pinging through the fabric;
- used by Debian's podman (CNI backend) with a test-private config, storage and CNI
  config directory and an image imported from busybox-static: two containers ping each
  other by name, reach a service and the test's "internet" through egress, `podman rm`
  frees the address, and a daemon restarted between ADD and DEL attaches the containers
  again and does not break DEL.

Everything (containers, their netns, mounts, the private storage) is removed also when
a step fails. Network safety: the only uplink is the test's own "internet" namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.control.client import ControlClient
from fabric.tools.sandbox import Daemon, Sandbox

CIDR = "10.78.0.0/24"
GW = "10.78.0.1"
SERVER = "203.0.113.10"
POOL = "100.64.0.0/16"
BUSYBOX = "/bin/busybox"  # busybox-static's: it runs in an image with nothing else
APPLETS = ("sh", "ping", "nslookup", "nc", "sleep", "ip", "cat", "httpd", "hostname")


def plugin_command() -> list[str]:
    """The installed console script when there is one, as a runtime would run it."""
    exe = os.path.join(os.path.dirname(sys.executable), "fabricd-cni")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "fabric.cni"]


def cni(command: str, conf: dict[str, Any] | bytes, netns: str | None, *,
        cid: str = "c0ffee", args: str = "") -> tuple[int, Any]:
    env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": command,
           "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_ARGS": args,
           "CNI_PATH": "/usr/lib/cni"}
    if netns is not None:
        env["CNI_NETNS"] = netns
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    p = subprocess.run(plugin_command(), input=stdin, env=env, capture_output=True,
                       timeout=60, check=False)
    out = p.stdout.decode().strip()
    return p.returncode, json.loads(out) if out else None


def fabric(sb: Sandbox, egress: bool = False) -> Daemon:
    worker = sb.netns("worker")
    config: dict[str, Any] = {"namespaces": [{"name": "shop", "id": 7, "cidr": CIDR}]}
    if egress:
        net = sb.internet(worker, SERVER, POOL)
        sb.http_server(net, 8080)
        config["worker"] = {"egress": {"tun": "fabeg0", "pool": POOL}}
    return Daemon(sb, worker, config).start()


def book(d: Daemon) -> dict[str, str]:
    path = os.path.join(d.dir, "addresses.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return dict(json.load(f)["namespaces"].get("shop", {}))


def test_plugin_driven_directly(sandbox: Sandbox) -> None:
    d = fabric(sandbox)
    conf = {"cniVersion": "1.0.0", "name": "shopnet", "type": "fabricd-cni",
            "namespace": "shop", "control": d.control}
    a, b = sandbox.netns("a"), sandbox.netns("b")
    pa, pb = f"/run/netns/{a}", f"/run/netns/{b}"

    rc, out = cni("VERSION", {"cniVersion": "1.0.0"}, None, cid="")
    assert rc == 0 and "1.0.0" in out["supportedVersions"]
    rc, ra = cni("ADD", conf, pa, args="K8S_POD_NAME=alpha")
    assert rc == 0, ra
    rc, rb = cni("ADD", conf, pb, cid="b" * 64)
    assert rc == 0, rb
    assert ra["ips"][0] == {"address": "10.78.0.2/24", "gateway": GW, "interface": 0}
    assert rb["ips"][0]["address"] == "10.78.0.3/24"
    assert ra["interfaces"][0]["sandbox"] == pa
    assert ra["dns"]["nameservers"] == [GW]
    addr = sandbox.run(a, "ip", "-j", "addr", "show", "dev", "eth0").stdout
    assert json.loads(addr)[0]["address"] == ra["interfaces"][0]["mac"]
    out = sandbox.run(b, "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.78.0.2").stdout
    assert "2 received" in out
    names = sandbox.run(b, "nslookup", "alpha.shop.fabric.internal", GW).stdout
    assert "10.78.0.2" in names

    assert cni("CHECK", {**conf, "prevResult": ra}, pa, args="K8S_POD_NAME=alpha") == (0, None)
    rc, err = cni("ADD", b"{", pa)
    assert rc == 1 and err["code"] == 6
    rc, err = cni("ADD", {**conf, "namespace": "nope"}, pa)
    assert rc == 1 and err["code"] == 7 and "does not exist" in err["msg"]
    rc, err = cni("ADD", conf, "/run/netns/fbt-no-such-netns")
    assert rc == 1 and err["code"] == 3 and "does not exist" in err["msg"]

    for _ in range(2):  # DEL is idempotent
        assert cni("DEL", conf, pa, args="K8S_POD_NAME=alpha") == (0, None)
    assert not sandbox.run(a, "ip", "link", "show", "eth0", check=False).returncode == 0
    assert book(d) == {"bbbbbbbbbbbb": "10.78.0.3"}
    sandbox.run(None, "ip", "netns", "del", b)  # the netns goes first, then DEL
    sandbox.namespaces.remove(b)
    assert cni("DEL", conf, pb, cid="b" * 64) == (0, None)
    assert book(d) == {}
    d.stop()
    assert cni("DEL", conf, pb, cid="b" * 64) == (0, None)  # and with no daemon at all


class Podman:
    """podman with everything private to the test: storage, run state, CNI config,
    containers.conf, events; `close()` removes containers, their netns and mounts.
    runc, not crun: crun refuses this machine's hybrid cgroup v1/v2 layout."""

    def __init__(self, sb: Sandbox, control: str) -> None:
        self.sb = sb
        self.dir = os.path.join(sb.tmp, "podman")
        self.network = sb.name("net")
        self.netns_paths: set[str] = set()
        for sub in ("root", "runroot", "tmp", "cni", "bin"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        binary = os.path.join(self.dir, "bin", "fabricd-cni")
        cmd = plugin_command()
        if len(cmd) == 1:
            os.symlink(cmd[0], binary)  # as docs/cni.md installs it in /opt/cni/bin
        else:
            with open(binary, "w") as f:
                f.write(f"#!/bin/sh\nexec {' '.join(cmd)}\n")
            os.chmod(binary, 0o755)
        self._write("containers.conf", f"""[network]
network_backend = "cni"
cni_plugin_dirs = ["{self.dir}/bin", "/usr/lib/cni"]
network_config_dir = "{self.dir}/cni"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{self.dir}/events.log"
tmp_dir = "{self.dir}/tmp"
""")
        self._write("storage.conf", f"""[storage]
driver = "vfs"
runroot = "{self.dir}/runroot"
graphroot = "{self.dir}/root"
""")
        self._write(f"cni/{self.network}.conflist", json.dumps({
            "cniVersion": "1.0.0", "name": self.network,
            "plugins": [{"type": "fabricd-cni", "namespace": "shop", "control": control}]}))
        self.env = {**os.environ, "CONTAINERS_CONF": f"{self.dir}/containers.conf",
                    "CONTAINERS_STORAGE_CONF": f"{self.dir}/storage.conf"}

    def _write(self, name: str, text: str) -> None:
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(text)

    def __call__(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        argv = ["podman", "--root", f"{self.dir}/root", "--runroot", f"{self.dir}/runroot",
                "--cni-config-dir", f"{self.dir}/cni", "--network-backend", "cni",
                "--cgroup-manager", "cgroupfs", "--storage-driver", "vfs", "--runtime", "runc",
                *args]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env=self.env, check=False)
        if check and p.returncode:
            raise RuntimeError(f"podman {' '.join(args)} failed ({p.returncode}): "
                               f"{p.stderr.strip()}")
        return p.stdout

    def image(self) -> str:
        """An image of busybox-static alone, imported from a tarball (no registry)."""
        root = os.path.join(self.dir, "rootfs")
        for sub in ("bin", "etc", "proc", "sys", "dev", "tmp", "www"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        shutil.copy(BUSYBOX, os.path.join(root, "bin", "busybox"))
        for applet in APPLETS:
            os.symlink("busybox", os.path.join(root, "bin", applet))
        with open(os.path.join(root, "www", "index.html"), "w") as f:
            f.write("hello from a container\n")
        tar = os.path.join(self.dir, "rootfs.tar")
        subprocess.run(["tar", "-C", root, "-cf", tar, "."], check=True, timeout=60)
        name = f"localhost/{self.sb.name('busybox')}:latest"
        self("import", tar, name)
        return name

    def run(self, name: str, image: str, *cmd: str) -> None:
        # explicit limits: podman's defaults for root are above what this machine allows
        self("run", "-d", "--name", name, "--network", self.network, "--ulimit",
             "nofile=1024:1024", "--ulimit", "nproc=1024:1024", image, *cmd)
        self.netns_paths.add(self("inspect", "-f", "{{.NetworkSettings.SandboxKey}}",
                                  name).strip())

    def close(self) -> None:
        self("rm", "-af", "-t", "0", check=False, timeout=120)
        for path in self.netns_paths:  # whatever podman could not remove
            if path.startswith("/run/netns/") and os.path.exists(path):
                subprocess.run(["ip", "netns", "del", os.path.basename(path)], check=False,
                               capture_output=True, timeout=30)
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f]
        for m in sorted((m for m in mounts if m.startswith(self.dir)), reverse=True):
            subprocess.run(["umount", "-l", m], check=False, capture_output=True, timeout=30)


def http(pm: Podman, container: str, host: str, port: int, path: str) -> str:
    """An HTTP/1.0 GET from inside the container; the whole answer, headers and all."""
    request = f"GET {path} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n"
    return pm("exec", container, "sh", "-c", f"printf '{request}' | nc -w 10 {host} {port}")


@pytest.fixture
def podman_sandbox(sandbox: Sandbox) -> Iterator[tuple[Sandbox, Daemon, Podman]]:
    missing = [t for t in ("podman", "runc", "tar") if shutil.which(t) is None]
    if missing or not os.path.exists(BUSYBOX):
        pytest.skip(f"needs {', '.join(missing) or BUSYBOX}: run scripts/install-debs as root")
    d = fabric(sandbox, egress=True)
    pm = Podman(sandbox, d.control)
    try:
        yield sandbox, d, pm
    finally:
        pm.close()


def test_podman_containers_on_the_fabric(
        podman_sandbox: tuple[Sandbox, Daemon, Podman]) -> None:
    sb, d, pm = podman_sandbox
    image = pm.image()
    pm.run("web", image, "httpd", "-f", "-p", "8080", "-h", "/www")
    pm.run("client", image, "sleep", "1000")
    pods = {p["name"]: p for p in d.get("/v1/namespaces/shop/pods")}
    assert pods["web"]["ip"] == "10.78.0.2" and pods["client"]["ip"] == "10.78.0.3"
    assert pods["web"]["attached"] and pods["client"]["attached"]

    resolv = pm("exec", "client", "cat", "/etc/resolv.conf")
    assert GW in resolv and "shop.fabric.internal" in resolv, resolv
    for name in ("web", "web.shop.fabric.internal"):  # by name, through the fabric's DNS
        out = pm("exec", "client", "ping", "-c", "2", "-W", "2", name)
        assert "2 packets received" in out, out
    # a service in front of the container: the namespace as it is (its pods untouched), plus
    spec = d.get("/v1/namespaces/shop")
    spec.pop("status", None)
    spec["services"] = [{"name": "site", "ip": "10.78.0.100",
                         "ports": [{"port": 80, "target_port": 8080}], "backends": ["web"]}]
    ControlClient(d.control).put("/v1/namespaces/shop", spec)
    # Debian's busybox-static wget crashes (even on the host), so HTTP by hand over nc;
    # names through nslookup, which has its own resolver
    found = pm("exec", "client", "nslookup", "site.shop.fabric.internal")
    assert "10.78.0.100" in found, found
    page = http(pm, "client", "10.78.0.100", 80, "/")
    assert page.endswith("hello from a container\n"), page
    outside = http(pm, "client", SERVER, 8080, "/whoami")
    assert outside.strip().endswith("100.64.0.7"), outside  # egress, the namespace's address

    pm("rm", "-f", "-t", "0", "web")  # CNI DEL: the address is free again
    assert "web" not in book(d) and not any(
        p["name"] == "web" for p in d.get("/v1/namespaces/shop/pods"))
    pm.run("web2", image, "sleep", "1000")
    assert book(d)["web2"] == "10.78.0.2"

    d.stop()  # the daemon restarts between ADD and DEL: its state_dir brings the pods back
    d.start()
    assert book(d) == {"client": "10.78.0.3", "web2": "10.78.0.2"}
    d.wait_attached(2)
    out = pm("exec", "client", "ping", "-c", "2", "-W", "2", "web2")
    assert "2 packets received" in out, out
    pm("rm", "-f", "-t", "0", "client", timeout=120)
    assert book(d) == {"web2": "10.78.0.2"}
    pm.run("late", image, "sleep", "1000")
    assert book(d)["late"] == "10.78.0.3"
    out = pm("exec", "late", "ping", "-c", "1", "-W", "2", GW)
    assert "1 packets received" in out, out
