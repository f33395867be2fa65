"""The microVM pieces that need no QEMU: the initramfs (cpio newc archive, module order
from modules.dep, compressed modules), QEMU's command line, the QMP client against a
scripted server, and the hook command's one-line errors."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from fabric.microvm import ctl, initramfs, qemu
from fabric.microvm.qmp import QMP, QMPError


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data), checking the magic and the 4-byte alignment."""
    out: dict[str, tuple[int, bytes]] = {}
    off = 0
    while True:
        assert data[off:off + 6] == b"070701", off
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_at = off + 110
        name = data[name_at:name_at + namesize - 1].decode()
        off = name_at + namesize
        off += -off % 4
        body = data[off:off + size]
        off += size
        off += -off % 4
        if name == "TRAILER!!!":
            assert off == len(data)
            return out
        out[name] = (mode, body)


def fake_kernel(tmp: Path, compress: bool = False) -> initramfs.Kernel:
    mods = tmp / "lib" / "modules" / "6.1.0-9-amd64"
    (mods / "kernel" / "drivers").mkdir(parents=True)
    ext = ".ko.xz" if compress else ".ko"
    dep = {"virtio_ring": [], "virtio": ["virtio_ring"],
           "virtio_pci_modern_dev": [], "virtio_pci_legacy_dev": [],
           "virtio_pci": ["virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio",
                          "virtio_ring"],
           "failover": [], "net_failover": ["failover"],
           # modules.dep lists the deepest dependency last
           "virtio_net": ["net_failover", "failover", "virtio", "virtio_ring"]}
    lines = []
    for name, deps in dep.items():
        body = f"module {name}".encode()
        path = mods / "kernel" / "drivers" / f"{name}{ext}"
        path.write_bytes(lzma.compress(body) if compress else body)
        lines.append(f"kernel/drivers/{name}{ext}: " +
                     " ".join(f"kernel/drivers/{d}{ext}" for d in deps))
    (mods / "modules.dep").write_text("\n".join(lines) + "\n")
    (mods / "modules.builtin").write_text("kernel/drivers/unrelated.ko\n")
    return initramfs.Kernel("6.1.0-9-amd64", str(tmp / "vmlinuz"), str(mods))


def test_modules_come_dependencies_first(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path)
    names = [initramfs._name(p) for p in initramfs.module_order(k.modules)]
    assert names == ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                     "virtio_pci", "failover", "net_failover", "virtio_net"]
    for i, n in enumerate(names):  # each after everything it needs
        assert n not in names[:i]


def test_a_builtin_module_needs_nothing_and_a_missing_one_is_named(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path)
    with open(os.path.join(k.modules, "modules.builtin"), "a") as f:
        f.write("kernel/drivers/virtio_net.ko\nkernel/drivers/virtio_pci.ko\n")
    assert initramfs.module_order(k.modules) == []
    with pytest.raises(FileNotFoundError, match="module e1000 not found"):
        initramfs.module_order(k.modules, ("e1000",))


@pytest.mark.parametrize("compress", [False, True])
def test_the_archive_holds_init_busybox_and_the_modules(tmp_path: Path, compress: bool) -> None:
    k = fake_kernel(tmp_path, compress)
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF fake busybox")
    out = tmp_path / "guest.cpio.gz"
    mods = initramfs.build(str(out), k, str(bb))
    files = parse_newc(gzip.decompress(out.read_bytes()))
    assert files["bin/busybox"] == (0o100755, b"\x7fELF fake busybox")
    assert files["bin/sh"] == (0o120777, b"busybox")
    assert files["init"][0] == 0o100755 and files["init"][1].startswith(b"#!/bin/busybox sh")
    assert files["etc/modules"][1].decode().split() == mods
    # decompressed: busybox insmod takes what it is given
    assert files["lib/modules/virtio_net.ko"][1] == b"module virtio_net"
    init = files["init"][1].decode()
    assert "udhcpc -i eth0" in init and f"httpd -p {initramfs.HTTP_PORT}" in init
    assert f"nc -l -p {initramfs.SINK_PORT}" in init
    assert files["www/cgi-bin/resolve"][0] == 0o100755


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox-static not installed")
def test_busybox_cpio_reads_the_archive(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path)
    out = tmp_path / "guest.cpio.gz"
    initramfs.build(str(out), k, str(shutil.which("busybox")))
    p = subprocess.run(["busybox", "cpio", "-t"], input=gzip.decompress(out.read_bytes()),
                       capture_output=True, timeout=30)
    listed = p.stdout.decode().split()
    assert p.returncode == 0, p.stderr
    assert {"init", "bin/busybox", "lib/modules/virtio_net.ko", "etc/udhcpc.script"} <= \
        set(listed)


