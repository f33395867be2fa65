"""The address rule (lowest free host) and the book that keeps the fabric's choices in a
file; the same on a real Fabric is tests/shell/test_fabric_addresses.py."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

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
