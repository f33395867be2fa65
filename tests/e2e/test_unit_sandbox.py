"""The sandbox of the shipped unit, emulated without systemd (it is not PID 1 here), each
part read from the unit file itself:

- `CapabilityBoundingSet=`: the daemon runs as root under `setpriv` with exactly those
  capabilities and no-new-privs, as systemd would start it;
- `RestrictAddressFamilies=` and `RestrictNamespaces=net`: a seccomp filter, as systemd
  builds one on x86-64, failing socket()/socketpair() of other families, and unshare(),
  clone() and setns() of other kinds of namespace;
- `ProtectSystem=strict` with `RuntimeDirectory=`/`ConfigurationDirectory=netns`: every
  mount read-only (in a mount namespace of the daemon's own) but /proc, /sys, /dev, the
  control socket's directory and /etc/netns.

All at once, the daemon attaches a TAP pod and an AF_PACKET pod, routes between them,
its gateway answers ping and DNS, a pod reaches the test's "internet" namespace through
egress, a service with the TCP activator (compiled by wasmtime) and probes answers, and
two such daemons carry traffic through the Noise tunnel.
With any one capability or address family taken away, the part that needs it fails;
/etc/netns read-only costs pods their resolv.conf; /proc/sys read-only
(ProtectKernelTunables=) stops the daemon. (`systemd-analyze verify` checks the unit's
syntax in tests/unit/test_systemd_unit.py.)"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from fabric.tools.sandbox import Daemon, Sandbox

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "fabricd.service"
SERVER = "203.0.113.10"  # TEST-NET-3, only inside the test's "internet" namespace
POOL = "100.64.0.0/16"


def unit_caps() -> list[str]:
    (line,) = re.findall(r"^CapabilityBoundingSet=(.*)$", UNIT.read_text(), re.M)
    return line.split()


def fabricd_under(caps: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    fabricd = str(Path(sys.executable).with_name("fabricd"))
    keep = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    return [setpriv, f"--bounding-set=-all,{keep}", "--inh-caps=-all", "--no-new-privs",
            fabricd]


def unit_families() -> list[str]:
    """The unit's RestrictAddressFamilies=."""
    (line,) = re.findall(r"^RestrictAddressFamilies=(.*)$", UNIT.read_text(), re.M)
    return line.split()


# RestrictAddressFamilies= and RestrictNamespaces= as systemd builds them on x86-64: a
# seccomp filter (classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip;
# u64 args[6]}) that fails socket()/socketpair() of other families with EAFNOSUPPORT,
# unshare()/clone() asking for other kinds of namespace with EPERM, setns() into other
# kinds (or any kind, nstype 0) with EPERM, and clone3() with ENOSYS (its flags are out
# of a filter's reach: libc falls back to clone()). Then it execs the rest of argv.
SECCOMP_LAUNCHER = """import ctypes, os, socket, struct, sys
families = [getattr(socket, name) for name in sys.argv[1].split(",")]
NEWNET = 0x40000000
OTHER_NS = 0x20000 | 0x80 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
code = [("ld", 4), ("jeq", 0xC000003E, None, "allow"), ("ld", 0),
        ("jeq", 41, "family", None), ("jeq", 53, "family", None),
        ("jeq", 272, "flags", None), ("jeq", 56, "flags", None),
        ("jeq", 308, "nstype", None), ("jeq", 435, "enosys", "allow"),
        "family", ("ld", 16)]
code += [("jeq", f, "allow", None) for f in families]
code += [("ret", ERRNO | 97),
         "flags", ("ld", 16), ("jset", OTHER_NS, "eperm", "allow"),
         "nstype", ("ld", 24), ("jeq", NEWNET, "allow", "eperm"),
         "eperm", ("ret", ERRNO | 1), "enosys", ("ret", ERRNO | 38), "allow", ("ret", ALLOW)]
labels, pos = {}, 0
for c in code:
    if isinstance(c, str):
        labels[c] = pos
    else:
        pos += 1
prog, pos = [], 0
for c in code:
    if isinstance(c, str):
        continue
    pos += 1
    rel = lambda t: 0 if t is None else labels[t] - pos
    if c[0] == "ld":
        prog.append((LD, 0, 0, c[1]))
    elif c[0] == "ret":
        prog.append((RET, 0, 0, c[1]))
    else:
        prog.append((JEQ if c[0] == "jeq" else JSET, rel(c[2]), rel(c[3]), c[1]))
buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
if libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
    sys.exit("seccomp: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[2], sys.argv[2:])
"""


