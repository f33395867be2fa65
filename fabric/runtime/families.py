"""Every metric family fabricd exports: the one registry.

Each family is declared once here, with its type, its labels and what it means; the
collectors (fabric.runtime.metrics, the control API's own) make their families from it
(`new`), so a name, a type or a label set cannot differ between the code, the scrape,
docs/metrics.md (generated from `markdown()`; a test compares) and the Grafana dashboard
(a test checks every name its queries use against `sample_names()`).

Conventions (Prometheus'): base units in the name (`_seconds`, `_bytes`), `_total` on
counters, one meaning per family. Label values are bounded by the configuration
(namespaces, pods, services, peers) or by the code (reasons, counter names, states):
never a flow, an address or a port.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from fabric.runtime.prometheus import Metric, MetricKind


@dataclass(frozen=True)
class Family:
    name: str
    kind: MetricKind
    labels: tuple[str, ...]
    help: str


_NS = ("namespace",)
_POD = ("namespace", "pod")
_SVC = ("namespace", "service")

FAMILIES: tuple[Family, ...] = (
    # --- the worker and its namespaces ---
    Family("fabric_namespaces", "gauge", (), "Namespaces on this worker"),
    Family("fabric_pods", "gauge", _NS, "Pods in the namespace's table"),
    Family("fabric_pods_attached", "gauge", _NS, "Pods whose port is attached"),
    Family("fabric_held_packets", "gauge", _NS,
           "Frames held for pods not attached yet"),
    # --- ports: pods, the gateway (pod=\"(gateway)\") and the egress uplink ---
    Family("fabric_port_rx_packets_total", "counter", _POD,
           "Frames received from a port (a GSO super-frame counts once); "
           "pod is (gateway) or (uplink) for the fabric's own ports"),
    Family("fabric_port_rx_bytes_total", "counter", _POD, "Bytes received from a port"),
    Family("fabric_port_tx_packets_total", "counter", _POD, "Frames sent to a port"),
    Family("fabric_port_tx_bytes_total", "counter", _POD, "Bytes sent to a port"),
    Family("fabric_drops_total", "counter", ("namespace", "pod", "reason"),
           "Frames dropped, by namespace, ingress pod (empty if none) and reason"),
    # --- the gateway: DNS and egress ---
    Family("fabric_dns_total", "counter", ("namespace", "counter"),
           "DNS server events per namespace (queries, local answers, forwards, drops...), "
           "by counter name"),
    Family("fabric_dns_answer_seconds", "histogram", ("namespace", "source"),
           "Time to answer a DNS query: source=local from the zone (the time spent "
           "building the answer), source=upstream forwarded (from the query's arrival to "
           "the upstream's answer relayed, or SERVFAIL)"),
    Family("fabric_egress_total", "counter", ("namespace", "counter"),
           "Egress NAT events per namespace (translations, refusals by reason, flows "
           "created and expired), by counter name"),
    Family("fabric_egress_flows", "gauge", _NS, "Egress NAT flows in the table"),
    Family("fabric_dhcp_total", "counter", ("namespace", "counter"),
           "DHCP server events per namespace: requests by type (discover, request, "
           "decline, release, inform), replies by type (offer, ack, nak), refusals "
           "(refused_unknown_mac, refused_wrong_address, not_for_us, relayed, bootp), "
           "malformed and unexpected_type messages, options_trimmed, by counter name"),
    # --- services ---
    Family("fabric_service_state", "gauge", ("namespace", "service", "state"),
           "1 for the service's state (dormant, activating, ready, idle), 0 for the others"),
    Family("fabric_service_held_packets", "gauge", _SVC,
           "Packets held while the service has no ready backend"),
    Family("fabric_service_held_bytes", "gauge", _SVC, "Bytes of the held packets"),
    Family("fabric_service_flows", "gauge", _SVC, "Flows of the service in its table"),
    Family("fabric_service_ready_backends", "gauge", _SVC, "Backends ready to take flows"),
    Family("fabric_service_wakes_total", "counter", _SVC,
           "Activations: the service was needed while not (activate signals sent)"),
    Family("fabric_service_total", "counter", ("namespace", "service", "counter"),
           "Service core events (DNAT packets and flows, held, released, hold timeouts, "
           "probes...), by counter name"),
    Family("fabric_service_hooks_total", "counter", ("namespace", "service", "result"),
           "on_activate/on_idle hooks: run, failed, timed_out, skipped (repeated what had "
           "just run), replaced (a waiting signal overtaken)"),
    Family("fabric_service_wake_seconds", "histogram", _SVC,
           "A wake, from the demand that found no ready backend to the held packets "
           "released (or to readiness when nothing was held)"),
    Family("fabric_service_wake_phase_seconds", "histogram", ("namespace", "service", "phase"),
           "A wake's phases: hook (to the on_activate hook started), ready (from the hook, "
           "or the wake's start without one, to the backend's port accepting the probe or "
           "its being marked ready), release (to the held packets released; on the "
           "data-plane thread right after readiness, so near 0 unless it lags)"),
    Family("fabric_activator_total", "counter", ("namespace", "service", "counter"),
           "The activator host's counters of a service, summed over its ports (calls, "
           "events, actions, traps, out_of_fuel, deadline, malformed, memory_cap, "
           "actions_over_limit, bad_module, failed_init, recreated, fallbacks, fuel_used); "
           "per port in fabricd get services -o json"),
    Family("fabric_service_streams", "gauge", _SVC,
           "Client connections open on the service's stream ports (terminated in the "
           "local stack, fabric.streams)"),
    Family("fabric_service_stream_total", "counter", ("namespace", "service", "counter"),
           "Stream host events of the service's stream ports (streams opened and refused, "
           "bytes each way, upstream connects and those paced after a wake (`release_paced`), "
           "splices and bytes spliced, fallbacks, "
           "dropped actions, upstreams made inside the backend pod and the VIP "
           "fallbacks of upstream: pod-local...), by counter name"),
    Family("fabric_service_activator_total", "counter", ("namespace", "service", "counter"),
           "Counters a stream activator keeps itself (its count actions: keep-alives "
           "answered locally, wakes by reason...), by the activator's counter name"),
    Family("fabric_service_stream_wake_seconds", "histogram", _SVC,
           "A wake as the stream ports see it: from a connection held with no ready "
           "backend to the backend's first byte relayed to a client"),
    Family("fabric_service_stream_wake_phase_seconds", "histogram",
           ("namespace", "service", "phase"),
           "The phases of a stream port's wake: activate (held until the need was "
           "raised), connect (until an upstream connection was accepted), first_byte "
           "(until the backend's first byte reached a client)"),
    # --- tunnels ---
    Family("fabric_tunnel_drops_total", "counter", ("reason",),
           "Tunnel datagrams dropped, by reason (the core's, the socket's, the kernel "
           "pre-filter's kernel_drops, unknown_namespace)"),
    Family("fabric_tunnel_events_total", "counter", ("event",),
           "Tunnel events: handshake messages, completions, rekeys, keepalives, roaming, "
           "socket batches, budget_yields (turns the tunnel socket used up its share)"),
    Family("fabric_tunnel_rx_bytes_total", "counter", (),
           "Bytes of tunnel datagrams accepted (all peers)"),
    Family("fabric_tunnel_tx_bytes_total", "counter", (), "Bytes of tunnel datagrams sent"),
    Family("fabric_tunnel_rx_packets_total", "counter", (),
           "Packets decrypted from the tunnel"),
    Family("fabric_tunnel_tx_packets_total", "counter", (),
           "Packets encrypted into the tunnel"),
    Family("fabric_tunnel_peers", "gauge", (), "Configured peers"),
    Family("fabric_tunnel_session_indices", "gauge", (),
           "Session and handshake indices in use"),
    Family("fabric_tunnel_rate_limiter_entries", "gauge", (),
           "Source addresses the handshake rate limiter tracks"),
    Family("fabric_tunnel_handshake_seconds", "histogram", (),
           "Handshakes this worker initiated, from the initiation sent to the peer's "
           "response consumed"),
    Family("fabric_peer_rx_bytes_total", "counter", ("peer",), "Bytes from a peer"),
    Family("fabric_peer_tx_bytes_total", "counter", ("peer",), "Bytes to a peer"),
    Family("fabric_peer_drops_total", "counter", ("peer", "reason"),
           "Datagrams of a peer dropped, by reason"),
    Family("fabric_peer_last_handshake_timestamp_seconds", "gauge", ("peer",),
           "Unix time of the peer's last completed handshake (absent before the first)"),
    # --- the data-plane thread ---
    Family("fabric_dataplane_busy_polls_total", "counter", (),
           "Polls the data-plane thread made instead of sleeping, after frames "
           "(worker.busy_poll; 0 while it is off)"),
    Family("fabric_dataplane_busy_poll_spins_total", "counter", ("outcome",),
           "Busy-poll spins (the polling after a loop turn that read frames), by outcome: "
           "found (frames came within the window), empty (the window passed, the thread "
           "slept)"),
    Family("fabric_dataplane_busy_poll_ahead_total", "counter", ("event",),
           "Adaptive busy-poll spins ahead of predicted frames: woke (the thread's own "
           "timer woke it to spin just before the next frame was due), early (the frame "
           "came first and woke the thread, as with no busy-poll)"),
    Family("fabric_dataplane_busy_poll_window_seconds", "gauge", (),
           "The busy-poll spin right after a turn with frames: worker.busy_poll if "
           "fixed; if adaptive, what the short gaps between frames made it (0 to its max)"),
    # --- the daemon ---
    Family("fabric_events_total", "counter", (), "Events published"),
    Family("fabric_events_lost_total", "counter", (),
           "Events a slow subscriber lost (its queue was full)"),
    Family("fabric_netns_total", "counter", ("counter",),
           "Pods' netns paths refused (refused_<why>) and calls inside a pod's namespace "
           "given up on (timeouts), by counter name"),
    Family("fabricd_control_connections", "gauge", (), "Open control API connections"),
    Family("fabricd_control_requests_total", "counter", ("code",),
           "Control API requests answered, by HTTP status"),
    Family("fabricd_monitor_sinks", "gauge", (),
           "Live `fabricd monitor` feeds attached to namespaces' drop logs (0: nobody "
           "listens and the drop path feeds none)"),
)

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
if len(BY_NAME) != len(FAMILIES):  # pragma: no cover - a declaration error
    raise RuntimeError("a metric family is declared twice")


def new(name: str) -> Metric:
    """An empty family as the registry declares it (KeyError: not declared)."""
    f = BY_NAME[name]
    return Metric(f.name, f.kind, f.help)


def sample_names() -> set[str]:
    """Every name a sample line of a scrape may have (a histogram's _bucket, _sum and
    _count; not its bare name, which only # HELP and # TYPE use)."""
    out: set[str] = set()
    for f in FAMILIES:
        if f.kind == "histogram":
            out |= {f.name + "_bucket", f.name + "_sum", f.name + "_count"}
        else:
            out.add(f.name)
    return out


def markdown() -> str:
    """The table of docs/metrics.md."""
    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    for f in FAMILIES:
        labels = ", ".join(f"`{x}`" for x in f.labels) or "–"
        meaning = f.help.replace("|", "\\|")
        rows.append(f"| `{f.name}` | {f.kind} | {labels} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m fabric.runtime.families > table for docs/metrics.md
    sys.stdout.write(markdown())
