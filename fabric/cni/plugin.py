"""`fabricd-cni`, the process a container runtime runs: reads the CNI environment and
the network config, asks the daemon (its control socket) to attach or detach the pod,
runs a delegated ipam plugin when the config has one, and prints the result or the
error JSON. Standard library and the blocking control client only, so it starts fast.

ADD attaches the container's netns as a `netns:` pod (the fabric's TAP, with offloads)
named for the container, with an address the fabric picks (or the ipam plugin's).
DEL is idempotent: a pod, a netns or a daemon already gone is success. CHECK asks the
daemon whether the pod is attached in this netns with the result's address.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from ipaddress import IPv4Network
from typing import Any, BinaryIO, TextIO
from urllib.parse import quote

from fabric.cni.spec import (
    DAEMON_REFUSED,
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_CONFIG,
    IO_FAILURE,
    IPAM_FAILED,
    SUPPORTED_VERSIONS,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    Call,
    CniError,
    NetConf,
    add_result,
    check_pod,
    ipam_address,
    parse_call,
    parse_config,
    pod_name,
    version_result,
)
from fabric.control.client import ControlClient
from fabric.errors import FabricError, NotFound


def main() -> None:
    """The console script: exit 0 with the result (or nothing) on stdout, 1 with the
    CNI error JSON."""
    code, out = run(os.environ, sys.stdin.buffer, sys.stderr)
    if out:
        sys.stdout.write(out + "\n")
    sys.exit(code)


def run(env: Mapping[str, str], stdin: BinaryIO, log: TextIO) -> tuple[int, str]:
    """One invocation: (exit status, what to print)."""
    version = "1.0.0"
    try:
        call = parse_call(env)
        raw = b"" if call.command == "VERSION" and stdin.isatty() else stdin.read()
        if call.command == "VERSION":
            return 0, json.dumps(version_result(_requested_version(raw)))
        conf = parse_config(raw)
        version = conf.version
        with ControlClient(conf.control, timeout=conf.timeout) as client:
            if call.command == "ADD":
                return 0, json.dumps(add(call, conf, client))
            if call.command == "DEL":
                delete(call, conf, client, log)
                return 0, ""
            check(call, conf, client)
            return 0, ""
    except CniError as e:
        return 1, json.dumps(e.to_json(version))
    except OSError as e:
        return 1, json.dumps(CniError(IO_FAILURE, f"I/O error: {e}").to_json(version))
    except Exception as e:  # a bug, or a daemon answer of an unexpected shape
        err = CniError(INTERNAL, f"fabricd-cni internal error: {type(e).__name__}: {e}")
        return 1, json.dumps(err.to_json(version))


def _requested_version(raw: bytes) -> str:
    try:
        asked = json.loads(raw).get("cniVersion") if raw.strip() else None
    except (ValueError, AttributeError):
        asked = None
    return asked if asked in SUPPORTED_VERSIONS else "1.0.0"


def _pod_path(conf: NetConf, name: str) -> str:
    return f"/v1/namespaces/{quote(conf.namespace, safe='')}/pods/{quote(name, safe='')}"


def _daemon_error(e: FabricError, conf: NetConf) -> CniError:
    """The daemon's refusal as a CNI error a person can act on."""
    code = getattr(e, "code", "")
    if code == "unreachable":
        return CniError(TRY_AGAIN_LATER, f"{e.message}; or set \"control\" in network config "
                        f"{conf.name} to fabricd's socket")
    if isinstance(e, NotFound) and e.message.startswith("namespace "):
        return CniError(INVALID_CONFIG, f"fabric namespace {conf.namespace} does not exist on "
                        f"fabricd at {conf.control}: add it to fabricd's config, or fix "
                        f"\"namespace\" in network config {conf.name}")
    if code == "port_failed":
        return CniError(IO_FAILURE, f"fabricd could not attach the pod: {e.message}")
    return CniError(DAEMON_REFUSED, f"fabricd refused: {e.message}")


def _get_pod(client: ControlClient, conf: NetConf, name: str) -> dict[str, Any] | None:
    try:
        pod = client.get(_pod_path(conf, name))
    except NotFound as e:
        if e.message.startswith("namespace "):
            raise
        return None
    return pod if isinstance(pod, dict) else None


