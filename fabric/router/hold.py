"""Frames for pods that cannot take them yet: the pod's port is not attached (a VM still
booting, a netns not there yet) or its MAC is not known (ARP pending).

Per pod, bounded (`limit` frames and `pod_bytes` bytes, tail drop), and all pods of the
router together by `total_bytes` (one sender cannot fill the hold of every unattached
pod in its namespace with super-frames); in arrival order, so a pod that comes
up gets what was sent to it as it was sent. Frames wait at most `timeout`; then their
senders are told (ICMP host unreachable, by the router). While a pod with held frames
has a port but no MAC, ARP is retried every `arp_retry` seconds. Sans-IO: the router
asks what is due and does the sending.
"""

from __future__ import annotations

from fabric.router.model import Pod

HOLD_PACKETS = 64
HOLD_POD_BYTES = 512 * 1024
HOLD_TOTAL_BYTES = 16 * 1024 * 1024
HOLD_TIMEOUT = 30.0
ARP_RETRY = 1.0


class PodHold:
    """Which pods hold frames, and when their timeouts and ARP retries are due."""

    def __init__(self, limit: int = HOLD_PACKETS, timeout: float = HOLD_TIMEOUT,
                 arp_retry: float = ARP_RETRY, pod_bytes: int = HOLD_POD_BYTES,
                 total_bytes: int = HOLD_TOTAL_BYTES) -> None:
        self.limit = limit
        self.timeout = timeout
        self.arp_retry = arp_retry
        self.pod_bytes = pod_bytes
        self.total_bytes = total_bytes
        # Pods with held frames and the bytes each holds; a dict so timers visit them in
        # a reproducible order.
        self._held: dict[Pod, int] = {}
        self.bytes = 0

    def add(self, pod: Pod, h: int, frame: bytes, now: float) -> bool:
        """Hold a frame (with an h-byte virtio-net header) for `pod`; False when full."""
        n = len(frame)
        held = self._held.get(pod, 0)
        if (len(pod.pending) >= self.limit or held + n > self.pod_bytes
                or self.bytes + n > self.total_bytes):
            return False
        pod.pending.append((now, h, frame))
        self._held[pod] = held + n
        self.bytes += n
        return True

    def wants_arp(self, pod: Pod, now: float) -> bool:
        """An attached pod whose MAC is unknown and whose ARP retry is due."""
        return pod.port is not None and pod.mac is None and now >= pod.arp_due

    def arped(self, pod: Pod, now: float) -> None:
        pod.arp_due = now + self.arp_retry

    def take(self, pod: Pod) -> list[tuple[float, int, bytes]]:
        """Everything held for `pod`, in arrival order, no longer held."""
        frames = list(pod.pending)
        pod.pending.clear()
        self.bytes -= self._held.pop(pod, 0)
        return frames

    def forget(self, pod: Pod) -> int:
        """Drop what is held for a pod that goes away; how many frames."""
        k = len(pod.pending)
        pod.pending.clear()
        self.bytes -= self._held.pop(pod, 0)
        return k

    def expired(self, now: float) -> list[tuple[int, bytes]]:
        """Frames whose time is up, taken off the hold: (header length, frame)."""
        out: list[tuple[int, bytes]] = []
        timeout = self.timeout
        for pod in list(self._held):
            q = pod.pending
            # The same sum next_timer() computes, so handling a timer at its due time
            # always expires what made it due (now - timeout can round below it).
            gone = 0
            while q and q[0][0] + timeout <= now:
                _, h, frame = q.popleft()
                gone += len(frame)
                out.append((h, frame))
            self.bytes -= gone
            if q:
                self._held[pod] -= gone
            else:
                del self._held[pod]
        return out

    def arp_due(self, now: float) -> list[Pod]:
        return [pod for pod in self._held if self.wants_arp(pod, now)]

    def next_timer(self) -> float | None:
        t: float | None = None
        timeout = self.timeout
        for pod in self._held:
            if pod.pending:
                d = pod.pending[0][0] + timeout
                t = d if t is None or d < t else t
                if pod.port is not None and pod.mac is None:
                    t = pod.arp_due if pod.arp_due < t else t
        return t

    def held(self) -> int:
        return sum(len(p.pending) for p in self._held)
