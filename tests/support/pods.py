"""Pods without root: a datagram socketpair plays a pod's TAP (the idea of wireguard-go's
tuntest). The fabric holds one end as the port's fd; the test reads and writes Ethernet
frames (with a virtio-net header when `vnet`) on the other, keeping frame boundaries."""

from __future__ import annotations

import select
import socket
import time

from fabric.config.specs import DEFAULT_GATEWAY_MAC
from fabric.net import packets
from fabric.net.packets import ETH_P_IP
from fabric.net.vnet import ZERO_HDR

GW_MAC = packets.mac_bytes(DEFAULT_GATEWAY_MAC)


class SocketPod:
    """One pod's side of a socketpair port."""

    def __init__(self, name: str, ip: str, mac: str, *, vnet: bool = False) -> None:
        self.name = name
        self.ip = ip
        self.ipb = packets.ip_bytes(ip)
        self.mac = mac
        self.macb = packets.mac_bytes(mac)
        self.vnet = vnet
        self.sock, self.port_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.sock, self.port_sock):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setblocking(False)

    def take_fd(self) -> int:
        """The fd the fabric adopts as this pod's port (it owns it from then on),
        non-blocking as ports are."""
        self.port_sock.setblocking(False)
        return self.port_sock.detach()

    def spec(self) -> dict[str, str]:
        return {"name": self.name, "ip": self.ip, "mac": self.mac}

    def send_ip(self, packet: bytes) -> None:
        frame = packets.eth_header(GW_MAC, self.macb, ETH_P_IP) + packet
        self.sock.send((ZERO_HDR if self.vnet else b"") + frame)

    def udp(self, dst: str, sport: int, dport: int, payload: bytes) -> None:
        self.send_ip(packets.udp_packet(self.ipb, packets.ip_bytes(dst), sport, dport, payload))

    def recv(self, timeout: float = 2.0) -> bytes | None:
        """The next frame the fabric sent this pod (without its virtio-net header)."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return None
        frame = self.sock.recv(65536)
        return frame[10:] if self.vnet else frame

    def recv_ip(self, timeout: float = 2.0, skip_arp: bool = True) -> bytes | None:
        """The IPv4 packet of the next IPv4 frame (ARP requests skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            f = self.recv(max(left, 0.0))
            if f is None:
                return None
            if f[12:14] == b"\x08\x00":
                return f[14:]
            if not skip_arp:
                return f

    def close(self) -> None:
        self.sock.close()
        try:
            self.port_sock.close()
        except OSError:
            pass
