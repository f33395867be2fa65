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
