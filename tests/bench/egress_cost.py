"""What egress costs the router per frame beyond pod to pod, in-process:
`python -m tests.bench.egress_cost`.

No root and no namespaces: a real `Router` with a real `EgressNat` and uplink port, one
TCP flow opened through it, and CPU time of this thread (`time.thread_time`), medians of
`--repeat` rounds of `--frames` calls. The frame is restored (its first 80 bytes, what
the router rewrites) before each call, and that restore's own cost is subtracted. Rows:

- `out`: a 64 KB TCP GSO super-frame from the pod to the internet, as a bulk upload
  sends it (`Router.receive` -> NAT `outbound` -> L3 framing for the uplink TUN);
- `in`: the server's ACK from the uplink (`Router.receive_egress` -> NAT `inbound` ->
  Ethernet framing for the pod);
- `pod to pod`: the same super-frame to another pod (the fast path), the reference;
- the NAT's `outbound` and `inbound` alone, and `shift_vnet` (the virtio-net header
  moved across the Ethernet header, once each way).

The data plane's own share (the read and write syscalls and their kernel work) is not
in it: `tests.bench.profile egress` measures the whole path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from fabric.net import packets, vnet
from fabric.router.l3 import shift_vnet
from fabric.router.model import L3_OFF, Port
from fabric.router.router import Router
from gateway.egress import EgressNat

GW = packets.mac_bytes("02:fa:b0:00:00:01")
A, B = packets.ip_bytes("10.40.0.2"), packets.ip_bytes("10.40.0.3")
A_MAC = "02:00:00:00:00:02"
SERVER, EGRESS = packets.ip_bytes("203.0.113.10"), packets.ip_bytes("100.64.0.7")
SUPER = 65000  # IPv4 length of the super-frame
MSS = 1448
HEAD = 80  # what the router rewrites in a frame: restored before each call


def _segment(src: bytes, dst: bytes, sport: int, dport: int, flags: int, size: int) -> bytes:
    """An IPv4 TCP packet of `size` bytes (checksums are not checked on this path)."""
    return packets.tcp_packet(src, dst, sport, dport, 1, 1, flags,
                              bytes(size - 40))


def _super_frame(dst: bytes, flags: int = packets.TCP_ACK) -> bytes:
    """As a pod's stack sends a bulk upload over a TAP: TSO, NEEDS_CSUM at the TCP one."""
    hdr = vnet.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 66, MSS, 34, 16)
    return hdr + packets.eth_header(GW, packets.mac_bytes(A_MAC), packets.ETH_P_IP) + \
        _segment(A, dst, 40000, 5201, flags, SUPER)


def _ack(flags: int = packets.TCP_ACK) -> bytes:
    """The server's ACK as the uplink TUN gives it: a zero virtio-net header, IPv4."""
    return vnet.ZERO_HDR + _segment(SERVER, EGRESS, 5201, 40000, flags, 40)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.egress_cost",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=2000, help="calls per round")
    ap.add_argument("--repeat", type=int, default=15, help="rounds (the median is shown)")
    a = ap.parse_args(argv)

    r = Router("cost", "10.40.0.0/24")
    r.add_pod("a", "10.40.0.2", A_MAC)
    r.add_pod("b", "10.40.0.3", "02:00:00:00:00:03")
    pa = Port(vnet=True, mtu=1500, kind="netns")
    pb = Port(vnet=True, mtu=1500, kind="netns")
    r.attach("a", pa, 0.0)
    r.attach("b", pb, 0.0)
    up = Port(vnet=True, mtu=1500, kind="uplink", l3=True)
    nat = EgressNat("100.64.0.7", ["0.0.0.0/0"], protected=())
    r.attach_egress(nat, up)
    buf = bytearray(256 * 1024)
    # Open the flow: the pod's SYN out, the server's SYN-ACK in.
    syn, synack = _super_frame(SERVER, packets.TCP_SYN), _ack(packets.TCP_SYN | packets.TCP_ACK)
    buf[:len(syn)] = syn
    r.receive(pa, buf, len(syn), 0.0)
    buf[L3_OFF:L3_OFF + len(synack)] = synack
    r.receive_egress(up, buf, L3_OFF + len(synack), 0.0)
    r.outputs.clear()
    if nat.flows != 1:
        print("the flow did not open", file=sys.stderr)
        return 1

    def rounds(fn: Callable[[], object]) -> float:
        res = []
        for _ in range(a.repeat):
            t0 = time.thread_time()
            for _ in range(a.frames):
                fn()
            res.append((time.thread_time() - t0) / a.frames * 1e6)
        return statistics.median(res)

    out, ack, p2p = _super_frame(SERVER), _ack(), _super_frame(B)
    n_out, n_ack, n_p2p = len(out), L3_OFF + len(ack), len(p2p)
    ip = vnet.VNET_HDR_LEN + packets.ETH_HLEN

    def restore_out() -> None:
        buf[:HEAD] = out[:HEAD]

    def restore_ack() -> None:
        buf[L3_OFF:L3_OFF + len(ack)] = ack

    def restore_p2p() -> None:
        buf[:HEAD] = p2p[:HEAD]

    rows: list[tuple[str, float]] = []
    buf[:n_out] = out
    base = rounds(restore_out)
    rows.append(("out: Router.receive, 64 KB super-frame to the uplink",
                 rounds(lambda: (restore_out(), r.receive(pa, buf, n_out, 1.0))) - base))
    rows.append(("  of which NAT outbound",
                 rounds(lambda: (restore_out(), nat.outbound(buf, ip, SUPER, 1.0, True)))
                 - base))
    base = rounds(restore_ack)
    rows.append(("in: Router.receive_egress, the ACK to the pod",
                 rounds(lambda: (restore_ack(), r.receive_egress(up, buf, n_ack, 1.0)))
                 - base))
    rows.append(("  of which NAT inbound",
                 rounds(lambda: (restore_ack(), nat.inbound(buf, L3_OFF + vnet.VNET_HDR_LEN,
                                                            40, 1.0, False))) - base))
    rows.append(("shift_vnet (each way)", rounds(lambda: shift_vnet(buf, 0, L3_OFF, -L3_OFF))))
    buf[:n_p2p] = p2p
    base = rounds(restore_p2p)
    rows.append(("pod to pod: Router.receive, the same super-frame",
                 rounds(lambda: (restore_p2p(), r.receive(pa, buf, n_p2p, 1.0))) - base))
    if r.outputs or pa.drops or up.drops or pb.drops:
        print(f"unexpected outputs or drops: {pa.drops} {up.drops} {pb.drops}",
              file=sys.stderr)
        return 1
    print(f"router CPU µs per call, median of {a.repeat} rounds of {a.frames}:")
    for name, us in rows:
        print(f"  {us:6.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
