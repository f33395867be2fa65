"""resolv.conf files for pods in named namespaces: ours only, per pod, no symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway import resolvconf


@pytest.fixture(autouse=True)
def etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(resolvconf, "ETC_NETNS", str(tmp_path))
    return tmp_path


def test_two_pods_sharing_a_netns_name_do_not_remove_each_others_file(etc: Path) -> None:
    resolvconf.write("shared", "shop/a", "10.0.0.1", ["shop.fabric.internal"])
    resolvconf.write("shared", "blue/b", "10.1.0.1", ["blue.fabric.internal"])  # last wins
    resolvconf.remove("shared", "shop/a")  # a detaches: the file is b's now, it stays
    text = (etc / "shared" / "resolv.conf").read_text()
    assert "10.1.0.1" in text and "blue/b" in text
    resolvconf.remove("shared", "blue/b")
    assert not (etc / "shared").exists()


def test_a_planted_symlink_is_never_written_through(etc: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (etc / "ns1").mkdir()
    os.symlink(victim, etc / "ns1" / "resolv.conf.fabricd-tmp")
    path = resolvconf.write("ns1", "shop/a", "10.0.0.1", ["shop.fabric.internal"])
    assert victim.read_text() == "precious\n"
    assert path is not None and "nameserver 10.0.0.1" in Path(path).read_text()
    assert not os.path.islink(path)


def test_an_operators_file_is_left_alone(etc: Path) -> None:
    (etc / "mine").mkdir()
    (etc / "mine" / "resolv.conf").write_text("nameserver 9.9.9.9\n")
    assert resolvconf.write("mine", "shop/a", "10.0.0.1", ["x"]) is None
    resolvconf.remove("mine")
    assert (etc / "mine" / "resolv.conf").read_text() == "nameserver 9.9.9.9\n"


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /run/netns, apart from the /etc/netns one."""
    d = tmp_path.parent / (tmp_path.name + "-run")
    d.mkdir()
    monkeypatch.setattr(resolvconf, "RUN_NETNS", str(d))
    return d


def test_sweep_removes_our_files_whose_netns_is_gone(
        etc: Path, run: Path, caplog: pytest.LogCaptureFixture) -> None:
    resolvconf.write("gone", "shop/a", "10.0.0.1", ["shop.fabric.internal"])
    resolvconf.write("alive", "shop/b", "10.0.0.1", ["shop.fabric.internal"])
    (run / "alive").touch()  # another daemon's pod may live there: its file stays
    (etc / "cut").mkdir()  # a write cut short by SIGKILL: only the temporary file
    (etc / "cut" / "resolv.conf.fabricd-tmp").write_text(
        resolvconf.render("blue/c", "10.1.0.1", ["x"]))
    with caplog.at_level("INFO", logger="fabricd.dns"):
        removed = resolvconf.sweep_stale()
    assert removed == [str(etc / "cut" / "resolv.conf.fabricd-tmp"),
                       str(etc / "gone" / "resolv.conf")]
    assert not (etc / "gone").exists() and not (etc / "cut").exists()
    assert (etc / "alive" / "resolv.conf").read_text().startswith(resolvconf.MARKER)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "pod shop/a" in lines[1] and "netns gone is gone" in lines[1]
    assert resolvconf.sweep_stale() == []


def test_sweep_never_touches_files_without_the_marker(etc: Path, run: Path) -> None:
    (etc / "mine").mkdir()
    (etc / "mine" / "resolv.conf").write_text("nameserver 9.9.9.9\n")
    (etc / "mine" / "hosts").write_text("127.0.0.1 x\n")
    resolvconf.write("mixed", "shop/a", "10.0.0.1", ["x"])
    (etc / "mixed" / "hosts").write_text("127.0.0.1 x\n")  # the operator's, next to ours
    (etc / "empty").mkdir()
    assert resolvconf.sweep_stale() == [str(etc / "mixed" / "resolv.conf")]
    assert (etc / "mine" / "resolv.conf").read_text() == "nameserver 9.9.9.9\n"
    assert (etc / "mixed" / "hosts").exists()  # so its directory stays too
    assert (etc / "empty").is_dir()  # not ours to remove: nothing of ours was in it


def test_sweep_never_follows_symlinks(etc: Path, run: Path, tmp_path: Path) -> None:
    """A symlink to a file with our marker, or a symlinked directory: left alone, and
    what they point at too."""
    elsewhere = tmp_path.parent / (tmp_path.name + "-elsewhere")
    (elsewhere / "d").mkdir(parents=True)
    target = elsewhere / "d" / "resolv.conf"
    target.write_text(resolvconf.render("shop/a", "10.0.0.1", ["x"]))
    (etc / "link").mkdir()
    os.symlink(target, etc / "link" / "resolv.conf")
    os.symlink(elsewhere / "d", etc / "dirlink")
    assert resolvconf.sweep_stale() == []
    assert target.exists() and os.path.islink(etc / "link" / "resolv.conf")
    assert os.path.islink(etc / "dirlink")


def test_sweep_skips_a_fifo_and_a_netns_it_cannot_tell(etc: Path, run: Path) -> None:
    (etc / "fifo").mkdir()
    os.mkfifo(etc / "fifo" / "resolv.conf")  # opened without blocking, never read
    resolvconf.write("odd", "shop/a", "10.0.0.1", ["x"])
    os.symlink("/nonexistent", run / "odd")  # anything at /run/netns/<name>: present
    assert resolvconf.sweep_stale() == []
    assert (etc / "odd" / "resolv.conf").exists()


def test_sweep_without_the_directories_is_a_no_op(tmp_path: Path) -> None:
    assert resolvconf.sweep_stale(str(tmp_path / "no-etc"), str(tmp_path / "no-run")) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_sweep_logs_a_file_it_cannot_remove_and_goes_on(
        etc: Path, run: Path, caplog: pytest.LogCaptureFixture) -> None:
    resolvconf.write("a", "shop/a", "10.0.0.1", ["x"])
    resolvconf.write("b", "shop/b", "10.0.0.1", ["x"])
    os.chmod(etc / "a", 0o555)  # read-only directory: the unlink fails
    try:
        assert resolvconf.sweep_stale() == [str(etc / "b" / "resolv.conf")]
    finally:
        os.chmod(etc / "a", 0o755)
    assert any("cannot remove" in r.getMessage() for r in caplog.records)


def test_sweep_from_the_command_line(etc: Path, run: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    resolvconf.write("gone", "shop/a", "10.0.0.1", ["x"])
    assert resolvconf.main(["--sweep"]) == 0
    assert capsys.readouterr().out == f"removed {etc / 'gone' / 'resolv.conf'}\n"
    assert resolvconf.main([]) == 2
