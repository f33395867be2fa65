"""The `activator_config` keys each shipped activator reads, checked when a config is read.

A module reads its config with the SDK's `fab_cfg_*` helpers, which fall back to the
default on any value they cannot read: `wake_on_data: true`, `hold_timeout_ms: "2s"` or
`reopen_upstream: "yes"` would be taken silently as if never written. So a known key with
a value of the wrong kind is a config error naming the key; a key a shipped module does not
read is only a warning (`fabricd check`, and a log line when the service loads), since a
config written for a newer release, or for a module of one's own under a shipped name's
path, is no error. Modules of one's own (a `.wasm` path) are not checked: only their
author knows their keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fabric.config.fields import data_key_path, describe
from fabric.config.specs import FrozenMap
from fabric.errors import ConfigError

U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Int:
    """An integer the module reads as a u32 (`fab_cfg_u32`), within [lo, hi]."""

    lo: int = 0
    hi: int = U32


@dataclass(frozen=True)
class Flag:
    """0 or 1 read as a u32; `true`/`false` are taken and passed on as 1/0, since the
    module's reader would not."""


@dataclass(frozen=True)
class Bool:
    """`fab_cfg_bool`: true/false (or 1/0)."""


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]


@dataclass(frozen=True)
class Health:
    """http1's `health`: a list of local answers (the module checks each field's size)."""

    fields: tuple[str, ...] = ("method", "path", "status", "body", "content_type")
    most: int = 8


Kind = Int | Flag | Bool | Choice | Health

# What the host adds to every module's config unless the port sets it (services manager,
# `_config`), and the instance's memory cap (the port's activator_memory_mib).
_HOST = {"port": Int(1, 65535), "target_port": Int(1, 65535), "hold_timeout_ms": Int(1),
         "hold_bytes": Int(), "memory_limit": Int(1)}

SHIPPED_KEYS: dict[str, dict[str, Kind]] = {
    "tcp": {**_HOST, "max_flows": Int(1)},
    "stream": {**_HOST, "wake_on_data": Flag()},
    "http1": {**_HOST, "health": Health(), "health_local_when_ready": Bool(),
              "retry_after_s": Int(), "head_timeout_ms": Int(1),
              "stream_hold_bytes": Int(1)},
    "http2": {**_HOST, "max_connections": Int(0, 1024), "max_busy_connections": Int(),
              "reopen_upstream": Bool()},
    "postgres": {**_HOST, "ssl": Choice(("passthrough", "off", "disable", "none")),
                 "startup_timeout_ms": Int(1),
                 "stream_hold_bytes": Int(1), "max_message_bytes": Int(1),
                 "local_keepalive": Flag(), "need_debounce": Flag()},
}


def check_shipped(name: str, config: FrozenMap, src: str, key: str) -> FrozenMap:
    """`config` for the shipped activator `name`, with flags given as booleans made 1/0;
    a ConfigError for a known key whose value the module could not read."""
    kinds = SHIPPED_KEYS.get(name)
    if kinds is None or not config:
        return config
    out: dict[str, Any] = {}
    for k, v in config.items():
        kind = kinds.get(k)
        if kind is not None:
            v = _check(kind, v, src, data_key_path(key, k))
        out[k] = v
    return FrozenMap(out)


def unknown_keys(name: str, config: Mapping[str, Any]) -> list[str]:
    """Keys of `config` the shipped activator `name` does not read (none for others)."""
    kinds = SHIPPED_KEYS.get(name)
    if kinds is None:
        return []
    return [k for k in config if k not in kinds]


def known(name: str) -> list[str]:
    """The keys `name` reads, sorted, for messages."""
    return sorted(SHIPPED_KEYS.get(name, {}))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(kind: Kind, v: Any, src: str, key: str) -> Any:
    if isinstance(kind, Int):
        if not _is_int(v) or not kind.lo <= v <= kind.hi:
            hi = "" if kind.hi == U32 else f" to {kind.hi}"
            want = f"an integer from {kind.lo}{hi}" if hi else f"an integer of at least {kind.lo}"
            raise ConfigError(src, key, f"expected {want}, got {describe(v)}")
        return v
    if isinstance(kind, Flag):
        if isinstance(v, bool):
            return int(v)
        if v not in (0, 1) or not _is_int(v):
            raise ConfigError(src, key, f"expected 0, 1, true or false, got {describe(v)}")
        return v
    if isinstance(kind, Bool):
        if isinstance(v, bool) or (_is_int(v) and v in (0, 1)):
            return v
        raise ConfigError(src, key, f"expected true or false, got {describe(v)}")
    if isinstance(kind, Choice):
        if not isinstance(v, str) or v not in kind.values:
            raise ConfigError(src, key, f"expected one of {', '.join(kind.values)}, "
                                        f"got {describe(v)}")
        return v
    if not isinstance(v, tuple) or len(v) > kind.most:
        raise ConfigError(src, key, f"expected a list of at most {kind.most} answers, "
                                    f"got {describe(v)}")
    for i, entry in enumerate(v):
        at = f"{key}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(src, at, f"expected a mapping, got {describe(entry)}")
        for f, fv in entry.items():
            if f not in kind.fields:
                raise ConfigError(src, data_key_path(at, f),
                                  f"unknown field (expected {', '.join(kind.fields)})")
            if f == "status":
                if not _is_int(fv) or not 200 <= fv <= 599:
                    raise ConfigError(src, data_key_path(at, f),
                                      f"expected an integer from 200 to 599, got {describe(fv)}")
            elif not isinstance(fv, str):
                raise ConfigError(src, data_key_path(at, f),
                                  f"expected a string, got {describe(fv)}")
    return v
