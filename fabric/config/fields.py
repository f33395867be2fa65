"""Primitive readers: each takes (value, source, key) and returns a checked value or
raises a ``ConfigError`` naming the source, the key path and the problem.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from fabric.config.specs import (
    FrozenMap,
)
from fabric.errors import ConfigError

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")
MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}\Z")
ACTIVATOR_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\Z")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*\Z")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*\Z")
MAX_DURATION = 366 * 86400.0  # a year: longer is a typo, and timers must stay finite
MAX_SIZE = 1 << 40  # 1 TiB: larger is a typo (and float rounding starts to show)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
}


# ---------------------------------------------------------------------------
# Low-level readers: each takes (value, source, key) and raises ConfigError
# ---------------------------------------------------------------------------


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+\Z")


def key_path(prefix: str, name: str) -> str:
    """Join a key path: ``namespaces[0]`` + ``pods`` -> ``namespaces[0].pods``."""
    return f"{prefix}.{name}" if prefix else name


def data_key_path(prefix: str, name: str) -> str:
    """`key_path` for a key that came with the data: one that is not a plain word (a
    newline, a dot, nothing) is quoted, ``pods[0]['a\\nb']``, so it cannot break the
    error's line or pass for a path."""
    if not _PLAIN_KEY.match(name):
        return f"{prefix}[{name!r}]"
    return key_path(prefix, name)


def index_path(prefix: str, i: int) -> str:
    """Index a key path: ``pods`` + 1 -> ``pods[1]``."""
    return f"{prefix}[{i}]"


def show_int(value: int) -> str:
    """An int as text, or its size when printing it would be absurd (or raise)."""
    if abs(value) < 10**30:
        return str(value)
    return f"of about {int(value.bit_length() * 0.30103)} digits"


