"""The CNI side of `fabricd-cni`, without I/O: the runtime's environment and network
config read and checked, the pod's name, the result and the error JSON.

CNI 1.0.0 (and 0.3.0 … 0.4.0, whose results differ only in `ips[].version`). The
network config names the fabric namespace and the daemon's control socket:

    {"cniVersion": "1.0.0", "name": "shop", "type": "fabricd-cni",
     "namespace": "shop", "control": "/run/fabricd/control.sock",
     "ipam": {"type": "host-local", ...}}          # optional: else the fabric picks

Everything a runtime or a person gets back on failure is a `CniError`: the spec's
code, one line saying what to do, and details.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, NamedTuple

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_CONTROL = "/run/fabricd/control.sock"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")

# The spec's well-known error codes (1-99 reserved), then this plugin's own (100+).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
DAEMON_REFUSED = 100  # fabricd said no; msg is its one line
CHECK_FAILED = 101  # CHECK found the pod not as the result said
IPAM_FAILED = 102  # the delegated ipam plugin failed or answered nonsense
INTERNAL = 199  # a bug in fabricd-cni: still JSON, never a traceback

_LABEL_BAD = re.compile(r"[^a-z0-9-]+")
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")


class CniError(Exception):
    """A failure to report as the spec's error JSON on stdout (exit status 1)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


class Call(NamedTuple):  # not a dataclass: importing dataclasses costs a plugin run ~10 ms
    """The runtime's request: the CNI_* environment."""

    command: str
    container_id: str
    netns: str | None
    ifname: str
    args: dict[str, str]
    path: tuple[str, ...]


class NetConf(NamedTuple):
    """The network config from stdin (`raw` is passed on to a delegated ipam plugin)."""

    version: str
    name: str
    namespace: str
    control: str
    ipam_type: str | None
    timeout: float
    prev_result: dict[str, Any] | None
    raw: bytes


def parse_call(env: Mapping[str, str]) -> Call:
    """The CNI_* variables; VERSION needs only CNI_COMMAND, the rest need their own."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"CNI_COMMAND is {command!r}: expected one of "
                       f"{', '.join(COMMANDS)} (fabricd-cni is run by a container runtime)")
    cid = env.get("CNI_CONTAINERID", "")
    ifname = env.get("CNI_IFNAME", "")
    netns = env.get("CNI_NETNS") or None
    if command != "VERSION":
        missing = [k for k, v in (("CNI_CONTAINERID", cid), ("CNI_IFNAME", ifname)) if not v]
        if command in ("ADD", "CHECK") and netns is None:
            missing.append("CNI_NETNS")
        if missing:
            raise CniError(INVALID_ENV, f"{', '.join(missing)} not set: {command} needs "
                           f"{'them' if len(missing) > 1 else 'it'}")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\Z", cid):
            raise CniError(INVALID_ENV, f"CNI_CONTAINERID {cid!r} is not a container id "
                           "(letters, digits, '_', '.', '-')")
        if len(ifname) > 15 or "/" in ifname or not ifname.isprintable() or " " in ifname:
            raise CniError(INVALID_ENV, f"CNI_IFNAME {ifname!r} is not an interface name "
                           "(at most 15 characters, no '/' or spaces)")
        if netns is not None and not netns.startswith("/"):
            raise CniError(INVALID_ENV, f"CNI_NETNS {netns!r} is not an absolute path")
    return Call(command, cid, netns, ifname, parse_args(env.get("CNI_ARGS", "")),
                tuple(p for p in env.get("CNI_PATH", "").split(":") if p))


def parse_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `K=V;K=V`."""
    out: dict[str, str] = {}
    for item in text.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"CNI_ARGS item {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def parse_config(raw: bytes) -> NetConf:
    """The network config: JSON with cniVersion, name, namespace (and control, ipam)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(DECODE_FAILURE, f"the network config on stdin is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise CniError(DECODE_FAILURE, "the network config on stdin is not a JSON object")
    version = data.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "the network config has no cniVersion (e.g. \"1.0.0\")")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported: "
                       f"fabricd-cni speaks {', '.join(SUPPORTED_VERSIONS)}")

    def text(key: str, default: str | None = None) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or not value:
            what = " (the fabric namespace to attach to)" if key == "namespace" else ""
            raise CniError(INVALID_CONFIG,
                           f"network config: {key!r} must be a non-empty string{what}")
        return value

    name = text("name")
    namespace = text("namespace")
    control = text("control", DEFAULT_CONTROL)
    if not control.startswith("/"):
        raise CniError(INVALID_CONFIG, f"network config: control {control!r} must be the "
                       "absolute path of fabricd's control socket")
    timeout = data.get("timeout", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
        raise CniError(INVALID_CONFIG, f"network config: timeout {timeout!r} must be seconds "
                       "(0 < timeout <= 600)")
    ipam = data.get("ipam")
    ipam_type = None
    if ipam is not None and ipam != {}:
        if not isinstance(ipam, dict) or not isinstance(ipam.get("type"), str) or not ipam["type"]:
            raise CniError(INVALID_CONFIG, "network config: ipam must be an object with a "
                           "type (a plugin in CNI_PATH), or left out for the fabric to choose")
        ipam_type = ipam["type"]
        if "/" in ipam_type:
            raise CniError(INVALID_CONFIG, f"network config: ipam type {ipam_type!r} must be "
                           "a plugin name, not a path")
    prev = data.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(DECODE_FAILURE, "network config: prevResult is not a JSON object")
    return NetConf(version, name, namespace, control, ipam_type, float(timeout), prev, raw)


def _label(text: str) -> str:
    """`text` as a DNS label: lower case, runs of anything else as '-', at most 63
    characters (a longer one keeps a hash of the whole so two never meet)."""
    label = _LABEL_BAD.sub("-", text.lower()).strip("-")
    if len(label) > 63:
        import hashlib  # rare: not paid by every run

        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        label = f"{label[:54].rstrip('-')}-{digest}"
    return label


def pod_name(call: Call) -> str:
    """The fabric pod for this container: K8S_POD_NAME from CNI_ARGS (podman passes the
    container's name there), else the container id (its 12-character short form for a
    64-hex id), as a DNS label so the pod resolves as <name>.<namespace>.<domain>."""
    k8s = call.args.get("K8S_POD_NAME", "")
    if k8s and _label(k8s):
        return _label(k8s)
    cid = call.container_id.lower()
    if _HEX64.match(cid):
        cid = cid[:12]
    name = _label(cid)
    if not name:
        raise CniError(INVALID_ENV, f"no pod name can be made of CNI_CONTAINERID "
                       f"{call.container_id!r}; give K8S_POD_NAME in CNI_ARGS")
    return name


def ipam_address(result: object, cidr: IPv4Network, ipam_type: str) -> IPv4Address:
    """The first IPv4 address of a delegated ipam plugin's result; it must lie in the
    namespace's CIDR, since the fabric routes only that."""
    try:
        ips = result["ips"]  # type: ignore[index]
        addrs = [IPv4Interface(entry["address"]) for entry in ips
                 if ":" not in str(entry["address"])]
    except (TypeError, KeyError, ValueError) as e:
        raise CniError(IPAM_FAILED, f"ipam plugin {ipam_type} answered without a usable "
                       f"IPv4 address: {e}") from None
    if not addrs:
        raise CniError(IPAM_FAILED, f"ipam plugin {ipam_type} gave no IPv4 address")
    ip = addrs[0].ip
    if ip not in cidr:
        raise CniError(INVALID_CONFIG, f"ipam plugin {ipam_type} gave {ip}, outside the fabric "
                       f"namespace's {cidr}: give the ipam a range inside {cidr}")
    return ip


