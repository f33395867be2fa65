"""What a NAT's packet call answers, shared by egress NAT and service DNAT and read by
the router. A packet is rewritten in place only when the verdict is ``OK``."""

from __future__ import annotations

from typing import Final

OK: Final = 0  # translated in place: route by the new addresses
DENIED: Final = 1  # egress to a destination outside the allow list
FULL: Final = 2  # no flow slot or no free port: drop and count
UNSUPPORTED: Final = 3  # not TCP/UDP/ICMP echo, or a later fragment with no first one
MALFORMED: Final = 4
NO_FLOW: Final = 5  # a reply, later fragment or ICMP error that belongs to no flow

NAMES: Final = ("ok", "denied", "full", "unsupported", "malformed", "no_flow")
