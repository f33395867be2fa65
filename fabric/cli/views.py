"""How the CLI shows things to a person: tables, sizes, ages, `wg show`-style peers, the
`status` screen, `describe`, and one line per dropped frame. Pure functions of the API's
JSON, so they are tested without a daemon."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

# A peer counts as up when its last handshake is this recent: WireGuard rejects a session
# after 180 s without a new handshake, so an older one cannot carry traffic.
PEER_UP_SECONDS = 180.0
LIST_ITEMS = 20  # `describe` shows this many entries of a list (a namespace's pods)


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple, set)):
        return ",".join(cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """kubectl-style: upper-case headers, columns padded to the widest cell, 3 spaces apart."""
    cells = [[h for h, _ in columns]] + [[cell(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def to_yaml(data: Any) -> str:
    import yaml  # only `-o yaml` pays for the import

    return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=False)).rstrip("\n")


def render(data: Any, output: str, columns: list[tuple[str, str]] | None = None) -> str:
    if output == "json":
        return json.dumps(data, indent=2)
    if output == "yaml":
        return to_yaml(data)
    rows = data if isinstance(data, list) else [data]
    return format_table(rows, columns or [])


def human_bytes(n: float | None) -> str:
    """wg's units: B, KiB, MiB, GiB, TiB."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def human_age(seconds: float | None) -> str:
    """'1 minute, 3 seconds ago', as `wg show` says it."""
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if s >= size or (unit == "second" and not parts):
            k, s = divmod(s, size)
            parts.append(f"{k} {unit}{'' if k == 1 else 's'}")
    return ", ".join(parts) + " ago"


def peer_up(p: dict[str, Any]) -> bool:
    age = p.get("last_handshake_age")
    return age is not None and age < PEER_UP_SECONDS


def peers_text(peers: list[dict[str, Any]]) -> str:
    """Like `wg show`: one block per peer, what an operator looks at first."""
    blocks = []
    for p in peers:
        lines = [f"peer: {p.get('id')}", f"  public key: {p.get('public_key') or '-'}"]
        if p.get("endpoint"):
            lines.append(f"  endpoint: {p['endpoint']}")
        lines.append(f"  latest handshake: {human_age(p.get('last_handshake_age'))}")
        lines.append(f"  transfer: {human_bytes(p.get('rx_bytes', 0))} received, "
                     f"{human_bytes(p.get('tx_bytes', 0))} sent")
        ka = p.get("keepalive")
        lines.append(f"  persistent keepalive: {f'every {cell(ka)} seconds' if ka else 'off'}")
        if p.get("handshake_pending"):
            lines.append("  handshake: in progress")
        if p.get("drops_total"):
            nonzero = {k: v for k, v in (p.get("drops") or {}).items() if v}
            lines.append(f"  drops: {p['drops_total']} ({cell(nonzero)})")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts)).strftime("%H:%M:%S.%f")[:-3]
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def _endpoint(d: dict[str, Any], addr: str, port: str) -> str:
    a = d.get(addr)
    if a is None:
        return "?"
    p = d.get(port)
    return f"{a}:{p}" if p is not None else str(a)


def drop_line(d: dict[str, Any]) -> str:
    """`12:00:01.123 blue/a spoofed_source tcp 10.9.9.9:4000 -> 10.1.0.3:80 [S] len 60`."""
    where = f"{d.get('namespace', '-')}/{d.get('pod') or '-'}"
    parts = [when(d.get("ts")), where, str(d.get("reason", "?"))]
    proto = d.get("proto")
    if proto is not None:
        parts.append(str(proto))
        parts.append(f"{_endpoint(d, 'src', 'sport')} -> {_endpoint(d, 'dst', 'dport')}")
    elif d.get("ethertype"):
        parts.append(f"ethertype {d['ethertype']} {d.get('src_mac', '?')} -> "
                     f"{d.get('dst_mac', '?')}")
    if d.get("flags"):
        parts.append(f"[{d['flags']}]")
    if d.get("icmp_type") is not None:
        parts.append(f"icmp {d['icmp_type']}/{d.get('icmp_code', 0)}")
    if d.get("op"):
        parts.append(str(d["op"]))
    if d.get("length"):
        parts.append(f"len {d['length']}")
    if d.get("ttl") is not None and d.get("reason") == "ttl_expired":
        parts.append(f"ttl {d['ttl']}")
    if d.get("count", 1) != 1:
        parts.append(f"x{d['count']}")
    if d.get("suppressed"):
        parts.append(f"({d['suppressed']} more not shown: rate limit)")
    if d.get("lost"):
        parts.append(f"({d['lost']} lost: reader too slow)")
    return " ".join(parts)


