"""The DNS names of one fabric namespace: pods, services and the gateway.

The gateway is authoritative for `<namespace>.<domain>.` and for the reverse names of the
namespace's CIDR; everything else is forwarded. Names are kept as tuples of lower-cased
label bytes because DNS compares ASCII case-insensitively (0x20 randomisation) and labels
may hold any byte; the string methods are a thin convenience over the label methods the
DNS core calls with labels it parsed straight off the wire.

Reverse space. The gateway owns the in-addr.arpa names of the CIDR's addresses. When the
prefix length is a multiple of 8 (/8, /16, /24) that is exactly one zone, `reverse_zone`.
For /9../23 it is the 2..128 octet-aligned zones inside the CIDR (`reverse_zones`, e.g. a
/20 owns `0..15.10.10.in-addr.arpa.`), each with its own apex. For /25../30 no octet-aligned
zone fits, so only the address names themselves are owned and negative answers carry the
SOA of the enclosing /24 (`reverse_zone`), the way RFC 2317 delegations look from inside.

Every change bumps `version`, which is how the DNS core knows to drop its answer cache, so
changes are visible to the very next query.
"""

from __future__ import annotations

import re
from collections import Counter
from ipaddress import IPv4Address, IPv4Network

Labels = tuple[bytes, ...]

GATEWAY_NAME = "gateway"
_GATEWAY_REL: Labels = (b"gateway",)
_ARPA: Labels = (b"in-addr", b"arpa")
_LABEL_RE = re.compile(rb"[a-z0-9_-]{1,63}\Z")
MAX_NAME_WIRE = 255


def to_labels(name: str) -> Labels:
    """A presentation-format name as lower-cased label bytes; the root is `()`.

    No backslash escapes: fabric names are plain LDH labels, and the wire path never
    comes through here.
    """
    name = name.rstrip(".") if name not in (".", "") else ""
    if not name:
        return ()
    return tuple(part.encode("utf-8").lower() for part in name.split("."))


def to_text(labels: Labels) -> str:
    """Lower-cased presentation form with the trailing dot."""
    return ".".join(lab.decode("utf-8", "backslashreplace") for lab in labels) + "."


def wire_len(labels: Labels) -> int:
    return sum(len(lab) + 1 for lab in labels) + 1


def _octet(label: bytes) -> int:
    """A canonical decimal octet label (no sign, no leading zero), else -1."""
    if not label.isdigit() or len(label) > 3 or (len(label) > 1 and label[0] == 0x30):
        return -1
    value = int(label)
    return value if value <= 255 else -1


