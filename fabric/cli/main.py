"""The `fabricd` command: runs the daemon, and talks to a running one over the control API.

Client commands only import the standard-library client, so they start fast and keep working
when the daemon's heavier dependencies are missing. Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import IO, Any, NoReturn
from urllib.parse import quote, urlencode

from fabric.cli import views
from fabric.cli.views import format_table
from fabric.control.client import ControlClient, resolve_control_path
from fabric.errors import Conflict, FabricError, NotFound

PROG = "fabricd"


class UsageError(Exception):
    """Bad arguments that argparse cannot catch by itself; exit code 2."""


class _Parser(argparse.ArgumentParser):
    """One-line usage errors, and no sys.exit inside main() so tests can call it."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---- output helpers ----------------------------------------------------------------------


def _generic_columns(rows: list[dict[str, Any]], skip: set[str]) -> list[tuple[str, str]]:
    """Services and peers have no fixed schema yet: show every key, identity first."""
    keys: list[str] = []
    for key in ("namespace", "name"):
        if any(key in r for r in rows) and key not in skip:
            keys.append(key)
    for r in rows:
        for key in r:
            if key not in keys and key not in skip:
                keys.append(key)
    return [(k.upper().replace("_", "-"), k) for k in keys]


NAMESPACE_COLUMNS = [
    ("NAME", "name"),
    ("ID", "id"),
    ("CIDR", "cidr"),
    ("GATEWAY", "gateway"),
    ("MTU", "mtu"),
    ("PODS", "pods"),
    ("ATTACHED", "attached"),
    ("EGRESS", "egress"),
    ("FLOWS", "egress_flows"),
    ("HELD", "held"),
    ("DROPS", "drops"),
]
SERVICE_COLUMNS = [
    ("NAMESPACE", "namespace"),
    ("NAME", "name"),
    ("IP", "ip"),
    ("PORTS", "ports_text"),
    ("STATE", "state"),
    ("NEED", "need"),
    ("HELD", "held_text"),
    ("FLOWS", "flows"),
    ("BACKENDS", "backends_text"),
    ("WAKES", "wakes"),
    ("STREAMS", "streams_text"),
    ("STREAM-WAKE(ms)", "stream_wake_text"),
]


def _service_row(r: dict[str, Any]) -> dict[str, Any]:
    """Flatten a service for the table: ports, held packets/bytes, backends' readiness."""
    row = dict(r)
    row["ports_text"] = ",".join(f"{p['port']}->{p['target_port']}/{p['protocol']}"
                                 for p in r.get("ports", []))
    row["held_text"] = f"{r.get('held_packets', 0)}/{r.get('held_bytes', 0)}B"
    row["backends_text"] = ",".join(
        f"{b['name']}({'ready' if b.get('ready') else 'not-ready'})"
        for b in r.get("backends", []))
    row["wakes"] = r.get("counters", {}).get("activations", 0)
    ports = list((r.get("streams") or {}).values())
    row["streams_text"] = str(sum(p.get("streams", 0) for p in ports)) if ports else "-"
    # The mean of each phase of a stream port's wakes: held -> need raised -> upstream
    # accepted -> first byte relayed (docs/config.md, "Stream ports").
    phases = [p.get("phases", {}) for p in ports if p.get("wake", {}).get("count")]
    row["stream_wake_text"] = "/".join(
        f"{phases[0][k]['mean_ms']:.1f}" for k in ("activate", "connect", "first_byte")
        if k in phases[0]) if phases else "-"
    return row


POD_COLUMNS = [
    ("NAMESPACE", "namespace"),
    ("NAME", "name"),
    ("IP", "ip"),
    ("MAC", "mac"),
    ("KIND", "kind"),
    ("ATTACHED", "attached"),
    ("READY", "ready"),
    ("RX-PKTS", "rx_packets"),
    ("RX-BYTES", "rx_bytes"),
    ("TX-PKTS", "tx_packets"),
    ("TX-BYTES", "tx_bytes"),
    ("DROPS", "drops"),
]

KIND_ALIASES = {
    "namespaces": "namespaces",
    "namespace": "namespaces",
    "ns": "namespaces",
    "pods": "pods",
    "pod": "pods",
    "po": "pods",
    "services": "services",
    "service": "services",
    "svc": "services",
    "peers": "peers",
    "peer": "peers",
    "drops": "drops",
    "drop": "drops",
}