def add_result(version: str, pod: Mapping[str, Any], netns: str) -> dict[str, Any]:
    """The ADD result: the interface in its sandbox, the address with the gateway, the
    default route, and DNS (the gateway as nameserver, the namespace's search domains)."""
    cidr = IPv4Network(pod["cidr"])
    gateway = str(pod["gateway"])
    ip_entry: dict[str, Any] = {"address": f"{pod['ip']}/{cidr.prefixlen}",
                                "gateway": gateway, "interface": 0}
    if version != "1.0.0":
        ip_entry = {"version": "4", **ip_entry}
    dns = pod.get("dns") or {}
    search = list(dns.get("search") or [])
    result: dict[str, Any] = {
        "cniVersion": version,
        "interfaces": [{"name": pod.get("ifname") or "eth0", "mac": pod.get("mac") or "",
                        "sandbox": netns}],
        "ips": [ip_entry],
        "routes": [{"dst": "0.0.0.0/0", "gw": gateway}],
        "dns": {"nameservers": list(dns.get("nameservers") or [gateway])},
    }
    if search:
        result["dns"]["domain"] = search[0]
        result["dns"]["search"] = search
    return result


def check_pod(pod: Mapping[str, Any], call: Call, prev: Mapping[str, Any] | None) -> None:
    """CHECK: the pod is attached in this netns, with the address the result gave."""
    where = f"pod {pod.get('name')} in namespace {pod.get('namespace')}"
    if pod.get("netns") != call.netns:
        raise CniError(CHECK_FAILED, f"{where} is in netns {pod.get('netns')}, not "
                       f"{call.netns}: another container took the name; recreate this one")
    if not pod.get("attached"):
        raise CniError(CHECK_FAILED, f"{where} is not attached ({pod.get('error') or 'no port'})"
                       ": fabricd retries every 2 s; if it persists, recreate the container")
    if prev is not None:
        try:
            want = {str(IPv4Interface(e["address"]).ip) for e in prev.get("ips", [])}
        except (TypeError, KeyError, ValueError, AttributeError):
            raise CniError(DECODE_FAILURE, "prevResult.ips is not a list of addresses") from None
        if want and pod.get("ip") not in want:
            raise CniError(CHECK_FAILED, f"{where} has {pod.get('ip')}, the result said "
                           f"{', '.join(sorted(want))}: recreate the container")


def version_result(version: str = "1.0.0") -> dict[str, Any]:
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