def describe(value: Any) -> str:
    """Say what a wrong value was, so the error shows what the user actually wrote."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {show_int(value)}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"string {text!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def type_error(value: Any, src: str, key: str, expected: str) -> ConfigError:
    return ConfigError(src, key, f"expected {expected}, got {describe(value)}")


class Obj:
    """A mapping being read; rejects unknown keys up front so typos never pass silently.

    An explicit null counts as absent, so ``pods:`` with nothing under it is no pods.
    """

    def __init__(self, data: Any, src: str, path: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(data, Mapping):
            raise type_error(data, src, path, "a mapping")
        for k in data:
            if not isinstance(k, str):
                raise ConfigError(src, path, f"keys must be strings, got {describe(k)}")
            if k not in allowed:
                raise ConfigError(
                    src,
                    data_key_path(path, k),
                    f"unknown key {k!r} (expected one of: {', '.join(allowed)})",
                )
        self.data = data
        self.src = src
        self.path = path

    def key(self, name: str) -> str:
        return key_path(self.path, name)

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def get(self, name: str) -> Any:
        return self.data.get(name)

    def required(self, name: str) -> Any:
        value = self.data.get(name)
        if value is None:
            raise ConfigError(self.src, self.key(name), "required key is missing")
        return value


def read_str(value: Any, src: str, key: str) -> str:
    if not isinstance(value, str):
        raise type_error(value, src, key, "a string")
    if not value.strip():
        raise ConfigError(src, key, "must not be empty")
    return value


def read_int(value: Any, src: str, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(value, src, key, "an integer")
    if not lo <= value <= hi:
        raise ConfigError(src, key, f"{show_int(value)} is out of range ({lo}..{hi})")
    return value


def read_bool(value: Any, src: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise type_error(value, src, key, "a boolean (true or false)")
    return value


def read_list(value: Any, src: str, key: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise type_error(value, src, key, "a list")
    return list(value)


def read_dns_label(value: Any, src: str, key: str) -> str:
    text = read_str(value, src, key)
    if not DNS_LABEL.match(text):
        raise ConfigError(
            src,
            key,
            f"{text!r} is not a valid name (DNS label: lowercase letters, digits and '-', "
            "at most 63 characters, starting and ending with a letter or digit)",
        )
    return text


def read_worker_id(value: Any, src: str, key: str) -> str:
    text = read_str(value, src, key)
    if not WORKER_ID.match(text):
        raise ConfigError(
            src,
            key,
            f"{text!r} is not a valid worker id (letters, digits, '.', '_', '-'; "
            "at most 63 characters, starting with a letter or digit)",
        )
    return text


def read_ifname(value: Any, src: str, key: str) -> str:
    text = read_str(value, src, key)
    if not IFNAME_RE.match(text) or text in (".", ".."):
        raise ConfigError(
            src,
            key,
            f"{text!r} is not a valid interface name (1-15 characters: letters, digits, "
            "'-', '_', '.')",
        )
    return text


def read_ipv4(value: Any, src: str, key: str) -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    text = read_str(value, src, key)
    try:
        return IPv4Address(text.strip())
    except ValueError:
        raise ConfigError(src, key, f"{text!r} is not an IPv4 address") from None


def read_network(value: Any, src: str, key: str, lo: int = 0, hi: int = 32) -> IPv4Network:
    """An IPv4 network in CIDR form; host bits set is an error that shows the real network."""
    if isinstance(value, IPv4Network):
        net = value
    else:
        text = read_str(value, src, key).strip()
        if "/" not in text:
            raise ConfigError(src, key, f"{text!r} is not a network (expected e.g. 10.10.0.0/24)")
        try:
            net = IPv4Network(text, strict=False)
        except ValueError:
            raise ConfigError(
                src, key, f"{text!r} is not an IPv4 network (expected e.g. 10.10.0.0/24)"
            ) from None
        if net.network_address != IPv4Address(text.split("/", 1)[0]):
            raise ConfigError(src, key, f"{text} has host bits set (the network would be {net})")
    if not lo <= net.prefixlen <= hi:
        raise ConfigError(
            src, key, f"prefix /{net.prefixlen} of {net} is out of range (/{lo}../{hi})"
        )
    return net


def read_mac(value: Any, src: str, key: str) -> str:
    """A unicast MAC, normalised to lowercase colon form."""
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads some unquoted MACs (e.g. 12:34:56:00:00:01) as base-60 integers.
        raise ConfigError(
            src,
            key,
            f"expected a MAC address string, got {describe(value)} (quote MAC addresses in YAML)",
        )
    text = read_str(value, src, key).strip()
    if not MAC_RE.match(text):
        raise ConfigError(src, key, f"{text!r} is not a MAC address (expected 02:00:00:00:00:01)")
    mac = text.lower().replace("-", ":")
    if mac == "00:00:00:00:00:00":
        raise ConfigError(src, key, f"{mac} is the all-zero MAC")
    if int(mac[:2], 16) & 1:
        raise ConfigError(src, key, f"{mac} is a multicast MAC (the first octet must be even)")
    return mac


def parse_duration(value: Any, src: str, key: str) -> float:
    """Seconds as a number, or a string like ``250ms``, ``30s``, ``5m``, ``1h``, ``1.5s``."""
    hint = "use seconds or a string like 250ms, 30s, 5m, 1h"
    if isinstance(value, bool):
        raise type_error(value, src, key, f"a duration ({hint})")
    if isinstance(value, int) and abs(value) > MAX_DURATION:
        raise ConfigError(src, key, f"{describe(value)} is longer than a year")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ConfigError(src, key, f"{value!r} is not a duration ({hint})")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise type_error(value, src, key, f"a duration ({hint})")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ConfigError(src, key, f"{value} is not a finite duration")
    if seconds < 0:
        raise ConfigError(src, key, f"{value} is negative (durations must be >= 0)")
    if seconds > MAX_DURATION:
        raise ConfigError(src, key, f"{describe(value)} is longer than a year")
    return seconds


def parse_size(value: Any, src: str, key: str) -> int:
    """Bytes as an int, or a string like ``8MiB``, ``512KiB``, ``1GB``, ``100k``.

    ``*iB`` (and ``Ki``/``Mi``/``Gi``) are binary; ``k``/``M``/``G``/``KB``/``MB``/``GB``
    are decimal. Units are case-insensitive.
    """
    hint = "use bytes or a string like 512KiB, 8MiB, 1GB, 100k"
    if isinstance(value, bool):
        raise type_error(value, src, key, f"a size ({hint})")
    if isinstance(value, int):
        size = value
        if size < 0:
            raise ConfigError(src, key, f"{show_int(value)} is negative (sizes must be >= 0)")
    elif isinstance(value, str):
        m = _SIZE.match(value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise ConfigError(src, key, f"{value!r} is not a size ({hint})")
        number = float(m.group(1)) * _SIZE_UNITS[unit]
        size = int(number) if math.isfinite(number) and number <= MAX_SIZE else MAX_SIZE + 1
    else:
        raise type_error(value, src, key, f"a size ({hint})")
    if size > MAX_SIZE:
        raise ConfigError(src, key, f"{describe(value)} is more than 1TiB")
    return size


def read_host_port(
    value: Any, src: str, key: str, *, default_port: int | None, hostname_ok: bool
) -> tuple[str, int]:
    """``HOST:PORT`` (or bare ``HOST`` when a default port exists) as (host, port)."""
    text = read_str(value, src, key).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ConfigError(src, key, f"{text!r} has no port (expected HOST:PORT)")
        port = default_port
    else:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(src, key, f"{text!r} has an invalid port (expected 1..65535)")
        port = int(port_text)
    try:
        host = str(IPv4Address(host))
    except ValueError:
        labels = host.rstrip(".").split(".")
        if (
            not hostname_ok
            or not host
            or not all(
                re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z", lb) for lb in labels
            )
        ):
            what = "an IPv4 address or host name" if hostname_ok else "an IPv4 address"
            raise ConfigError(src, key, f"{host!r} in {text!r} is not {what}") from None
    return host, port


def read_key32(value: Any, src: str, key: str) -> bytes:
    """A base64-encoded 32-byte key (X25519 keys and PSKs)."""
    text = read_str(value, src, key).strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(src, key, "is not valid base64 (expected a base64 32-byte key)") from None
    if len(raw) != 32:
        raise ConfigError(src, key, f"decodes to {len(raw)} bytes (expected a base64 32-byte key)")
    return raw


def read_json(value: Any, src: str, key: str) -> Any:
    """Activator config must be plain JSON-like data so it can be frozen and sent anywhere."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(src, key, f"keys must be strings, got {describe(k)}")
            out[k] = read_json(v, src, data_key_path(key, k))
        return FrozenMap(out)
    if isinstance(value, (list, tuple)):
        return tuple(read_json(v, src, index_path(key, i)) for i, v in enumerate(value))
    raise ConfigError(
        src,
        key,
        f"expected plain data (string, number, boolean, list, mapping), got {describe(value)}",
    )