DROP_COLUMNS = [("TIME", "time"), ("NAMESPACE", "namespace"), ("POD", "pod"),
                ("REASON", "reason"), ("COUNT", "count"), ("PROTO", "proto"),
                ("SOURCE", "source"), ("DESTINATION", "destination"), ("FLAGS", "flags")]


def drop_rows(drops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for d in drops:
        r = dict(d)
        r["time"] = when(d.get("ts"))
        if d.get("src") is not None:
            r["source"] = _endpoint(d, "src", "sport")
            r["destination"] = _endpoint(d, "dst", "dport")
        rows.append(r)
    return rows


def status_text(health: dict[str, Any], namespaces: list[dict[str, Any]],
                services: list[dict[str, Any]], peers: list[dict[str, Any]]) -> str:
    """The one screen a person reads first: is it up, what is attached, what is asleep,
    which peers answer, and is anything being dropped right now."""
    ok = health.get("ok", True)
    lines = [f"fabricd {health.get('worker') or health.get('worker_id') or ''}".rstrip()
             + f": {'healthy' if ok else 'UNHEALTHY'}"]
    if health.get("error"):
        lines.append(f"  ! {health['error']}")
    pods = sum(int(n.get("pods", 0)) for n in namespaces)
    attached = sum(int(n.get("attached", 0)) for n in namespaces)
    ready = sum(int(n.get("ready", 0)) for n in namespaces)
    lines.append(f"namespaces: {len(namespaces)}; pods: {pods} ({attached} attached, "
                 f"{ready} ready)")
    for n in namespaces:
        lines.append(f"  {n.get('name')}: {n.get('cidr')}, {n.get('pods', 0)} pods "
                     f"({n.get('attached', 0)} attached), held {n.get('held', 0)}, "
                     f"drops {n.get('drops_last_minute', 0)} in the last minute "
                     f"({n.get('drops', 0)} in all)")
    states: dict[str, int] = {}
    for s in services:
        states[str(s.get("state", "?"))] = states.get(str(s.get("state", "?")), 0) + 1
    by_state = ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none"
    lines.append(f"services: {len(services)} ({by_state})")
    up = [p for p in peers if peer_up(p)]
    down = [p for p in peers if not peer_up(p)]
    text = f"peers: {len(peers)} ({len(up)} up, {len(down)} down)"
    if down:
        text += ": down " + ", ".join(str(p.get("id")) for p in down)
    lines.append(text)
    minute = sum(int(n.get("drops_last_minute", 0)) for n in namespaces)
    lines.append(f"drops in the last minute: {minute}"
                 + ("  (see `fabricd get drops`, `fabricd monitor`)" if minute else ""))
    return "\n".join(lines)


def describe_text(kind: str, obj: dict[str, Any], events: list[dict[str, Any]],
                  now: float | None = None) -> str:
    """Fields as an indented key: value list, then the related events, like kubectl."""
    lines = [f"{kind.capitalize()}: {obj.get('name')}"]

    def walk(d: Any, indent: int) -> None:
        pad = "  " * indent
        if isinstance(d, dict):
            for k, v in d.items():
                if k == "name" and indent == 0:
                    continue
                if isinstance(v, (dict, list)) and v and not _flat(v):
                    lines.append(f"{pad}{k}:")
                    walk(v, indent + 1)
                else:
                    lines.append(f"{pad}{k}: {cell(v)}")
        elif isinstance(d, list):
            for item in d[:LIST_ITEMS]:
                if isinstance(item, dict):
                    first = True
                    for k, v in item.items():
                        lead = "- " if first else "  "
                        first = False
                        lines.append(f"{pad}{lead}{k}: {cell(v)}")
                else:
                    lines.append(f"{pad}- {cell(item)}")
            if len(d) > LIST_ITEMS:
                lines.append(f"{pad}... and {len(d) - LIST_ITEMS} more (-o json shows all)")

    walk(obj, 0)
    now = time.time() if now is None else now
    lines.append("events:" if events else "events: <none in the daemon's recent history>")
    for e in events[-20:]:
        rest = {k: v for k, v in e.items() if k not in ("ts", "kind", "namespace", "pod")}
        age = human_age(now - float(e.get("ts", now)))
        lines.append(f"  {age:<22} {e.get('kind')}" + (f"  {cell(rest)}" if rest else ""))
    return "\n".join(lines)


def _flat(v: Any) -> bool:
    if isinstance(v, dict):
        return all(not isinstance(x, (dict, list)) for x in v.values()) and len(v) <= 4
    return all(not isinstance(x, (dict, list)) for x in v)