def unit_namespaces() -> list[str]:
    (line,) = re.findall(r"^RestrictNamespaces=(.*)$", UNIT.read_text(), re.M)
    return line.split()


def families_only(sandbox: Sandbox, families: list[str]) -> list[str]:
    """The address-family filter, with the unit's RestrictNamespaces=net."""
    if os.uname().machine != "x86_64":
        pytest.skip("the seccomp filter is written for x86-64")
    assert unit_namespaces() == ["net"]
    script = os.path.join(sandbox.tmp, "seccomp.py")
    with open(script, "w") as f:
        f.write(SECCOMP_LAUNCHER)
    return [sys.executable, script, ",".join(families)]


def network(sandbox: Sandbox) -> tuple[str, str, str, dict[str, Any]]:
    worker = sandbox.netns("worker")
    a, vm = sandbox.netns("a"), sandbox.netns("vm")
    sandbox.veth(worker, "tap-vm1", vm, "eth0")
    for cmd in (("ip", "addr", "add", "10.41.0.5/24", "dev", "eth0"),
                ("ip", "link", "set", "eth0", "up"),
                ("ip", "route", "add", "default", "via", "10.41.0.1")):
        sandbox.run(vm, *cmd)
    ns = {"name": "vms", "cidr": "10.41.0.0/24",
          "pods": [{"name": "a", "ip": "10.41.0.2", "netns": a},
                   {"name": "vm-1", "ip": "10.41.0.5", "interface": "tap-vm1"}]}
    return worker, a, vm, ns


def dig(sandbox: Sandbox, ns: str) -> str:
    return sandbox.run(ns, "dig", "@10.41.0.1", "+short", "+time=2", "+tries=1",
                       "vm-1.vms.fabric.internal", check=False, timeout=30).stdout


def test_the_units_sandbox_is_enough(sandbox: Sandbox) -> None:
    caps = unit_caps()
    families = unit_families()
    assert families == ["AF_UNIX", "AF_INET", "AF_NETLINK", "AF_PACKET"], families
    assert set(caps) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_NET_RAW",
                         "CAP_NET_BIND_SERVICE"}, caps
    worker, a, vm, ns = network(sandbox)
    net = sandbox.internet(worker, SERVER, POOL)  # the test's own; nothing leaves the host
    sandbox.http_server(net, 8080)
    ns = {**ns, "id": 7, "services": [
        {"name": "web", "ip": "10.41.0.100", "backends": ["vm-1"],
         "ports": [{"port": 80, "target_port": 8080, "activator": "tcp"}]}]}
    sandbox.http_server(vm, 8080)
    d = Daemon(sandbox, worker, {"worker": {"egress": {"tun": "fabeg0", "pool": POOL}},
                                 "namespaces": [ns]})
    # The whole sandbox at once: read-only file system, address families, capabilities.
    os.makedirs("/etc/netns", exist_ok=True)
    d.command = [*read_only_but(sandbox, d.dir, "/etc/netns"),
                 *families_only(sandbox, families), *fabricd_under(caps)]
    d.start()
    d.wait_attached(2)
    assert d.proc is not None
    with open(f"/proc/{d.proc.pid}/status") as f:
        status = f.read()
    bounding = int(re.search(r"^CapBnd:\s+([0-9a-f]+)$", status, re.M).group(1), 16)
    assert bin(bounding).count("1") == 4, status  # really confined to the four
    assert "1 received" in sandbox.run(a, "ping", "-c", "1", "-W", "3", "10.41.0.5").stdout
    assert "1 received" in sandbox.run(vm, "ping", "-c", "1", "-W", "3", "10.41.0.1").stdout
    assert dig(sandbox, a).strip() == "10.41.0.5"
    whoami = sandbox.run(a, "curl", "-sS", "--max-time", "10",
                         f"http://{SERVER}:8080/whoami", timeout=20).stdout
    assert whoami.strip() == "100.64.0.7"  # egress: the uplink TUN and its route
    # A service with the TCP activator (wasmtime compiles it) and probes from the gateway.
    body = sandbox.run(a, "curl", "-sS", "--max-time", "10", "http://10.41.0.100/",
                       timeout=20).stdout
    assert body.startswith("hello from"), body
    assert "unusable" not in d.log() and "activator" in d.log(), d.log()
    assert d.stop() == 0


