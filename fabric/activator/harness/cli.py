"""`fabricd activator test`: the harness on the command line (a thin shell over replay).

Kept free of heavy imports (wasmtime loads only when the command runs), so building the
CLI's parser stays cheap for every other command.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

HELP = "replay a capture through an activator on a fake clock and check what it does"

DESCRIPTION = """\
Replay a pcap through an activator module with the fabric's real host runtime (fuel,
deadline and memory limits as in the daemon), on a fake clock taken from the capture.
No daemon, no root, no network.

A packet (L3) activator gets every packet to the service port as a packet event while
no backend is ready (as the daemon's dispatch gives them; no ticks). A stream activator
(it exports fab_streams) runs under the daemon's own stream core: the capture's TCP
connections to the port are reassembled (retransmissions, reordering, FIN, RST) and
their clients replayed with their captured think times, each waiting for as many bytes
as it had received before its next move (--client-pacing); ticks come every 100 ms
while streams live; upstream connections reach a simulated backend, ready at
--backend-ready-at, that answers with the captured server's bytes, each reply once the
guest has forwarded the client bytes that preceded it in the capture (replies to
requests the guest answered itself are dropped). See docs/activators.md, "Testing with a
capture", for the model and its limits.

The timeline has one line per event (->), action (<-), need change (==), failure (!!)
and simulated fact (**: backend ready, connects, closes, spliced relays), with the time
in ms since the capture's first packet. It holds no wall-clock value, so it can be kept
as a golden file. -o json prints {"records": [...], "summary": {...}} (traps with their
function, frames, fuel and events; fuel used; need history; counters)."""

EPILOG = """\
expectations (--expect, repeatable):
  need=none|traffic|active   the need level at the end of the replay
  wake, no-wake              a backend was / was never woken: the need went active
                             while none was ready (L3: or a packet was held)
  local-answers=N            sum of the guest's counters named *_answered
                             (http2: pings_answered, postgres: keepalives_answered)
  count:NAME=N               one of the guest's count counters
  client-bytes>=N            bytes the replayed clients received (stream activators)
  golden=FILE                the text timeline equals FILE; --update-golden writes it

exit codes:
  0  replayed, no failure, every expectation met
  1  the guest trapped, ran out of fuel or time, answered a malformed batch, or an
     expectation was not met (one line on stderr says which)
  2  bad input: a missing file, not a pcap, not an activator, bad JSON or option

examples:
  fabricd activator test activators/http2/http2.wasm --pcap ping.pcap \\
      --expect local-answers=3 --expect no-wake
  fabricd activator test activators/tcp/tcp.wasm --pcap curl.pcap \\
      --backend-ready-at wake+0.5 --expect wake -o json
  fabricd activator test my.wasm --pcap s.pcap --expect golden=s.timeline --update-golden"""


def add_test_command(where: Any) -> argparse.ArgumentParser:
    """Add `test` to the `activator` subcommands."""
    p: argparse.ArgumentParser = where.add_parser(
        "test", help=HELP, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=run)
    p.add_argument("wasm", metavar="WASM", help="the activator module (.wasm)")
    p.add_argument("--pcap", required=True, metavar="FILE",
                   help="the capture (classic pcap: Ethernet, raw IP, Linux cooked)")
    p.add_argument("--service-port", type=int, metavar="P",
                   help="the service port (default: the port the capture's SYNs go to)")
    p.add_argument("--backend-ready-at", default="never", metavar="SECONDS",
                   help="when the simulated backend becomes ready: seconds since the "
                        "first packet, wake+SECONDS (that long after each wake: the need "
                        "going active, or a held packet, while no backend is ready), or "
                        "never (default)")
    p.add_argument("--backend-gone-at", type=float, metavar="SECONDS",
                   help="the backend goes away then (the service scaled to zero): "
                        "backend_unavailable; a later wake+SECONDS brings it back")
    p.add_argument("--config", metavar="JSON", default="{}",
                   help="the activator config, a JSON object (stream activators also get "
                        "port, target_port, hold_timeout_ms, hold_bytes, memory_limit "
                        "unless set)")
    p.add_argument("--expect", action="append", default=[], metavar="EXPR",
                   help="a check on the outcome (repeatable; below)")
    p.add_argument("--update-golden", action="store_true",
                   help="write the timeline to the golden=FILE expectations' files")
    p.add_argument("--client-pacing", choices=("replies", "capture"), default="replies",
                   help="replies (default): a client sends its next bytes after the think "
                        "time it had in the capture, once it has received as many bytes as "
                        "it had then (at most --client-wait later); capture: at its "
                        "captured times, whatever it received")
    p.add_argument("--client-wait", type=float, default=5.0, metavar="SECONDS",
                   help="how long a paced client waits for bytes that do not come "
                        "(default 5)")
    p.add_argument("--until", type=float, metavar="SECONDS",
                   help="replay up to this time (default: 1 s after the last input)")
    p.add_argument("--fuel", type=int, metavar="N",
                   help="fuel per guest call (default: the host's, 20,000,000)")
    p.add_argument("--deadline-ms", type=int, metavar="MS",
                   help="wall-clock budget per guest call (default: the host's, 50)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text",
                   help="the timeline as text (default) or JSON")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no timeline: only the summary line (text) or failure")
    return p


def _bad(msg: str) -> int:
    print(f"fabricd: activator test: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        config = json.loads(args.config)
    except ValueError as e:
        return _bad(f"--config is not JSON: {e}")
    if not isinstance(config, dict):
        return _bad("--config must be a JSON object")
    if args.fuel is not None and args.fuel <= 0:
        return _bad("--fuel must be positive")
    if args.deadline_ms is not None and args.deadline_ms <= 0:
        return _bad("--deadline-ms must be positive")
    import logging

    # the host logs every guest failure; here they are in the timeline and on stderr once
    logging.getLogger("fabric").addHandler(logging.NullHandler())
    from fabric.activator.harness.expect import Expectation, check_all
    from fabric.activator.harness.replay import HarnessError, replay

    try:
        expectations = [Expectation.parse(e) for e in args.expect]
        result = replay(args.wasm, args.pcap, service_port=args.service_port,
                        backend_ready_at=args.backend_ready_at,
                        backend_gone_at=args.backend_gone_at, config=config,
                        until=args.until, fuel_per_call=args.fuel,
                        client_pacing=args.client_pacing, client_wait=args.client_wait,
                        deadline_ms=args.deadline_ms)
    except HarnessError as e:
        return _bad(str(e))
    check_all(result, expectations, args.update_golden)
    if args.output == "json":
        sys.stdout.write(result.json() + "\n")
    else:
        if not args.quiet:
            sys.stdout.write(result.text)
        s = result.summary()
        counters = ", ".join(f"{k}={v}" for k, v in s["counters"].items()) or "none"
        wake = f"woken at {s['wake_at_ms']:.3f} ms" if result.woke else "never woken"
        sys.stdout.write(
            f"# {result.mode} activator, port {result.port}: {s['packets']} packets, "
            f"{s['connections']} {'connections' if result.mode == 'stream' else 'flows'}; "
            f"{wake}; need at the end {s['final_need']}; counters {counters}; "
            f"{s['calls']} calls, fuel {s['fuel_used']} (max {s['max_fuel_per_call']} "
            f"per call); {len(result.failures)} failures\n")
    sys.stdout.flush()
    line = result.failure_line()
    if line is not None:
        print(f"fabricd: activator test: {line}", file=sys.stderr)
        return 1
    return 0
