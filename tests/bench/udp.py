"""`udp`: 64-byte UDP datagrams (`iperf3 -u -l 64 -b RATE`) through the fabric and
through veth.

At 150k packets/s offered the fabric must lose less than 1 % (issue 12). Then the offered rate
steps up to find the forwarder's ceiling: the highest received rate with < 1 % loss and
the most packets per second received at all. iperf3's own receiver is a limit too (it
reads one datagram per syscall), which the veth numbers show; they are reported as-is.
To tell where packets went, each measurement also records the receiving namespace's
UDP receive-buffer overflows (the receiver was too slow) and the sender's eth0 transmit
drops (for the fabric: its TAP queue overflowed because fabricd did not read fast enough).
"""

from __future__ import annotations

from typing import Any

from tests.bench.common import Report, Settings, fmt, median, progress
from tests.bench.topo import FABRIC, VETH, Topology

NAME = "udp"
PAYLOAD = 64
FIXED_PPS = 150_000
STEPS: tuple[int, ...] = (100_000, 150_000, 200_000, 250_000, 300_000, 0)  # 0: unlimited
MAX_LOSS = 1.0  # percent
SIDES = (FABRIC, VETH)


def step_label(pps: int) -> str:
    return f"{pps // 1000}k" if pps else "max"


def run(s: Settings) -> Report:
    r = Report(NAME, f"iperf3 UDP, {PAYLOAD}-byte payload, offered 100k..300k pps and "
                     f"unlimited, {s.seconds} s x {s.runs} runs (interleaved)")
    # results[side][pps]: one dict per run
    results: dict[str, dict[int, list[dict[str, Any]]]] = {
        side: {pps: [] for pps in STEPS} for side in SIDES}
    with Topology() as topo:
        drops_before = topo.fabric_drops()

        def measure(side: str, pps: int, i: int) -> dict[str, Any]:
            sd = topo.sides[side]
            rcvbuf0 = topo.udp_counters(sd.server).get("RcvbufErrors", 0)
            txdrop0 = topo.tx_dropped(sd.client)
            fdrops0 = sum(topo.fabric_drops().values()) if side == FABRIC else 0.0
            # iperf3's default socket buffer holds ~280 small datagrams and overflows on
            # any scheduling hiccup of the receiver; both paths get the same larger one.
            res = topo.iperf3(sd, "-u", "-l", str(PAYLOAD), "-b", str(pps * PAYLOAD * 8),
                              "-w", "4M", seconds=s.seconds)
            end = res["end"]
            sent, rx = end["sum_sent"], end["sum_received"]
            received = rx["packets"] - rx["lost_packets"]
            m = {
                "offered_pps": pps or None,
                "sent_pps": sent["packets"] / sent["seconds"],
                "received_pps": received / rx["seconds"],
                "loss_percent": rx["lost_percent"],
                "sent": sent["packets"], "received": received, "lost": rx["lost_packets"],
                "receiver_rcvbuf_errors":
                    topo.udp_counters(sd.server).get("RcvbufErrors", 0) - rcvbuf0,
                "sender_tx_dropped": topo.tx_dropped(sd.client) - txdrop0,
            }
            if side == FABRIC:
                m["fabric_drops"] = sum(topo.fabric_drops().values()) - fdrops0
            progress(NAME, f"run {i + 1}/{s.runs} {side} @{step_label(pps)}: sent "
                           f"{m['sent_pps'] / 1e3:.0f} kpps, received "
                           f"{m['received_pps'] / 1e3:.0f} kpps, loss {m['loss_percent']:.2f} %"
                           f" (receiver socket overflows {m['receiver_rcvbuf_errors']}, "
                           f"sender tx drops {m['sender_tx_dropped']})")
            return m

        for i in range(s.runs):  # interleaved, who goes first alternates every time
            for j, pps in enumerate(STEPS):
                for side in SIDES if (i + j) % 2 == 0 else SIDES[::-1]:
                    results[side][pps].append(measure(side, pps, i))
        topo.check_daemon()
        drops_after = topo.fabric_drops()

    def col(side: str, pps: int, key: str, scale: float = 1.0) -> list[float | None]:
        return [None if m.get(key) is None else m[key] / scale for m in results[side][pps]]

    for pps in STEPS:
        for side in SIDES:
            r.add(f"{side} @{step_label(pps)}: loss", "%", col(side, pps, "loss_percent"))
            r.add(f"{side} @{step_label(pps)}: received", "kpps",
                  col(side, pps, "received_pps", 1e3))

    # Medians per step, and the ceilings derived from them.
    rows = []
    summary: dict[str, dict[str, Any]] = {side: {} for side in SIDES}
    for pps in STEPS:
        row = [step_label(pps)]
        for side in SIDES:
            med = {key: median(col(side, pps, key)) for key in
                   ("sent_pps", "received_pps", "loss_percent", "receiver_rcvbuf_errors",
                    "sender_tx_dropped")}
            summary[side][step_label(pps)] = med
            row += [fmt(med["sent_pps"] / 1e3), fmt(med["received_pps"] / 1e3),
                    fmt(med["loss_percent"]), fmt(med["receiver_rcvbuf_errors"]),
                    fmt(med["sender_tx_dropped"])]
        rows.append(row)
    headers = ["offered"]
    for side in SIDES:
        headers += [f"{side} sent kpps", "rx kpps", "loss %", "sock ovf", "tx drop"]
    r.tables.append(("medians per offered rate (sock ovf: receiver socket buffer "
                     "overflows; tx drop: sender eth0 queue drops)", headers, rows))

    ceilings: dict[str, tuple[float | None, float | None]] = {}
    for side in SIDES:
        meds = summary[side].values()
        ok = [m["received_pps"] for m in meds if m["loss_percent"] is not None
              and m["loss_percent"] < MAX_LOSS and m["received_pps"] is not None]
        rx = [m["received_pps"] for m in meds if m["received_pps"] is not None]
        ceilings[side] = (max(ok) if ok else None, max(rx) if rx else None)

    fixed = summary[FABRIC][step_label(FIXED_PPS)]["loss_percent"]
    r.check(f"fabric loss @{step_label(FIXED_PPS)} pps", fixed, "%", f"< {MAX_LOSS:.0f} %",
            fixed is not None and fixed < MAX_LOSS)
    r.check(f"veth loss @{step_label(FIXED_PPS)} pps (reference)",
            summary[VETH][step_label(FIXED_PPS)]["loss_percent"], "%", "", None)
    for side in SIDES:
        best, top = ceilings[side]
        r.check(f"{side}: highest received rate with < {MAX_LOSS:.0f} % loss",
                None if best is None else best / 1e3, "kpps", "", None)
        r.check(f"{side}: max received rate", None if top is None else top / 1e3, "kpps",
                "", None)
    f_top, v_top = ceilings[FABRIC][1], ceilings[VETH][1]
    r.check("fabric / veth max received rate", f_top / v_top * 100 if f_top and v_top
            else None, "%", "", None)

    at = summary[FABRIC][step_label(FIXED_PPS)]
    lost = median(col(FABRIC, FIXED_PPS, "lost"))
    if lost:
        r.notes.append(
            f"fabric @{step_label(FIXED_PPS)}: of {fmt(lost)} packets lost (median), "
            f"{fmt(at['receiver_rcvbuf_errors'])} overflowed pod b's socket buffer (the "
            f"receiver was too slow) and {fmt(at['sender_tx_dropped'])} pod a's TAP queue "
            "(fabricd did not read fast enough)")
    v_top = ceilings[VETH][1]
    r.notes.append(f"veth's best ({fmt(None if v_top is None else v_top / 1e3)} kpps) is "
                   "iperf3's own limit on this machine (one syscall per datagram, sender "
                   "and receiver sharing the CPUs): no path can be measured above it")
    if ceilings[VETH][0] is None:
        r.notes.append("veth itself loses >= 1 % at the lowest rate: the machine was busy "
                       "or iperf3 is the bottleneck; the fabric's loss is not meaningful alone")
    fdrops = {k: v - drops_before.get(k, 0) for k, v in drops_after.items()
              if v - drops_before.get(k, 0)}
    shown = {k: v for k, v in fdrops.items() if k != "ipv6"}  # the pods' own IPv6 chatter
    if shown:
        r.notes.append("fabricd drop counters: "
                       + ", ".join(f"{k}={v:.0f}" for k, v in shown.items()))
    r.extra = {"steps_pps": list(STEPS), "payload_bytes": PAYLOAD,
               "runs": {side: {step_label(p): results[side][p] for p in STEPS}
                        for side in SIDES},
               "medians": summary,
               "ceiling_pps": {side: {"lossless": c[0], "max_received": c[1]}
                               for side, c in ceilings.items()},
               "fabric_drops": fdrops}
    return r