@pytest.mark.parametrize("drop, fails", [
    ("AF_PACKET", "AF_PACKET"),  # the interface pod only
    ("AF_INET", "UDP listen on 10.41.0.1:53: Address family not supported"),
    ("AF_NETLINK", "Address family not supported"),
    ("AF_UNIX", "Address family not supported"),
])
def test_each_address_family_is_needed(sandbox: Sandbox, drop: str, fails: str) -> None:
    families = [f for f in unit_families() if f != drop]
    worker, a, vm, ns = network(sandbox)
    d = Daemon(sandbox, worker, {"namespaces": [ns]})
    d.command = [*families_only(sandbox, families), *fabricd_under(unit_caps())]
    if fails != "AF_PACKET":
        with pytest.raises(RuntimeError) as e:
            d.start()
        assert fails in str(e.value)
        return
    d.start()
    d.wait_attached(1)
    pods = {p["name"]: p for p in d.get("/v1/pods")}
    assert pods["a"]["attached"] and not pods["vm-1"]["attached"]
    assert "Address family not supported" in pods["vm-1"]["error"], pods["vm-1"]


@pytest.mark.parametrize("drop, fails", [
    ("CAP_NET_RAW", "AF_PACKET"),  # the interface pod only
    ("CAP_NET_BIND_SERVICE", "UDP listen on 10.41.0.1:53: Permission denied"),
    ("CAP_SYS_ADMIN", "unshare(CLONE_NEWNET): Operation not permitted"),
    ("CAP_NET_ADMIN", "creating TUN fab0: Operation not permitted"),
])
def test_each_capability_is_needed(sandbox: Sandbox, drop: str, fails: str) -> None:
    caps = [c for c in unit_caps() if c != drop]
    worker, a, vm, ns = network(sandbox)
    d = Daemon(sandbox, worker, {"namespaces": [ns]}, command=fabricd_under(caps))
    if fails != "AF_PACKET":
        with pytest.raises(RuntimeError) as e:
            d.start()
        assert fails in str(e.value)
        assert d.proc is not None and d.proc.returncode == 1
        return
    d.start()
    d.wait_attached(1)
    pods = {p["name"]: p for p in d.get("/v1/pods")}
    assert pods["a"]["attached"] and not pods["vm-1"]["attached"]
    assert "AF_PACKET" in pods["vm-1"]["error"], pods["vm-1"]
    assert "Operation not permitted" in pods["vm-1"]["error"]


# Run as `unshare --mount sh RO_ROOT RW_DIR... -- CMD...`: in the new mount namespace
# (private: nothing propagates back to the host), the writable directories become mounts
# of their own, then every other mount but /proc, /sys and /dev is remounted read-only
# (per mount, `bind`: the file systems themselves are not touched).
RO_ROOT = """set -eu
rw=""
while [ "$1" != "--" ]; do
    case "$1" in
        ro:*) mount --bind "${1#ro:}" "${1#ro:}"; mount -o remount,bind,ro "${1#ro:}" ;;
        *) rw="$rw $1"; mount --bind "$1" "$1" ;;
    esac
    shift
done
shift
for m in $(awk '{print $2}' /proc/self/mounts | sort -u); do
    case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
    case " $rw " in *" $m "*) continue ;; esac
    mount -o remount,bind,ro "$m"
done
exec "$@"
"""