def add(call: Call, conf: NetConf, client: ControlClient) -> dict[str, Any]:
    assert call.netns is not None
    if not os.path.exists(call.netns):
        raise CniError(UNKNOWN_CONTAINER, f"netns {call.netns} does not exist: the container "
                       "is gone, or its runtime has not made its network namespace yet")
    name = pod_name(call)
    body: dict[str, Any] = {"netns": call.netns, "ifname": call.ifname}
    ipam_done = False
    try:
        existing = _get_pod(client, conf, name)
        if existing is not None and existing.get("netns") != call.netns:
            raise CniError(DAEMON_REFUSED, f"pod {name} already exists in fabric namespace "
                           f"{conf.namespace} for another container (netns "
                           f"{existing.get('netns') or existing.get('kind')}): give the "
                           "containers distinct names")
        if conf.ipam_type is not None:
            ns = client.get(f"/v1/namespaces/{quote(conf.namespace, safe='')}")
            result = exec_plugin(conf.ipam_type, "ADD", call, conf)
            ipam_done = True
            body["ip"] = str(ipam_address(result, IPv4Network(ns["cidr"]), conf.ipam_type))
        pod = client.put(_pod_path(conf, name), body)
    except FabricError as e:
        _undo_ipam(ipam_done, call, conf)
        raise _daemon_error(e, conf) from None
    except CniError:
        _undo_ipam(ipam_done, call, conf)
        raise
    return add_result(conf.version, pod, call.netns)


def _undo_ipam(done: bool, call: Call, conf: NetConf) -> None:
    if done and conf.ipam_type is not None:
        try:
            exec_plugin(conf.ipam_type, "DEL", call, conf)
        except CniError:
            pass  # the ADD's own error is the one to report


def delete(call: Call, conf: NetConf, client: ControlClient, log: TextIO) -> None:
    name = pod_name(call)
    try:
        pod = _get_pod(client, conf, name)
        if pod is not None and call.netns and pod.get("netns") != call.netns:
            print(f"fabricd-cni: pod {name} belongs to another container now "
                  f"(netns {pod.get('netns')}); left alone", file=log)
        else:
            # Also when the daemon does not know the pod (it restarted): this frees the
            # address it gave it.
            client.delete(_pod_path(conf, name))
    except NotFound:
        pass  # the pod or the whole namespace is gone: nothing to undo
    except FabricError as e:
        if getattr(e, "code", "") != "unreachable":
            raise _daemon_error(e, conf) from None
        print(f"fabricd-cni: {e.message}; nothing to detach", file=log)
    if conf.ipam_type is not None:
        exec_plugin(conf.ipam_type, "DEL", call, conf)


def check(call: Call, conf: NetConf, client: ControlClient) -> None:
    if conf.version in ("0.3.0", "0.3.1"):
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, the "
                       f"network config says {conf.version}")
    if conf.prev_result is None:
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult (the ADD's result) in the "
                       "network config")
    assert call.netns is not None
    if not os.path.exists(call.netns):
        raise CniError(UNKNOWN_CONTAINER, f"netns {call.netns} does not exist: the container "
                       "is gone")
    name = pod_name(call)
    try:
        pod = _get_pod(client, conf, name)
    except FabricError as e:
        raise _daemon_error(e, conf) from None
    if pod is None:
        raise CniError(UNKNOWN_CONTAINER, f"pod {name} is not in fabric namespace "
                       f"{conf.namespace} (did fabricd restart?): recreate the container")
    check_pod(pod, call, conf.prev_result)
    if conf.ipam_type is not None:
        exec_plugin(conf.ipam_type, "CHECK", call, conf)


def exec_plugin(plugin: str, command: str, call: Call, conf: NetConf) -> dict[str, Any] | None:
    """Run a delegated plugin from CNI_PATH as the spec says: the same environment but
    CNI_COMMAND, the same config on stdin. Its error JSON is passed on, prefixed."""
    import subprocess  # only with a delegated ipam: not paid by every run

    exe = next((os.path.join(d, plugin) for d in call.path
                if os.access(os.path.join(d, plugin), os.X_OK)), None)
    if exe is None:
        raise CniError(INVALID_CONFIG, f"ipam plugin {plugin} not found in CNI_PATH "
                       f"({':'.join(call.path) or 'empty'}): install it or fix ipam.type")
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=call.container_id,
               CNI_IFNAME=call.ifname, CNI_PATH=":".join(call.path))
    if call.netns:
        env["CNI_NETNS"] = call.netns
    try:
        done = subprocess.run([exe], input=conf.raw, env=env, capture_output=True,
                              timeout=conf.timeout, check=False)
    except subprocess.TimeoutExpired:
        raise CniError(IPAM_FAILED, f"ipam plugin {plugin} did not finish {command} "
                       f"within {conf.timeout:g}s") from None
    try:
        answer = json.loads(done.stdout) if done.stdout.strip() else None
    except ValueError:
        answer = None
        if done.returncode == 0 and command == "ADD":
            raise CniError(DECODE_FAILURE, f"ipam plugin {plugin} printed no JSON") from None
    if done.returncode != 0:
        msg = answer.get("msg") if isinstance(answer, dict) else None
        code = answer.get("code") if isinstance(answer, dict) else None
        stderr = done.stderr.decode("utf-8", "replace").strip()
        raise CniError(code if isinstance(code, int) else IPAM_FAILED,
                       f"ipam plugin {plugin} {command} failed: "
                       f"{msg or stderr or f'exit status {done.returncode}'}",
                       str(answer.get("details", "")) if isinstance(answer, dict) else stderr)
    return answer if isinstance(answer, dict) else None


if __name__ == "__main__":
    main()