def spec(tmp: Path, accel: str = "tcg") -> qemu.VMSpec:
    return qemu.VMSpec(name="vm1", dir=str(tmp), tap="tap-vm1", mac="02:00:0a:00:00:05",
                       kernel="/boot/vmlinuz", initrd=str(tmp / "i.gz"), accel=accel)


def test_qemu_command_line(tmp_path: Path) -> None:
    a = qemu.argv(spec(tmp_path))
    joined = " ".join(a)
    assert "-accel tcg" in joined and "-cpu" not in a and "-m 128" in joined
    net = a[a.index("-netdev") + 1]
    assert "ifname=tap-vm1" in net and "vhost=off" in net and "vnet_hdr=on" in net
    assert "script=no" in net and "downscript=no" in net
    dev = a[a.index("-device") + 1]
    assert "mac=02:00:0a:00:00:05" in dev and "host_tso4=on" in dev and "csum=on" in dev
    assert f"unix:{tmp_path}/qmp.sock,server=on,wait=off" in a
    assert "-incoming" not in a and "-daemonize" in a
    r = qemu.argv(spec(tmp_path, "kvm"), incoming="exec:cat /x")
    assert r[r.index("-incoming") + 1] == "exec:cat /x" and "-S" in r
    assert "host,-arch-capabilities" in r  # nested KVM refuses that MSR otherwise


def test_spec_round_trips_through_its_file(tmp_path: Path) -> None:
    s = spec(tmp_path)
    s.save()
    assert qemu.VMSpec.load(str(tmp_path)) == s


def qmp_server(path: str, replies: list[bytes]) -> list[dict[str, object]]:
    """A QMP peer that greets, then answers each request with the next reply."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    got: list[dict[str, object]] = []

    def serve() -> None:
        c, _ = srv.accept()
        with c, c.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for reply in replies:
                line = f.readline()
                if not line:
                    return
                got.append(json.loads(line))
                f.write(reply)
                f.flush()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return got


def test_qmp_commands_events_and_errors(tmp_path: Path) -> None:
    path = str(tmp_path / "q.sock")
    got = qmp_server(path, [
        b'{"return": {}}\n',
        b'{"event": "STOP", "timestamp": {}}\n{"return": {}}\n',
        b'{"return": {"status": "paused", "running": false}}\n',
        b'{"error": {"class": "GenericError", "desc": "no snapshot"}}\n'])
    with QMP(path) as q:
        q.cmd("stop")
        assert q.status() == "paused"
        with pytest.raises(QMPError, match="QMP migrate: no snapshot"):
            q.cmd("migrate", uri="exec:cat > /x")
    assert [g["execute"] for g in got] == ["qmp_capabilities", "stop", "query-status",
                                          "migrate"]
    assert got[3]["arguments"] == {"uri": "exec:cat > /x"}


def test_qmp_says_which_socket_is_missing(tmp_path: Path) -> None:
    with pytest.raises(QMPError, match="q.sock"):
        QMP(str(tmp_path / "q.sock")).connect()


def test_ctl_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main([str(tmp_path / "nowhere"), "resume"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("microvm resume: ")
    spec(tmp_path).save()  # a VM that is not running: nothing listens on its QMP socket
    assert ctl.main([str(tmp_path), "pause"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "qmp.sock" in err
    assert ctl.main([str(tmp_path), "status"]) == 0
    assert capsys.readouterr().out == "not running\n"


def test_ctl_control_and_pod_go_together(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--control", "/x"], ["--pod", "ns/vm"],
                 ["--control", "/x", "--pod", "vm"]):
        with pytest.raises(SystemExit) as e:
            ctl.main([str(tmp_path), "snapshot", *args])
        assert e.value.code == 2
        assert "--control and --pod NS/POD go together" in capsys.readouterr().err


def test_ctl_says_when_the_daemon_refuses(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            got = b""
            while not got.endswith(b"}"):  # the headers, then the JSON body
                chunk = c.recv(65536)
                if not chunk:
                    break
                got += chunk
            assert got.endswith(b'{"ready": false}')
            body = b'{"error": "pod vm not found"}'
            c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body))
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(RuntimeError, match="marking ns/vm not ready: 404"):
        ctl.set_ready(path, "ns/vm", False)
