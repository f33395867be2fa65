"""Addresses the fabric hands out to pods that come without one (a CNI ADD), and the
files that keep them, so a restarted daemon neither forgets nor reuses them.

`lowest_free` is the sans-IO rule; `AddressBook` is the thin persistent shell. Its
state is a snapshot (a JSON file replaced atomically). Up to SNAPSHOT_EVERY_CHANGE pods it
is rewritten on every change and is the whole book; past that, rewriting it cost 45 ms
per CNI ADD with 10,000 pods booked, so a change is one JSON line appended to a journal
beside it and the snapshot is rewritten only when the journal has grown past the book's
own size, which keeps a change O(1) amortised. A
torn last line (a crash mid-append) is ignored. The default place is the control
socket's directory, a tmpfs under /run: it outlives the daemon, not a reboot — and
neither do the containers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Container, Iterable
from ipaddress import IPv4Address, IPv4Network
from typing import IO, Any

log = logging.getLogger("fabricd")
FILE_NAME = "addresses.json"
JOURNAL_SUFFIX = ".journal"
FORMAT = 1
# Up to this many booked pods the snapshot is rewritten on every change (a few ms), so
# the file alone is the book; past it changes go to the journal.
SNAPSHOT_EVERY_CHANGE = 512


def first_free(first: int, last: int, used: Callable[[int], bool]) -> int | None:
    """The lowest n in [first, last] for which `used(n)` is false."""
    for n in range(first, last + 1):
        if not used(n):
            return n
    return None


def lowest_free(cidr: IPv4Network, gateway: IPv4Address,
                used: Iterable[IPv4Address], start: int | None = None) -> IPv4Address | None:
    """The lowest host of `cidr` that is not the gateway, the network or broadcast
    address, nor in `used`; None when the CIDR is full. `start` (an address as an int)
    skips the hosts below it, which the caller knows to be used."""
    taken: Container[IPv4Address]
    taken = used if isinstance(used, (set, frozenset, dict)) else set(used)
    gw = int(gateway)
    first, last = int(cidr.network_address) + 1, int(cidr.broadcast_address) - 1
    if start is not None:
        first = max(first, start)
    n = first_free(first, last, lambda n: n == gw or IPv4Address(n) in taken)
    return None if n is None else IPv4Address(n)


class AddressBook:
    """namespace → pod → the address the fabric chose for it, and where the pod lives
    (its netns and ifname), so a restarted daemon can attach it again. `path` None
    keeps it in memory only (an embedded `Fabric` without a state directory)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._book: dict[str, dict[str, IPv4Address]] = {}
        self._owner: dict[str, dict[IPv4Address, str]] = {}  # the reverse of _book
        self._where: dict[str, dict[str, dict[str, str]]] = {}
        self._released: dict[str, int] = {}  # namespace -> lowest address released since
        self._journal: IO[str] | None = None
        self._journal_lines = 0
        if path is not None:
            self._load(path)

    # --- reading -------------------------------------------------------------------

    def get(self, namespace: str, pod: str) -> IPv4Address | None:
        return self._book.get(namespace, {}).get(pod)

    def booked(self, namespace: str) -> dict[str, IPv4Address]:
        """The pods of `namespace` with an address from the fabric (a copy)."""
        return dict(self._book.get(namespace, {}))

    def holder(self, namespace: str, ip: IPv4Address) -> str | None:
        """The pod `ip` is booked for, in O(1)."""
        return self._owner.get(namespace, {}).get(ip)

    def where(self, namespace: str, pod: str) -> dict[str, str]:
        """Where the pod lived when it was booked (`netns`, `ifname`), or {}."""
        return dict(self._where.get(namespace, {}).get(pod, {}))

    def take_released(self, namespace: str) -> int | None:
        """The lowest address (an int) released in `namespace` since the last call: a
        caller that keeps a scan hint lowers it to this."""
        return self._released.pop(namespace, None)

    # --- changing ------------------------------------------------------------------

    def assign(self, namespace: str, pod: str, ip: IPv4Address,
               where: dict[str, str] | None = None) -> None:
        where = where or {}
        if self.get(namespace, pod) == ip and self.where(namespace, pod) == where:
            return
        self._set(namespace, pod, ip, where)
        self._log({"op": "assign", "ns": namespace, "pod": pod, "ip": str(ip),
                   "where": where})

    def release(self, namespace: str, pod: str) -> bool:
        """Forget the pod's address; True if it had one."""
        if self._unset(namespace, pod) is None:
            return False
        self._log({"op": "release", "ns": namespace, "pod": pod})
        return True

    def close(self) -> None:
        """On a clean stop the snapshot gets every change, so the file a person reads
        is the whole book and no journal is left."""
        if self._journal_lines:
            self._compact()
            if self.path is not None and not self._journal_lines:
                try:
                    os.unlink(self.path + JOURNAL_SUFFIX)
                except OSError:
                    pass
        self._close_journal()

    def _close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _set(self, namespace: str, pod: str, ip: IPv4Address, where: dict[str, str]) -> None:
        self._unset(namespace, pod)
        self._book.setdefault(namespace, {})[pod] = ip
        self._owner.setdefault(namespace, {})[ip] = pod
        if where:
            self._where.setdefault(namespace, {})[pod] = dict(where)

    def _unset(self, namespace: str, pod: str) -> IPv4Address | None:
        pods = self._book.get(namespace)
        if not pods or pod not in pods:
            return None
        ip = pods.pop(pod)
        owners = self._owner.get(namespace, {})
        if owners.get(ip) == pod:
            del owners[ip]
        if not pods:
            del self._book[namespace]
            self._owner.pop(namespace, None)
        wheres = self._where.get(namespace)
        if wheres is not None:
            wheres.pop(pod, None)
            if not wheres:
                del self._where[namespace]
        low = self._released.get(namespace)
        if low is None or int(ip) < low:
            self._released[namespace] = int(ip)
        return ip

    # --- the files -----------------------------------------------------------------

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            spaces = data["namespaces"]
            wheres = data.get("where", {})
            for ns, pods in spaces.items():
                for p, ip in pods.items():
                    w = wheres.get(ns, {}).get(p, {})
                    self._set(str(ns), str(p), IPv4Address(ip),
                              {str(k): str(v) for k, v in w.items()})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # A damaged file must not keep the daemon from starting: say so, start empty,
            # keep the old file for a person to look at.
            self._book, self._owner, self._where = {}, {}, {}
            self._set_aside(path, e)
        self._replay(path + JOURNAL_SUFFIX)
        self._released.clear()

    def _replay(self, journal: str) -> None:
        try:
            with open(journal, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("address book journal %s is unreadable (%s); changes after the "
                        "last snapshot are lost", journal, e)
            return
        torn = lines.pop() if lines else ""  # after the last newline: "" unless torn
        bad = 0
        for line in lines:
            if not line:
                continue
            try:
                self._apply(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
            self._journal_lines += 1
        if bad:
            log.warning("address book journal %s: %d damaged lines skipped", journal, bad)
        if torn:
            log.info("address book journal %s: a torn last line (%d bytes) ignored",
                     journal, len(torn))
            self._compact()  # appending after the torn bytes would damage the next line

    def _apply(self, entry: dict[str, Any]) -> None:
        ns, pod = str(entry["ns"]), str(entry["pod"])
        if entry["op"] == "assign":
            where = {str(k): str(v) for k, v in dict(entry.get("where") or {}).items()}
            self._set(ns, pod, IPv4Address(entry["ip"]), where)
        elif entry["op"] == "release":
            self._unset(ns, pod)
        else:
            raise ValueError(f"unknown op {entry['op']!r}")

    def _set_aside(self, path: str, e: Exception) -> None:
        bad = f"{path}.bad"
        log.warning("address book %s is unreadable (%s); starting empty, old file kept "
                    "as %s", path, e, bad)
        try:
            os.replace(path, bad)
        except OSError:
            pass

    def _log(self, entry: dict[str, Any]) -> None:
        if self.path is None:
            return
        size = sum(len(p) for p in self._book.values())
        if size <= SNAPSHOT_EVERY_CHANGE or self._journal_lines >= size:
            self._compact()
            return
        try:
            if self._journal is None:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                self._journal = open(self.path + JOURNAL_SUFFIX, "a", encoding="utf-8")
            self._journal.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self._journal.flush()
            self._journal_lines += 1
        except OSError as e:
            log.warning("cannot append to the address book journal %s%s: %s (a restarted "
                        "daemon may hand this address out again)", self.path,
                        JOURNAL_SUFFIX, e)
            self._close_journal()

    def _compact(self) -> None:
        """Write the whole book as the snapshot, then empty the journal. A crash between
        the two replays a journal whose changes the snapshot holds already: harmless."""
        if self.path is None:
            return
        data = {"format": FORMAT, "namespaces": {
            ns: {p: str(ip) for p, ip in sorted(pods.items())}
            for ns, pods in sorted(self._book.items())},
            "where": {ns: dict(sorted(pods.items()))
                      for ns, pods in sorted(self._where.items()) if pods}}
        tmp = f"{self.path}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
            os.replace(tmp, self.path)  # readers see the old file or the new, never half
            self._close_journal()
            self._journal = open(self.path + JOURNAL_SUFFIX, "w", encoding="utf-8")
            self._journal_lines = 0
        except OSError as e:
            log.warning("cannot write the address book %s: %s (a restarted daemon may hand "
                        "these addresses out again)", self.path, e)
