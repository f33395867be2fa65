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

from fabric.control.client import ControlClient, resolve_control_path
from fabric.errors import FabricError, NotFound

PROG = "fabricd"


class UsageError(Exception):
    """Bad arguments that argparse cannot catch by itself; exit code 2."""


class _Parser(argparse.ArgumentParser):
    """One-line usage errors, and no sys.exit inside main() so tests can call it."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---- output helpers ----------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple, set)):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """kubectl-style: upper-case headers, columns padded to the widest cell, 3 spaces apart."""
    cells = [[h for h, _ in columns]] + [[_cell(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


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
}


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
    with _client(args) as client:
        data: Any
        columns: list[tuple[str, str]]
        if kind == "namespaces":
            if ns and args.output == "json":
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
            if args.output != "json":
                data = [_service_row(r) for r in data]
        else:
            data = client.get("/v1/peers")
            columns = _generic_columns(data, set())
    if args.output == "json":
        _out(json.dumps(data, indent=2))
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Userspace L3 network fabric.")
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
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=list(parents))
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

    p = add("get", cmd_get, "list namespaces, pods, services or peers", [control])
    p.add_argument(
        "kind",
        choices=sorted(KIND_ALIASES),
        metavar="KIND",
        help="namespaces | pods | services | peers",
    )
    p.add_argument("-n", "--namespace", metavar="NS", help="only this namespace")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")

    p = add("ready", cmd_ready, "mark a pod ready (or unready) for service traffic", [control])
    p.add_argument("pod", metavar="NS/POD")
    p.add_argument("--unready", action="store_true", help="mark the pod not ready")

    p = add("events", cmd_events, "follow fabric events", [control])
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")

    p = add("capture", cmd_capture, "capture a pod's frames as pcap", [control])
    p.add_argument("pod", metavar="NS/POD")
    p.add_argument("-w", "--write", metavar="FILE", help="pcap file (default: stdout)")
    p.add_argument("-c", "--count", type=_positive_int, metavar="N", help="stop after N frames")

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