OUTPUTS = ("table", "json", "yaml")

PEER_COLUMNS = [
    ("PEER", "id"),
    ("ENDPOINT", "endpoint"),
    ("PUBLIC-KEY", "public_key"),
    ("HANDSHAKE", "handshake"),
    ("RX", "rx"),
    ("TX", "tx"),
    ("KEEPALIVE", "keepalive"),
    ("DROPS", "drops_total"),
]


def _peer_row(p: dict[str, Any]) -> dict[str, Any]:
    row = dict(p)
    row["handshake"] = views.human_age(p.get("last_handshake_age"))
    row["rx"] = views.human_bytes(p.get("rx_bytes"))
    row["tx"] = views.human_bytes(p.get("tx_bytes"))
    return row


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def format_event(event: dict[str, Any]) -> str:
    """Time, kind, where, then the remaining fields as key=value (JSON for nested values)."""
    ts = event.get("ts")
    try:
        when = datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    except (TypeError, ValueError, OverflowError, OSError):
        when = "-"
    ns, pod = event.get("namespace"), event.get("pod")
    where = f"{ns}/{pod}" if ns and pod else (ns or pod or "-")
    parts = [when, f"{event.get('kind', '?'):<18}", str(where)]
    for key, value in event.items():
        if key in ("ts", "kind", "namespace", "pod"):
            continue
        if isinstance(value, str) and value and " " not in value and '"' not in value:
            text = value
        else:
            text = json.dumps(value, separators=(",", ":"))
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _split_pod(ref: str) -> tuple[str, str]:
    ns, sep, pod = ref.partition("/")
    if not sep or not ns or not pod or "/" in pod:
        raise UsageError(f"expected NS/POD, got {ref!r}")
    return ns, pod


def _pod_path(ns: str, pod: str) -> str:
    return f"/v1/namespaces/{quote(ns, safe='')}/pods/{quote(pod, safe='')}"


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(resolve_control_path(getattr(args, "control", None)))


# ---- commands ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    if args.log_format not in ("text", "json"):  # from $FABRICD_LOG_FORMAT
        raise UsageError(f"log format {args.log_format!r} is not text or json")
    from fabric.control import daemon  # heavy: only the daemon needs it

    return int(daemon.run(args.config, args.log_format) or 0)


def cmd_check(args: argparse.Namespace) -> int:
    from fabric.control.check import check

    return check(args.config)


