"""TCP connection tracking as one transition table, for every NAT of the fabric.

Egress NAT and service DNAT both need to know little about a TCP connection: whether
it is still opening, established, half-closed or over, so that each phase gets its own
timeout and a service can tell when its last connection ended. That knowledge lives
here once, as data: ``TRANSITIONS[(state, direction, event)] -> new state``, in the
style of h11's ``_state.py``. A missing entry means "no change". Everything that reads a
TCP header turns it into an event with ``event(flags)`` and asks ``advance()``.

Directions: ``ORIG`` is the side that created the flow (a pod going out, a client of a
service), ``REPLY`` the other side (the remote host, the backend).

States
    ``NEW``          created by a segment that was not a SYN (picked up mid-stream, after
                     a restart): nothing confirmed yet
    ``SYN_SENT``     the originator sent SYN
    ``SYN_RECV``     the other side answered SYN+ACK
    ``ESTABLISHED``  the handshake completed, or both sides were seen talking mid-stream
    ``FIN_ORIG``     the originator closed its side (FIN); the other side still sends
    ``FIN_REPLY``    the other side closed its side
    ``CLOSED``       FIN both ways or a RST: only stragglers are left

Rules worth knowing (they follow Linux's nf_conntrack where it matters):
- A SYN on an established or half-closed connection changes nothing: it is a stray
  retransmission or an attack, not a new connection.
- A pure SYN from the originator on a ``CLOSED`` connection *reopens* it (a client
  reusing its port after TIME_WAIT): ``reopens()`` says so, and each user decides what
  that means (egress keeps the mapping; a service picks a backend afresh).
- A flow picked up mid-stream becomes established when the other side is seen too.
"""

from __future__ import annotations

from typing import Final

from fabric.net.packets import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

# --- states ---------------------------------------------------------------------------
NEW: Final = 0
SYN_SENT: Final = 1
SYN_RECV: Final = 2
ESTABLISHED: Final = 3
FIN_ORIG: Final = 4
FIN_REPLY: Final = 5
CLOSED: Final = 6
STATE_NAMES: Final = ("new", "syn_sent", "syn_recv", "established", "fin_orig", "fin_reply",
                      "closed")

# --- directions -----------------------------------------------------------------------
ORIG: Final = 0
REPLY: Final = 1

# --- events (what a segment's flags amount to) ------------------------------------------
EV_NONE: Final = 0  # no SYN, FIN, RST or ACK: nothing to learn
EV_SYN: Final = 1  # SYN without ACK
EV_SYNACK: Final = 2
EV_ACK: Final = 3  # ACK (with or without data), no SYN/FIN/RST
EV_FIN: Final = 4
EV_RST: Final = 5
EVENT_NAMES: Final = ("none", "syn", "synack", "ack", "fin", "rst")

# The one table. Entries that would not change the state are left out.
TRANSITIONS: Final[dict[tuple[int, int, int], int]] = {
    # originator
    (NEW, ORIG, EV_SYN): SYN_SENT,
    (NEW, ORIG, EV_RST): CLOSED,
    (SYN_SENT, ORIG, EV_RST): CLOSED,
    (SYN_RECV, ORIG, EV_ACK): ESTABLISHED,
    (SYN_RECV, ORIG, EV_FIN): FIN_ORIG,
    (SYN_RECV, ORIG, EV_RST): CLOSED,
    (ESTABLISHED, ORIG, EV_FIN): FIN_ORIG,
    (ESTABLISHED, ORIG, EV_RST): CLOSED,
    (FIN_ORIG, ORIG, EV_RST): CLOSED,
    (FIN_REPLY, ORIG, EV_FIN): CLOSED,
    (FIN_REPLY, ORIG, EV_RST): CLOSED,
    (CLOSED, ORIG, EV_SYN): SYN_SENT,  # reopened: see reopens()
    # the other side
    (NEW, REPLY, EV_SYNACK): SYN_RECV,
    (NEW, REPLY, EV_ACK): ESTABLISHED,  # picked up mid-stream: both sides talk
    (NEW, REPLY, EV_FIN): FIN_REPLY,
    (NEW, REPLY, EV_RST): CLOSED,
    (SYN_SENT, REPLY, EV_SYNACK): SYN_RECV,
    (SYN_SENT, REPLY, EV_RST): CLOSED,
    (SYN_RECV, REPLY, EV_RST): CLOSED,
    (ESTABLISHED, REPLY, EV_FIN): FIN_REPLY,
    (ESTABLISHED, REPLY, EV_RST): CLOSED,
    (FIN_ORIG, REPLY, EV_FIN): CLOSED,
    (FIN_ORIG, REPLY, EV_RST): CLOSED,
    (FIN_REPLY, REPLY, EV_RST): CLOSED,
}

# Which timeout of a FlowPolicy each state uses.
T_SYN: Final = 0
T_ESTABLISHED: Final = 1
T_CLOSED: Final = 2
TIMEOUT_CLASS: Final = (T_SYN, T_SYN, T_SYN, T_ESTABLISHED, T_ESTABLISHED, T_ESTABLISHED,
                        T_CLOSED)

_SYN_FIN_RST = TCP_SYN | TCP_FIN | TCP_RST


def event(flags: int) -> int:
    """The event a segment with these TCP flags is (RST over SYN over FIN over ACK)."""
    if flags & TCP_RST:
        return EV_RST
    if flags & TCP_SYN:
        return EV_SYNACK if flags & TCP_ACK else EV_SYN
    if flags & TCP_FIN:
        return EV_FIN
    return EV_ACK if flags & TCP_ACK else EV_NONE


def advance(state: int, direction: int, flags: int) -> int:
    """The state after a segment with `flags` went `direction`."""
    return TRANSITIONS.get((state, direction, event(flags)), state)


def reopens(state: int, flags: int) -> bool:
    """A pure SYN from the originator on a closed connection: a new connection that
    reuses the tuple."""
    return state == CLOSED and flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN


def may_change(state: int, flags: int) -> bool:
    """False when a segment cannot change `state` whatever its direction: the hot path
    skips the table for data segments of established connections."""
    return state != ESTABLISHED or bool(flags & _SYN_FIN_RST)
