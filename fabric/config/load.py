"""The YAML config file: read, reject duplicate keys, validate; the embedded default.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import yaml

from fabric.config.parse import (
    check_config_data,
    parse_config,
    parse_namespace,
)
from fabric.config.specs import (
    DEFAULT_CONFIG_SOURCE,
    Config,
    WorkerSpec,
)
from fabric.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _value in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable key: the mapping constructor reports it
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str) -> Config:
    """Read and validate a YAML config file; every failure is one ConfigError line."""
    return parse_config(_read(path), path, base_dir=os.path.dirname(os.path.abspath(path)))


def check_config(path: str) -> tuple[Config | None, list[ConfigError]]:
    """Every problem of a YAML config file (`fabricd check`), nothing run or opened but
    the file and the key files it names; with none, the Config the daemon would run."""
    try:
        data = _read(path)
    except ConfigError as e:
        return None, [e]
    return check_config_data(data, path, base_dir=os.path.dirname(os.path.abspath(path)))


def _read(path: str) -> Any:
    """The file's YAML document (not None), or the one ConfigError that stops reading."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"cannot read: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(path, "", f"{where}invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(path, "", f"invalid YAML: {e}") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise ConfigError(path, "", f"invalid value: {e}") from None
    except RecursionError:
        raise ConfigError(path, "", "invalid YAML: nested too deeply") from None
    if data is None:
        raise ConfigError(path, "", "file is empty (expected a mapping with worker and namespaces)")
    return data


def default_config(worker_id: str | None = None) -> Config:
    """The embedded default: one namespace ``default`` (id 1, 10.88.0.0/24), no pods."""
    worker = WorkerSpec(id=worker_id or socket.gethostname())
    ns = parse_namespace(
        {"name": "default", "id": 1, "cidr": "10.88.0.0/24"},
        DEFAULT_CONFIG_SOURCE,
        worker.id,
        "namespaces[0]",
    )
    return Config(worker=worker, namespaces=(ns,), source=DEFAULT_CONFIG_SOURCE)