def version() -> str:
    """The installed package's version; from a source tree, pyproject.toml's."""
    from importlib import metadata

    try:
        return metadata.version(PROG)
    except metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        try:
            with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
                return str(tomllib.load(f)["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class _Version(argparse.Action):
    """`--version`, looked up only when asked (metadata reads cost every other command)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        _out(f"{PROG} {version()}")
        parser.exit(0)


def cmd_demo(args: argparse.Namespace) -> int:
    from fabric.tools import demo

    return int(demo.main() or 0)


def cmd_get(args: argparse.Namespace) -> int:
    kind = KIND_ALIASES[args.kind]
    ns: str | None = args.namespace
    if args.output == "wg" and kind != "peers":
        raise UsageError("-o wg is for peers")
    structured = args.output in ("json", "yaml")
    with _client(args) as client:
        data: Any
        columns: list[tuple[str, str]]
        if kind == "namespaces":
            if ns and structured:
                data = client.get(f"/v1/namespaces/{quote(ns, safe='')}")
            else:
                data = client.get("/v1/namespaces")
                if ns:
                    data = [d for d in data if d.get("name") == ns]
                    if not data:
                        raise NotFound(f"namespace {ns!r} not found")
            columns = NAMESPACE_COLUMNS
        elif kind == "pods":
            data = client.get(f"/v1/namespaces/{quote(ns, safe='')}/pods" if ns else "/v1/pods")
            columns = POD_COLUMNS
        elif kind == "services":
            data = client.get("/v1/services" + (f"?{urlencode({'namespace': ns})}" if ns else ""))
            columns = SERVICE_COLUMNS
            if not structured:
                data = [_service_row(r) for r in data]
        elif kind == "drops":
            data = client.get("/v1/drops" + (f"?{urlencode({'namespace': ns})}" if ns else ""))
            columns = views.DROP_COLUMNS
            if not structured:
                data = views.drop_rows(data)
        else:
            data = client.get("/v1/peers")
            columns = PEER_COLUMNS
            if args.output == "wg":
                if data:
                    _out(views.peers_text(data))
                else:
                    print("No peers configured.", file=sys.stderr)
                return 0
            if not structured:
                data = [_peer_row(r) for r in data]
    if structured:
        _out(views.render(data, args.output))
    elif not data:
        where = f" in namespace {ns}" if ns and kind != "peers" else ""
        print(f"No {kind} found{where}.", file=sys.stderr)
    else:
        _out(format_table(data, columns))
    return 0


def cmd_ready(args: argparse.Namespace) -> int:
    ns, pod = _split_pod(args.pod)
    ready = not args.unready
    with _client(args) as client:
        client.put(_pod_path(ns, pod) + "/ready", {"ready": ready})
    _out(f"pod {ns}/{pod} marked {'ready' if ready else 'unready'}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    client = _client(args)
    events = client.events()
    try:
        for event in events:
            _out(json.dumps(event) if args.output == "json" else format_event(event))
    except KeyboardInterrupt:
        pass  # the normal way to stop following events
    finally:
        events.close()
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from fabric.net.pcap import StreamSplitter

    ns, pod = _split_pod(args.pod)
    to_stdout = args.write in (None, "-")
    if to_stdout and sys.stdout.isatty():
        raise UsageError("refusing to write pcap to a terminal; use -w FILE or a pipe")
    client = _client(args)
    path = _pod_path(ns, pod) + "/capture" + (f"?count={args.count}" if args.count else "")
    chunks = client.stream(path)
    out: IO[bytes]
    try:
        # O_NOFOLLOW: a symlink planted in /tmp must not make root overwrite its target
        out = sys.stdout.buffer if to_stdout else os.fdopen(os.open(
            args.write, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600), "wb")
    except OSError as e:
        chunks.close()
        raise FabricError(f"cannot write {args.write}: {e.strerror or e}") from None
    splitter = StreamSplitter()
    try:
        for chunk in chunks:
            whole = splitter.feed(chunk)
            if whole:
                out.write(whole)
                out.flush()
    except KeyboardInterrupt:
        pass  # only whole records were written, so the file is valid as it stands
    finally:
        chunks.close()
        if not to_stdout:
            out.close()
    if not to_stdout:
        print(f"{splitter.frames} frames written to {args.write}", file=sys.stderr)
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    if args.pod and not args.namespace:
        raise UsageError("--pod needs -n NS (pod names are per namespace)")
    query = {k: v for k, v in (("namespace", args.namespace), ("pod", args.pod),
                               ("reason", args.reason)) if v}
    client = _client(args)
    lines = client.lines("/v1/monitor" + (f"?{urlencode(query)}" if query else ""))
    try:
        for line in lines:
            line = line.strip()
            if not line:
                continue
            if args.output == "json":
                _out(line.decode("utf-8", "replace"))
            else:
                try:
                    _out(views.drop_line(json.loads(line)))
                except ValueError:
                    continue
    except KeyboardInterrupt:
        pass
    finally:
        lines.close()  # type: ignore[attr-defined]
    return 0


def _peer_path(peer: str) -> str:
    return f"/v1/peers/{quote(peer, safe='')}"


def parse_reload_target(text: str) -> tuple[str, str, int | None]:
    """NS/SERVICE[:PORT] -> (ns, service, port or None); UsageError when malformed."""
    target = text
    port: int | None = None
    if ":" in target:
        target, _, ptext = target.rpartition(":")
        if not ptext.isdigit() or not 0 < int(ptext) < 65536:
            raise UsageError(f"{text}: the port after ':' must be a port number")
        port = int(ptext)
    ns, _, service = target.partition("/")
    if not ns or not service:
        raise UsageError(f"{text}: expected NS/SERVICE or NS/SERVICE:PORT")
    return ns, service, port


def cmd_activator(args: argparse.Namespace) -> int:
    ns, service, port = parse_reload_target(args.target)
    body: dict[str, Any] = {}
    if port is not None:
        body["port"] = port
    if args.module:  # a file (made absolute: the daemon's cwd is not ours), or a name
        m = args.module
        body["module"] = os.path.abspath(m) if m.endswith(".wasm") or os.sep in m else m
    with _client(args) as client:
        rows = client.post(f"/v1/namespaces/{quote(ns, safe='')}/services/"
                           f"{quote(service, safe='')}/activator/reload", body)
    for r in rows:
        gen = f", generation {r['generation']}" if r.get("generation") else ""
        _out(f"{ns}/{r['service']}:{r['port']}: activator reloaded ({r['module']}{gen})")
    return 0


def _authoring(name: str) -> Callable[[argparse.Namespace], int]:
    """A handler of fabric.cli.authoring, imported when run (client commands start fast)."""
    def handler(args: argparse.Namespace) -> int:
        from fabric.cli import authoring

        return int(getattr(authoring, name)(args))
    return handler


def cmd_peer(args: argparse.Namespace) -> int:
    action = args.peer_action
    with _client(args) as client:
        if action in ("add", "set"):
            current = next((p for p in client.get("/v1/peers") if p.get("id") == args.id),
                           None)
            if action == "add" and current is not None:
                raise Conflict(f"peer {args.id} already exists; use 'fabricd peer set'")
            if action == "set" and current is None:
                raise NotFound(f"peer {args.id} not found; use 'fabricd peer add'")
            spec: dict[str, Any] = {"id": args.id}
            key = args.public_key or (current or {}).get("public_key")
            if not key:
                raise UsageError("peer add needs --public-key KEY")
            spec["public_key"] = key
            endpoint = args.endpoint if args.endpoint is not None else (
                (current or {}).get("endpoint"))
            if endpoint and endpoint != "none":
                spec["endpoint"] = endpoint
            if action == "set" and args.endpoint is None and args.public_key is None:
                raise UsageError("peer set needs --endpoint or --public-key")
            row = client.put(_peer_path(args.id), spec)
            _out(f"peer {args.id} {'added' if action == 'add' else 'changed'}"
                 + (f": endpoint {row.get('endpoint')}" if row.get("endpoint") else ""))
        elif action == "remove":
            client.delete(_peer_path(args.id))
            _out(f"peer {args.id} removed")
        else:
            client.post(_peer_path(args.id) + "/rekey")
            _out(f"peer {args.id}: handshake started")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            health = client.get("/v1/health")
        except FabricError as e:
            if getattr(e, "code", None) == "unreachable":
                raise  # no daemon at all: say so, not "unhealthy"
            health = {"ok": False, "error": e.message}
        namespaces = client.get("/v1/namespaces")
        services = client.get("/v1/services")
        peers = client.get("/v1/peers")
    if args.output in ("json", "yaml"):
        doc = {"health": health, "namespaces": namespaces, "services": services,
               "peers": peers}
        _out(views.render(doc, args.output))
    else:
        _out(views.status_text(health, namespaces, services, peers))
    return 0 if health.get("ok", True) else 1


def cmd_describe(args: argparse.Namespace) -> int:
    kind = KIND_ALIASES.get(args.kind, args.kind)
    ns: str | None = args.namespace
    name: str = args.name
    if "/" in name and kind in ("pods", "services"):
        ns, name = _split_pod(name)
    with _client(args) as client:
        if kind == "namespaces":
            obj = client.get(f"/v1/namespaces/{quote(name, safe='')}")
            query = {"namespace": name}
        elif kind == "pods":
            if not ns:
                raise UsageError("describe pod needs -n NS or NS/POD")
            obj = client.get(_pod_path(ns, name))
            query = {"namespace": ns, "pod": name}
        else:
            rows = client.get("/v1/services" + (f"?{urlencode({'namespace': ns})}" if ns else ""))
            matches = [r for r in rows if r.get("name") == name]
            if not matches:
                raise NotFound(f"service {name!r} not found" + (f" in namespace {ns}" if ns
                                                                  else ""))
            if len(matches) > 1:
                raise UsageError(f"service {name!r} is in several namespaces "
                                 f"({', '.join(str(m.get('namespace')) for m in matches)}); "
                                 "give -n NS")
            obj = matches[0]
            query = {"namespace": str(obj.get("namespace")), "service": name}
        events = client.get("/v1/events/recent?" + urlencode(query))
    if args.output in ("json", "yaml"):
        _out(views.render({"object": obj, "events": events}, args.output))
    else:
        _out(views.describe_text(kind.rstrip("s"), obj, events))
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    from fabric.cli import completion

    parser = build_parser()
    _out(completion.bash(parser) if args.shell == "bash" else completion.zsh(parser))
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    _out(f"private_key: {base64.b64encode(private).decode()}")
    _out(f"public_key: {base64.b64encode(public).decode()}")
    return 0


# ---- parser ------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


EXIT_CODES = """exit codes:
  0  success
  1  the daemon refused or failed the request, or is unreachable (one line on stderr)
  2  bad usage (unknown command or option, malformed argument)
  130  interrupted (Ctrl-C)"""

EXAMPLES: dict[str, str] = {
    "run": ("fabricd run -c /etc/fabricd/fabricd.yaml\n"
            "  fabricd run -c /etc/fabricd/fabricd.yaml --log-format json"),
    "check": "fabricd check -c /etc/fabricd/fabricd.yaml && systemctl reload fabricd",
    "demo": "fabricd demo",
    "get": ("fabricd get pods -n blue\n  fabricd get services -o json\n"
            "  fabricd get peers -o wg\n  fabricd get drops -n blue"),
    "describe": ("fabricd describe pod blue/a\n  fabricd describe service web -n blue\n"
                 "  fabricd describe namespace blue"),
    "status": "fabricd status",
    "ready": "fabricd ready blue/backend-1\n  fabricd ready blue/backend-1 --unready",
    "events": "fabricd events\n  fabricd events -o json | jq 'select(.kind==\"pod_ready\")'",
    "monitor": ("fabricd monitor\n  fabricd monitor -n blue --pod a\n"
                "  fabricd monitor --reason egress_denied -o json"),
    "capture": ("fabricd capture blue/a -w a.pcap -c 100\n"
                "  fabricd capture blue/a | tcpdump -nr -"),
    "peer": ("fabricd peer add w2 --public-key KEY --endpoint 192.0.2.2:51820\n"
             "  fabricd peer set w2 --endpoint 192.0.2.7:51820\n"
             "  fabricd peer rekey w2\n  fabricd peer remove w2"),
    "completion": ("fabricd completion bash > /etc/bash_completion.d/fabricd\n"
                   "  fabricd completion zsh > \"${fpath[1]}/_fabricd\""),
    "keygen": "fabricd keygen > w1.key",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Userspace L3 network fabric.",
                     epilog="start with `fabricd status`.\n\n" + EXIT_CODES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="control socket (default: $FABRICD_CONTROL or /run/fabricd/control.sock)",
    )
    # SUPPRESS so a subcommand's absent --control does not erase a top-level one.
    control = _Parser(add_help=False)
    control.add_argument(
        "--control",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="control socket (default: $FABRICD_CONTROL or /run/fabricd/control.sock)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(
        name: str,
        handler: Callable[[argparse.Namespace], int],
        help: str,
        parents: Sequence[argparse.ArgumentParser] = (),
        where: Any = None,
    ) -> argparse.ArgumentParser:
        example = EXAMPLES.get(name if where is None else "peer")
        epilog = f"examples:\n  {example}" if example and where is None else None
        p = (where or sub).add_parser(
            name, help=help, description=help, parents=list(parents), epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        return p

    p = add("run", cmd_run, "run the daemon")
    p.add_argument("-c", "--config", metavar="FILE", help="config file (YAML)")
    p.add_argument("--log-format", choices=("text", "json"),
                   default=os.environ.get("FABRICD_LOG_FORMAT") or "text",
                   help="text, or json: one object per line for log shippers (default: "
                   "$FABRICD_LOG_FORMAT or text)")
    p = add("check", cmd_check, "validate a config file without running anything")
    p.add_argument("-c", "--config", metavar="FILE", required=True, help="config file (YAML)")
    add("demo", cmd_demo, "run a self-contained demo")

    p = add("status", cmd_status, "one-screen overview: health, pods, services, peers, drops",
            [control])
    p.add_argument("-o", "--output", choices=OUTPUTS, default="table")

    p = add("get", cmd_get, "list namespaces, pods, services, peers or recent drops", [control])
    p.add_argument(
        "kind",
        choices=sorted(KIND_ALIASES),
        metavar="KIND",
        help="namespaces | pods | services | peers | drops",
    )
    p.add_argument("-n", "--namespace", metavar="NS", help="only this namespace")
    p.add_argument("-o", "--output", choices=(*OUTPUTS, "wg"), default="table",
                   help="table (default), json, yaml; wg: peers as `wg show` shows them")

    p = add("describe", cmd_describe, "show one pod, service or namespace with its recent "
            "events", [control])
    p.add_argument("kind", choices=("pod", "service", "namespace", "po", "svc", "ns"),
                   metavar="KIND", help="pod | service | namespace")
    p.add_argument("name", metavar="NAME", help="NAME, or NS/NAME for pods and services")
    p.add_argument("-n", "--namespace", metavar="NS", help="the namespace of a pod or service")
    p.add_argument("-o", "--output", choices=OUTPUTS, default="table")

    p = add("ready", cmd_ready, "mark a pod ready (or unready) for service traffic", [control])
    p.add_argument("pod", metavar="NS/POD")
    p.add_argument("--unready", action="store_true", help="mark the pod not ready")

    p = add("events", cmd_events, "follow fabric events", [control])
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")

    p = add("monitor", cmd_monitor, "follow dropped frames live, with reason and headers "
            "(sampled)", [control])
    p.add_argument("-n", "--namespace", metavar="NS", help="only this namespace")
    p.add_argument("--pod", metavar="POD", help="only frames from this pod (needs -n)")
    p.add_argument("--reason", metavar="R", help="only this drop reason, e.g. spoofed_source")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")

    p = add("capture", cmd_capture, "capture a pod's frames as pcap", [control])
    p.add_argument("pod", metavar="NS/POD")
    p.add_argument("-w", "--write", metavar="FILE", help="pcap file (default: stdout)")
    p.add_argument("-c", "--count", type=_positive_int, metavar="N", help="stop after N frames")

    p = add("peer", cmd_peer, "add, change, remove or rekey a tunnel peer (like `wg set`)")
    peers = p.add_subparsers(dest="peer_action", metavar="ACTION", required=True)
    for action, text in (("add", "add a peer"), ("set", "change a peer's endpoint or key"),
                         ("remove", "remove a peer"), ("rekey", "start a new handshake now")):
        q = add(action, cmd_peer, text, [control], where=peers)
        q.add_argument("id", metavar="ID", help="the peer worker's id")
        if action in ("add", "set"):
            q.add_argument("--endpoint", metavar="HOST:PORT",
                           help="where the peer listens ('none': wait for it to call)")
            q.add_argument("--public-key", metavar="KEY", help="its base64 public key")

    p = add("activator", cmd_activator, "make, build and reload activators")
    acts = p.add_subparsers(dest="activator_action", metavar="ACTION", required=True)
    q = add("reload", cmd_activator, "swap a service port's activator for a fresh load "
            "(new flows and streams go to it; live streams stay with the old one)",
            [control], where=acts)
    q.add_argument("target", metavar="NS/SERVICE[:PORT]")
    q.add_argument("module", nargs="?", metavar="FILE",
                   help="the new .wasm (default: the configured module, read again)")
    q = add("new", _authoring("cmd_new"), "make an activator project that builds and passes "
            "its own tests (docs/activators.md)", where=acts)
    q.add_argument("name", metavar="NAME", help="1-32 of [a-z0-9_]: the directory and module")
    q.add_argument("--lang", choices=("c", "zig"), default="c", help="c (default) or zig")
    q.add_argument("--proto", choices=("tcp", "stream", "http2", "postgres"),
                   default="stream", help="what it starts from (default: stream)")
    q.add_argument("--dir", default=".", metavar="DIR", help="where to make it (default: .)")
    q = add("build", _authoring("cmd_build"), "build an activator project with the pinned "
            "zig, print its size and sha256", [control], where=acts)
    q.add_argument("dir", nargs="?", default=".", metavar="DIR", help="the project (default: .)")
    q.add_argument("-o", "--output", metavar="OUT", help="the .wasm (default: DIR/NAME.wasm)")
    q.add_argument("--watch", action="store_true", help="rebuild whenever a source changes")
    q.add_argument("--debug", action="store_true",
                   help="keep DWARF and names (about 4x bigger): traps report file:line")
    q.add_argument("--reload", metavar="NS/SERVICE[:PORT]",
                   help="swap each good build into the running daemon")
    from fabric.activator.harness.cli import add_test_command  # no wasmtime until it runs

    add_test_command(acts)

    p = add("completion", cmd_completion, "print a shell completion script")
    p.add_argument("shell", choices=("bash", "zsh"))

    add("keygen", cmd_keygen, "generate a Curve25519 key pair for peers")
    return parser


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return 2
        return handler(args)
    except SystemExit as e:  # --help, or argparse exiting on its own
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except FabricError as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
