"""Build the microVM guest's initramfs from Debian's busybox-static and the kernel's
virtio modules: `python -m fabric.microvm.initramfs -o guest.cpio.gz`.

The guest needs nothing else: its init loads virtio-net, configures eth0 by DHCP from
the fabric's gateway (udhcpc; resolv.conf from the lease's DNS server and search list),
then serves HTTP on port 80 (busybox httpd, with CGI scripts that report what the guest
sees and resolve names) and sinks TCP on port 5001 (busybox nc into /dev/null: the guest
has no iperf3, so throughput is measured by sending it bytes). The archive is written
in Python (cpio "newc", gzip): no cpio or mkinitramfs needed.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import lzma
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

# What virtio-net over PCI needs on Debian's 6.1 kernel (both are modules there);
# their dependencies come from modules.dep.
MODULES = ("virtio_pci", "virtio_net")
BUSYBOX = "/bin/busybox"
HTTP_PORT = 80
SINK_PORT = 5001
IPERF_PORT = 5201
IPERF3 = "/usr/bin/iperf3"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules); do
    insmod "/lib/modules/$m.ko" || echo "fabricd-guest: insmod $m failed"
done
ip link set lo up
if grep -q fabricd.probe /proc/cmdline; then echo "fabricd-guest: probe ok"; poweroff -f; fi
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
ip link set eth0 up
# Stays in the foreground (renewals); the lease script writes /run/bound.
udhcpc -i eth0 -f -s /etc/udhcpc.script -O search -O mtu -t 30 -T 1 -A 1 >/run/udhcpc.log 2>&1 &
n=0
while [ ! -e /run/bound ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
httpd -p {http} -h /www
(while true; do nc -l -p {sink} >/dev/null 2>&1; done) &
if [ -x /bin/iperf3 ]; then iperf3 -s -D -p {iperf} >/dev/null 2>&1; fi
echo "fabricd-guest: up $(cat /run/bound 2>/dev/null || echo no-lease)"
exec sh -c 'while true; do sleep 3600; done'
"""

LEASE = r"""#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    ip route replace default via "$router" dev "$interface"
    : > /etc/resolv.conf.new
    [ -n "$search" ] && echo "search $search" >> /etc/resolv.conf.new
    for s in $dns; do echo "nameserver $s" >> /etc/resolv.conf.new; done
    mv /etc/resolv.conf.new /etc/resolv.conf
    echo "$ip" > /run/bound
    ;;
esac
"""

# GET /cgi-bin/info: what DHCP gave the guest. GET /cgi-bin/resolve?NAME: the guest's
# resolver (busybox nslookup through resolv.conf's nameserver, search domain appended).
CGI_INFO = r"""#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "ip $(cat /run/bound)"
ip -4 route | sed 's/^/route /'
ip link show eth0 | sed -n 's/.* mtu \([0-9]*\) .*/mtu \1/p'
sed 's/^/resolv /' /etc/resolv.conf
"""

CGI_RESOLVE = r"""#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
name=$(echo "$QUERY_STRING" | tr -cd 'a-zA-Z0-9.-')
domain=$(sed -n 's/^search \([^ ]*\).*/\1/p' /etc/resolv.conf)
case "$name" in *.*) fqdn=$name ;; *) fqdn=$name.$domain ;; esac
nslookup "$fqdn" 2>&1 | sed -n '/^Name:/,$s/^Address: *\([0-9.]*\)$/\1/p'
"""

INDEX = "hello from the microVM\n"


@dataclass(frozen=True)
class Kernel:
    """A kernel to boot and the modules directory that matches it."""

    version: str
    vmlinuz: str
    modules: str


def find_kernel(version: str | None = None) -> Kernel | None:
    """The newest Debian kernel with its modules installed (linux-image-amd64), or None."""
    found = []
    for path in glob.glob("/boot/vmlinuz-*"):
        ver = os.path.basename(path)[len("vmlinuz-"):]
        mods = os.path.join("/lib/modules", ver)
        if (version is None or ver == version) and os.path.exists(
                os.path.join(mods, "modules.dep")):
            found.append(Kernel(ver, path, mods))

    def key(k: Kernel) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", k.version)]

    return max(found, key=key) if found else None


