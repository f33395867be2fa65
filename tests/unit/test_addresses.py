"""The address rule (lowest free host) and the book that keeps the fabric's choices in a
file; the same on a real Fabric is tests/shell/test_fabric_addresses.py."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from fabric.runtime import addresses
from fabric.runtime.addresses import AddressBook, lowest_free


def test_lowest_free_skips_gateway_network_broadcast_and_used() -> None:
    cidr = IPv4Network("10.0.0.0/30")
    gw = IPv4Address("10.0.0.1")
    assert lowest_free(cidr, gw, []) == IPv4Address("10.0.0.2")
    assert lowest_free(cidr, gw, [IPv4Address("10.0.0.2")]) is None


def test_book_survives_reopen_and_a_damaged_file_is_set_aside(tmp_path: Path) -> None:
    path = str(tmp_path / "addresses.json")
    book = AddressBook(path)
    book.assign("shop", "a", IPv4Address("10.9.0.2"))
    assert AddressBook(path).get("shop", "a") == IPv4Address("10.9.0.2")
    assert book.release("shop", "a") and not book.release("shop", "a")
    assert AddressBook(path).booked("shop") == {}
    Path(path).write_text("{not json")
    assert AddressBook(path).booked("shop") == {}
    assert (tmp_path / "addresses.json.bad").read_text() == "{not json"


def test_journal_keeps_every_change_without_a_clean_close(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon killed mid-run: the snapshot plus the journal still hold every change,
    across several compactions."""
    monkeypatch.setattr(addresses, "SNAPSHOT_EVERY_CHANGE", 50)
    path = str(tmp_path / "addresses.json")
    book = AddressBook(path)
    for i in range(700):  # past the snapshot-always size and the book's: compacts too
        book.assign("shop", f"p{i}", IPv4Address(0x0A090002 + i), {"netns": f"/n/{i}"})
    for i in range(0, 700, 7):
        assert book.release("shop", f"p{i}")
    # no close(): what a kill -9 leaves
    again = AddressBook(path)
    assert again.booked("shop") == book.booked("shop")
    assert len(again.booked("shop")) == 600
    assert again.where("shop", "p1") == {"netns": "/n/1"}
    assert again.holder("shop", IPv4Address(0x0A090002 + 1)) == "p1"
    assert again.holder("shop", IPv4Address(0x0A090002)) is None
    # the journal stays about the book's size, not the number of changes
    lines = (tmp_path / "addresses.json.journal").read_text().count("\n")
    assert lines <= 700


def test_a_torn_journal_line_is_ignored_and_later_changes_survive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(addresses, "SNAPSHOT_EVERY_CHANGE", 0)  # every change journaled
    path = str(tmp_path / "addresses.json")
    book = AddressBook(path)
    book.assign("shop", "a", IPv4Address("10.9.0.2"))
    book.assign("shop", "b", IPv4Address("10.9.0.4"))
    with open(path + ".journal", "a", encoding="utf-8") as f:
        f.write('{"op":"assign","ns":"shop","pod":"c","ip":"10.9')  # the crash mid-write
    again = AddressBook(path)
    assert again.booked("shop") == {"a": IPv4Address("10.9.0.2"),
                                    "b": IPv4Address("10.9.0.4")}
    again.assign("shop", "d", IPv4Address("10.9.0.5"))  # not glued to the torn bytes
    third = AddressBook(path)
    assert third.get("shop", "d") == IPv4Address("10.9.0.5")
    assert third.get("shop", "c") is None


def test_small_books_keep_the_snapshot_whole_at_every_change(tmp_path: Path) -> None:
    """Up to SNAPSHOT_EVERY_CHANGE pods the file alone is the book, while running."""
    path = tmp_path / "addresses.json"
    book = AddressBook(str(path))
    book.assign("shop", "a", IPv4Address("10.9.0.2"))
    book.assign("shop", "b", IPv4Address("10.9.0.4"))
    book.release("shop", "a")
    assert json.loads(path.read_text())["namespaces"] == {"shop": {"b": "10.9.0.4"}}


def test_close_leaves_the_whole_book_in_the_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(addresses, "SNAPSHOT_EVERY_CHANGE", 0)
    path = tmp_path / "addresses.json"
    book = AddressBook(str(path))
    book.assign("shop", "a", IPv4Address("10.9.0.2"), {"netns": "/run/netns/x"})
    book.close()
    assert not (tmp_path / "addresses.json.journal").exists()
    data = json.loads(path.read_text())
    assert data["namespaces"] == {"shop": {"a": "10.9.0.2"}}
    assert data["where"] == {"shop": {"a": {"netns": "/run/netns/x"}}}


def test_released_reports_the_lowest_address_freed_once() -> None:
    book = AddressBook(None)
    for i, ip in enumerate(("10.9.0.2", "10.9.0.4", "10.9.0.5")):
        book.assign("shop", f"p{i}", IPv4Address(ip))
    assert book.take_released("shop") is None
    book.release("shop", "p2")
    book.release("shop", "p1")
    assert book.take_released("shop") == int(IPv4Address("10.9.0.4"))
    assert book.take_released("shop") is None
    book.assign("shop", "p0", IPv4Address("10.9.0.6"))  # moving a pod frees its old one
    assert book.take_released("shop") == int(IPv4Address("10.9.0.2"))


def test_lowest_free_from_a_start() -> None:
    cidr = IPv4Network("10.0.0.0/24")
    gw = IPv4Address("10.0.0.1")
    assert lowest_free(cidr, gw, set(), start=int(IPv4Address("10.0.0.9"))) == \
        IPv4Address("10.0.0.9")
    assert lowest_free(cidr, gw, {IPv4Address("10.0.0.9")},
                       start=int(IPv4Address("10.0.0.9"))) == IPv4Address("10.0.0.10")