class Records:
    """Names of one namespace. Mutations are O(labels); lookups are dict hits."""

    def __init__(self, namespace: str, domain: str = "fabric.internal",
                 cidr: IPv4Network | str = "10.88.0.0/24") -> None:
        self.cidr = IPv4Network(cidr)
        if self.cidr.prefixlen > 30:
            raise ValueError(f"cidr {self.cidr}: needs room for a gateway and a host")
        self.zone_labels: Labels = to_labels(namespace) + to_labels(domain)
        if not self.zone_labels or any(not _LABEL_RE.match(lab) for lab in self.zone_labels):
            raise ValueError(f"zone {namespace}.{domain}: not a DNS name")
        if wire_len(self.zone_labels) + len(b"hostmaster") + 1 > MAX_NAME_WIRE:
            raise ValueError(f"zone {namespace}.{domain}: too long")
        self.zone = to_text(self.zone_labels)
        self.gateway = self.cidr.network_address + 1
        self.version = 0
        self._net = int(self.cidr.network_address)
        self._plen = self.cidr.prefixlen
        # relative labels -> address; the gateway is a name like any other, but fixed
        self._a: dict[Labels, IPv4Address] = {_GATEWAY_REL: self.gateway}
        # The names as the caller gave them, so `sync` compares without re-validating.
        self._given: dict[str, tuple[Labels, IPv4Address]] = {}
        # labels -> the given names that spell them, so forgetting one costs O(1)
        self._texts: dict[Labels, set[str]] = {}
        self._ents: Counter[Labels] = Counter()  # proper suffixes of names: empty non-terminals
        self._ptr: dict[int, set[Labels]] = {int(self.gateway): {_GATEWAY_REL}}
        self._ptr_nets: Counter[tuple[int, int]] = Counter()  # (octets, prefix) with a PTR below
        self._add_ptr_nets(int(self.gateway), 1)
        plen = self._plen
        enclosing = plen // 8  # octets of the smallest aligned zone holding the whole CIDR
        self.reverse_zone_labels: Labels = self._rev_labels(self._net, enclosing)
        self.reverse_zone = to_text(self.reverse_zone_labels)
        if plen <= 24:
            level = -(-plen // 8)
            step = 1 << (32 - 8 * level)
            self._apex_octets = level
            self.reverse_zones: tuple[str, ...] = tuple(
                to_text(self._rev_labels(self._net + i * step, level))
                for i in range(1 << (8 * level - plen)))
        else:
            self._apex_octets = 0  # no zone apex of our own: address names only
            self.reverse_zones = ()

    # --- mutation --------------------------------------------------------------------

    def set(self, name: str, ip: IPv4Address | str) -> None:
        """Add or move a pod/service name (relative, or absolute inside the zone)."""
        rel = self._rel_name(name)
        ip = IPv4Address(ip)
        self._forget_given(rel)
        self._unset(rel)
        self._put(rel, ip)
        self._give(name, rel, ip)
        self.version += 1

    def remove(self, name: str) -> None:
        """Forget a name; unknown names are fine (removal is idempotent)."""
        rel = self._rel_name(name)
        self._forget_given(rel)
        if self._unset(rel):
            self.version += 1

    def _forget_given(self, rel: Labels) -> None:
        for text in self._texts.pop(rel, ()):
            del self._given[text]

    def _give(self, name: str, rel: Labels, ip: IPv4Address) -> None:
        old = self._given.get(name)
        if old is not None and old[0] != rel:
            self._ungive(name)
        self._given[name] = (rel, ip)
        self._texts.setdefault(rel, set()).add(name)

    def _ungive(self, name: str) -> Labels:
        rel = self._given.pop(name)[0]
        texts = self._texts.get(rel)
        if texts is not None:
            texts.discard(name)
            if not texts:
                del self._texts[rel]
        return rel

    def replace_all(self, names: dict[str, IPv4Address | str]) -> None:
        """Swap in a whole new set; validated first so a bad entry changes nothing."""
        new = {n: (self._rel_name(n), IPv4Address(ip)) for n, ip in names.items()}
        for rel in [r for r in self._a if r != _GATEWAY_REL]:
            self._unset(rel)
        for rel, ip in new.values():
            self._put(rel, ip)
        self._given = new
        self._texts = {}
        for name, (rel, _) in new.items():
            self._texts.setdefault(rel, set()).add(name)
        self.version += 1

    def sync(self, names: dict[str, IPv4Address | str]) -> bool:
        """Make the set equal to `names`, touching only what differs: a 10,000-name
        namespace that gains one pod costs one name, not 10,000 (replace_all's price).
        Validated first, like replace_all; returns whether anything changed."""
        given = self._given
        changed: list[tuple[str, Labels, IPv4Address]] = []
        for name, ip in names.items():
            if not isinstance(ip, IPv4Address):
                ip = IPv4Address(ip)
            cur = given.get(name)
            if cur is None or cur[1] != ip:
                changed.append((name, self._rel_name(name), ip))
        gone = [name for name in given if name not in names]
        if not changed and not gone:
            return False
        if gone:
            rels = [self._ungive(name) for name in gone]
            for rel in rels:
                if rel not in self._texts:  # not also given in another form
                    self._unset(rel)
        for name, rel, ip in changed:
            self._unset(rel)
            self._put(rel, ip)
            self._give(name, rel, ip)
        self.version += 1
        return True

    def names(self) -> dict[str, IPv4Address]:
        """Pod and service names (relative, without the gateway)."""
        return {".".join(lab.decode() for lab in rel): ip
                for rel, ip in self._a.items() if rel != _GATEWAY_REL}

    def _rel_name(self, name: str) -> Labels:
        absolute = name.endswith(".")
        labels = to_labels(name)
        if absolute:
            n = len(self.zone_labels)
            if labels[-n:] != self.zone_labels:
                raise ValueError(f"name {name!r} is not inside zone {self.zone}")
            labels = labels[:-n]
        if not labels or any(not _LABEL_RE.match(lab) for lab in labels):
            raise ValueError(f"name {name!r}: labels must be 1-63 of [a-z0-9_-]")
        if labels == _GATEWAY_REL:
            raise ValueError(f"name {name!r} is reserved for the gateway")
        if wire_len(labels + self.zone_labels) > MAX_NAME_WIRE:
            raise ValueError(f"name {name!r}: longer than 255 bytes with the zone")
        return labels

    def _put(self, rel: Labels, ip: IPv4Address) -> None:
        self._a[rel] = ip
        for i in range(1, len(rel)):
            self._ents[rel[i:]] += 1
        key = int(ip)
        names = self._ptr.get(key)
        if names is None:
            self._ptr[key] = {rel}
            self._add_ptr_nets(key, 1)
        else:
            names.add(rel)

    def _unset(self, rel: Labels) -> bool:
        ip = self._a.pop(rel, None)
        if ip is None:
            return False
        for i in range(1, len(rel)):
            suffix = rel[i:]
            self._ents[suffix] -= 1
            if self._ents[suffix] <= 0:
                del self._ents[suffix]
        key = int(ip)
        names = self._ptr[key]
        names.discard(rel)
        if not names:
            del self._ptr[key]
            self._add_ptr_nets(key, -1)
        return True

    def _add_ptr_nets(self, ip: int, delta: int) -> None:
        for octets in (1, 2, 3):
            net = (octets, ip >> (32 - 8 * octets))
            self._ptr_nets[net] += delta
            if self._ptr_nets[net] <= 0:
                del self._ptr_nets[net]

    # --- label API (what the DNS core uses) ------------------------------------------

    def zone_rel(self, labels: Labels) -> Labels | None:
        """Labels relative to the zone apex, or None when the name is outside the zone."""
        zl = self.zone_labels
        n = len(zl)
        if len(labels) < n or labels[len(labels) - n:] != zl:
            return None
        return labels[:len(labels) - n]

    def a_rel(self, rel: Labels) -> IPv4Address | None:
        return self._a.get(rel)

    def exists_rel(self, rel: Labels) -> bool:
        return not rel or rel in self._a or rel in self._ents

    def reverse(self, labels: Labels) -> tuple[Labels, bool, int | None] | None:
        """Classify an in-addr.arpa name we own.

        Returns None when the name is not ours, else (soa_owner, is_apex, exists_ip) where
        exists_ip is the address for a 4-octet name with nothing below it, -1 for an
        existing interior name, and None for a name that does not exist.
        """
        if len(labels) < 3 or labels[-2:] != _ARPA:
            return None
        octets: list[int] = []
        value = 0
        owned_at = 0
        pos = len(labels) - 3
        while pos >= 0 and len(octets) < 4:
            o = _octet(labels[pos])
            if o < 0:
                break
            octets.append(o)
            value = (value << 8) | o
            k = len(octets)
            if not owned_at and 8 * k >= self._plen:
                shift = 32 - self._plen
                if ((value << (32 - 8 * k)) >> shift) == (self._net >> shift):
                    owned_at = k
            pos -= 1
        if not owned_at:
            return None
        if self._apex_octets:
            soa = labels[len(labels) - 2 - self._apex_octets:]
        else:
            soa = self.reverse_zone_labels
        k = len(octets)
        if pos >= 0:  # labels below a full address, or a non-octet label: never exist
            return soa, False, None
        if k == 4:
            return soa, False, value if value in self._ptr else None
        if k == self._apex_octets:
            return soa, True, -1
        return soa, False, -1 if (k, value) in self._ptr_nets else None

    def ptr_ip(self, ip: int) -> Labels | None:
        """The absolute name for an address: the gateway first, then the smallest name."""
        names = self._ptr.get(ip)
        if not names:
            return None
        rel = _GATEWAY_REL if _GATEWAY_REL in names else min(names)
        return rel + self.zone_labels

    @staticmethod
    def _rev_labels(addr: int, octets: int) -> Labels:
        parts = [str((addr >> (24 - 8 * i)) & 0xFF).encode() for i in range(octets)]
        return tuple(reversed(parts)) + _ARPA

    # --- string API ------------------------------------------------------------------

    def in_zone(self, qname: str) -> bool:
        return self.zone_rel(to_labels(qname)) is not None

    def in_reverse(self, qname: str) -> bool:
        return self.reverse(to_labels(qname)) is not None

    def lookup_a(self, qname: str) -> IPv4Address | None:
        rel = self.zone_rel(to_labels(qname))
        return None if rel is None else self._a.get(rel)

    def exists(self, qname: str) -> bool:
        """True for pod/service names, the gateway, the apex, empty non-terminals (and, in
        the reverse space, zone apexes, addresses with a PTR and the names above them)."""
        labels = to_labels(qname)
        rel = self.zone_rel(labels)
        if rel is not None:
            return self.exists_rel(rel)
        rev = self.reverse(labels)
        return rev is not None and rev[2] is not None

    def lookup_ptr(self, qname: str) -> str | None:
        rev = self.reverse(to_labels(qname))
        if rev is None or rev[2] is None or rev[2] < 0:
            return None
        name = self.ptr_ip(rev[2])
        return None if name is None else to_text(name)