def module_order(modules_dir: str, wanted: tuple[str, ...] = MODULES) -> list[str]:
    """The module files (relative to modules_dir) to load, dependencies first, from
    modules.dep; a module built into the kernel (modules.builtin) needs nothing."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    with open(os.path.join(modules_dir, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
            by_name[_name(path)] = path
    builtin: set[str] = set()
    try:
        with open(os.path.join(modules_dir, "modules.builtin")) as f:
            builtin = {_name(line.strip()) for line in f}
    except FileNotFoundError:
        pass
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):  # modules.dep lists the deepest last
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in builtin:
            continue
        if name not in by_name:
            raise FileNotFoundError(f"module {name} not found in {modules_dir}/modules.dep")
        visit(by_name[name])
    return order


def _name(path: str) -> str:
    base = os.path.basename(path)
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base).replace("-", "_")


def _module_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        raise ValueError(f"{path}: zstd-compressed modules are not supported")
    return data


class Cpio:
    """A cpio archive in the "newc" format the kernel unpacks as its initramfs."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % v for v in fields)
        blob = head + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4)
        self.parts.append(blob + data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def build(out: str, kernel: Kernel, busybox: str = BUSYBOX) -> list[str]:
    """Write the gzip'd initramfs to `out`; returns the modules it loads, in order."""
    order = module_order(kernel.modules)
    cpio = Cpio()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "run", "tmp", "www",
              "www/cgi-bin"):
        cpio.dir(d)
    with open(busybox, "rb") as f:
        cpio.file("bin/busybox", f.read(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    names = []
    for rel in order:
        name = _name(rel)
        names.append(name)
        cpio.file(f"lib/modules/{name}.ko", _module_bytes(os.path.join(kernel.modules, rel)))
    cpio.file("etc/modules", ("\n".join(names) + "\n").encode())
    cpio.file("init", INIT.replace("{http}", str(HTTP_PORT)).replace(
        "{sink}", str(SINK_PORT)).replace("{iperf}", str(IPERF_PORT)).encode(), 0o755)
    _add_dynamic(cpio, IPERF3, "bin/iperf3")
    cpio.file("etc/udhcpc.script", LEASE.encode(), 0o755)
    cpio.file("etc/resolv.conf", b"")
    cpio.file("www/index.html", INDEX.encode())
    cpio.file("www/cgi-bin/info", CGI_INFO.encode(), 0o755)
    cpio.file("www/cgi-bin/resolve", CGI_RESOLVE.encode(), 0o755)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    os.replace(tmp, out)
    return names


def _add_dynamic(cpio: Cpio, exe: str, dest: str) -> bool:
    """Copy a dynamically linked program and the libraries ldd names (at their own
    paths) into the archive: iperf3 for the throughput figure. False if it is absent."""
    if not os.path.exists(exe):
        return False
    out = subprocess.run(["ldd", exe], capture_output=True, text=True, timeout=30).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0] if parts else ""
        if path.startswith("/"):
            libs.append(path)
    made: set[str] = set()
    for lib in libs:
        real = os.path.realpath(lib)
        rel = lib.lstrip("/")
        parent = os.path.dirname(rel)
        for i in range(1, len(parent.split("/")) + 1):
            d = "/".join(parent.split("/")[:i])
            if d not in made and d not in ("lib",):
                cpio.dir(d)
                made.add(d)
        with open(real, "rb") as f:
            cpio.file(rel, f.read(), 0o755)
    with open(exe, "rb") as f:
        cpio.file(dest, f.read(), 0o755)
    return True


def missing() -> str | None:
    """Why a microVM cannot be built here (one line), or None."""
    if not os.path.exists(BUSYBOX) or shutil.which("busybox") is None:
        return "busybox (Debian busybox-static) is not installed"
    if find_kernel() is None:
        return "no kernel with modules in /boot and /lib/modules (Debian linux-image-amd64)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fabric.microvm.initramfs",
                                description="Build the microVM guest's initramfs.")
    p.add_argument("-o", "--output", required=True, help="where to write the .cpio.gz")
    p.add_argument("--kernel-version", help="default: the newest in /boot with modules")
    p.add_argument("--busybox", default=BUSYBOX, help="a static busybox (busybox-static)")
    a = p.parse_args(argv)
    kernel = find_kernel(a.kernel_version)
    if kernel is None:
        print("initramfs: no kernel with modules found (install linux-image-amd64)",
              file=sys.stderr)
        return 1
    try:
        mods = build(a.output, kernel, a.busybox)
    except (OSError, ValueError) as e:
        print(f"initramfs: {e}", file=sys.stderr)
        return 1
    print(f"{a.output}: busybox, modules {' '.join(mods)}; boot with {kernel.vmlinuz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
