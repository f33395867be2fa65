"""Addresses the fabric hands out to pods that come without one (a CNI ADD), and the
file that keeps them, so a restarted daemon neither forgets nor reuses them.

`lowest_free` is the sans-IO rule; `AddressBook` is the thin persistent shell: a JSON
file replaced atomically on every change (a few hundred bytes per namespace), read once
when the daemon starts. The default place is the control socket's directory, a tmpfs
under /run: it outlives the daemon, not a reboot — and neither do the containers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

log = logging.getLogger("fabricd")
FILE_NAME = "addresses.json"
FORMAT = 1


def lowest_free(cidr: IPv4Network, gateway: IPv4Address,
                used: Iterable[IPv4Address]) -> IPv4Address | None:
    """The lowest host of `cidr` that is not the gateway, the network or broadcast
    address, nor in `used`; None when the CIDR is full."""
    taken = {int(ip) for ip in used}
    taken.add(int(gateway))
    first, last = int(cidr.network_address) + 1, int(cidr.broadcast_address) - 1
    for n in range(first, last + 1):
        if n not in taken:
            return IPv4Address(n)
    return None


class AddressBook:
    """namespace → pod → the address the fabric chose for it, and where the pod lives
    (its netns and ifname), so a restarted daemon can attach it again. `path` None
    keeps it in memory only (an embedded `Fabric` without a state directory)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._book: dict[str, dict[str, IPv4Address]] = {}
        self._where: dict[str, dict[str, dict[str, str]]] = {}
        if path is not None:
            self._load(path)

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            spaces = data["namespaces"]
            for ns, pods in spaces.items():
                self._book[str(ns)] = {str(p): IPv4Address(ip) for p, ip in pods.items()}
            for ns, pods in data.get("where", {}).items():
                self._where[str(ns)] = {str(p): {str(k): str(v) for k, v in w.items()}
                                        for p, w in pods.items() if p in self._book.get(ns, {})}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # A damaged file must not keep the daemon from starting: say so, start empty,
            # keep the old file for a person to look at.
            self._book = {}
            self._where = {}
            bad = f"{path}.bad"
            log.warning("address book %s is unreadable (%s); starting empty, old file kept "
                        "as %s", path, e, bad)
            try:
                os.replace(path, bad)
            except OSError:
                pass

    def get(self, namespace: str, pod: str) -> IPv4Address | None:
        return self._book.get(namespace, {}).get(pod)

    def booked(self, namespace: str) -> dict[str, IPv4Address]:
        """The pods of `namespace` with an address from the fabric (a copy)."""
        return dict(self._book.get(namespace, {}))

    def where(self, namespace: str, pod: str) -> dict[str, str]:
        """Where the pod lived when it was booked (`netns`, `ifname`), or {}."""
        return dict(self._where.get(namespace, {}).get(pod, {}))

    def assign(self, namespace: str, pod: str, ip: IPv4Address,
               where: dict[str, str] | None = None) -> None:
        where = where or {}
        if self.get(namespace, pod) == ip and self.where(namespace, pod) == where:
            return
        self._book.setdefault(namespace, {})[pod] = ip
        if where:
            self._where.setdefault(namespace, {})[pod] = dict(where)
        else:
            self._where.get(namespace, {}).pop(pod, None)
        self._save()

    def release(self, namespace: str, pod: str) -> bool:
        """Forget the pod's address; True if it had one."""
        pods = self._book.get(namespace)
        if not pods or pod not in pods:
            return False
        del pods[pod]
        if not pods:
            del self._book[namespace]
        self._where.get(namespace, {}).pop(pod, None)
        self._save()
        return True

    def _save(self) -> None:
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
        except OSError as e:
            log.warning("cannot write the address book %s: %s (a restarted daemon may hand "
                        "these addresses out again)", self.path, e)