def read_only_but(sandbox: Sandbox, *rw: str) -> list[str]:
    script = os.path.join(sandbox.tmp, "ro-root.sh")
    with open(script, "w") as f:
        f.write(RO_ROOT)
    return [shutil.which("unshare") or "unshare", "--mount", "--propagation", "private",
            "sh", script, *rw, "--"]


@pytest.mark.parametrize("case", ["unit", "etc-netns-read-only", "proc-sys-read-only"])
def test_a_read_only_file_system_but_the_units_directories(sandbox: Sandbox,
                                                            case: str) -> None:
    """As the unit has it, then with /etc/netns read-only too (pods lose resolv.conf),
    then with /proc/sys read-only as ProtectKernelTunables= would make it (the daemon
    cannot set up its local stacks: why the unit leaves that directive out)."""
    worker = sandbox.netns("worker")
    a, b = sandbox.netns("a"), sandbox.netns("b")
    ns = {"name": "shop", "cidr": "10.42.0.0/24",
          "pods": [{"name": "a", "ip": "10.42.0.2", "netns": a},
                   {"name": "b", "ip": "10.42.0.3", "netns": b}]}
    os.makedirs("/etc/netns", exist_ok=True)  # what ConfigurationDirectory= makes sure of
    d = Daemon(sandbox, worker, {"namespaces": [ns]})
    paths = {"unit": [d.dir, "/etc/netns"], "etc-netns-read-only": [d.dir],
             "proc-sys-read-only": [d.dir, "/etc/netns", "ro:/proc/sys"]}[case]
    d.command = [*read_only_but(sandbox, *paths), *fabricd_under(unit_caps())]
    if case == "proc-sys-read-only":
        with pytest.raises(RuntimeError) as e:
            d.start()
        assert "sysctl net/" in str(e.value) and "Read-only file system" in str(e.value)
        return
    d.start()
    d.wait_attached(2)
    assert "1 received" in sandbox.run(a, "ping", "-c", "1", "-W", "3", "10.42.0.3").stdout
    out = sandbox.run(a, "dig", "@10.42.0.1", "+short", "+time=2", "+tries=1",
                      "b.shop.fabric.internal", timeout=30).stdout
    assert out.strip() == "10.42.0.3"
    resolv = f"/etc/netns/{a}/resolv.conf"
    if case == "unit":
        with open(resolv) as f:
            assert "nameserver 10.42.0.1" in f.read()
        assert "Read-only file system" not in d.log(), d.log()
    else:
        assert not os.path.exists(resolv)
        assert "cannot write resolv.conf" in d.log() and "Read-only file system" in d.log()
    assert d.stop() == 0


def test_tunnels_under_the_units_sandbox(sandbox: Sandbox) -> None:
    """Two workers, each daemon in the whole sandbox: the Noise tunnel (UDP, its kernel
    pre-filter, GSO/GRO) carries traffic between pods on both."""
    from tests.e2e.test_tunnel import Cluster

    os.makedirs("/etc/netns", exist_ok=True)
    c = Cluster(sandbox)
    for d in (c.d1, c.d2):
        d.command = [*read_only_but(sandbox, d.dir, "/etc/netns"),
                     *families_only(sandbox, unit_families()), *fabricd_under(unit_caps())]
    c.start()
    out = sandbox.run(c.a, "ping", "-c", "3", "-i", "0.2", "-W", "3", "10.40.0.3").stdout
    assert "3 received" in out, out
    sandbox.http_server(c.b, 8080)
    body = sandbox.run(c.a, "curl", "-sS", "--max-time", "10",
                       "http://10.40.0.3:8080/bytes/5000000", "-o", "/dev/null", "-w",
                       "%{size_download}", timeout=30).stdout
    assert body == "5000000"
    assert c.d1.get("/v1/peers")[0]["last_handshake"] is not None
    for d in (c.d1, c.d2):
        assert "pre-filter not attached" not in d.log(), d.log()
        assert d.stop() == 0
