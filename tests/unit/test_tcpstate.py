"""fabric.flows.tcpstate, state by state: every (state, direction, event) against a
specification written out here independently of the table's code."""

from __future__ import annotations

import itertools

import pytest

from fabric.flows import tcpstate as T
from fabric.net.packets import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN

TCP_URG = 0x20

# The rules, one line per change of state. Everything not listed keeps its state.
SPEC = """
new         orig   syn     syn_sent
new         orig   rst     closed
new         reply  synack  syn_recv
new         reply  ack     established
new         reply  fin     fin_reply
new         reply  rst     closed
syn_sent    orig   rst     closed
syn_sent    reply  synack  syn_recv
syn_sent    reply  rst     closed
syn_recv    orig   ack     established
syn_recv    orig   fin     fin_orig
syn_recv    orig   rst     closed
syn_recv    reply  rst     closed
established orig   fin     fin_orig
established orig   rst     closed
established reply  fin     fin_reply
established reply  rst     closed
fin_orig    orig   rst     closed
fin_orig    reply  fin     closed
fin_orig    reply  rst     closed
fin_reply   orig   fin     closed
fin_reply   orig   rst     closed
fin_reply   reply  rst     closed
closed      orig   syn     syn_sent
"""

STATES = {name: i for i, name in enumerate(T.STATE_NAMES)}
EVENTS = {name: i for i, name in enumerate(T.EVENT_NAMES)}
DIRS = {"orig": T.ORIG, "reply": T.REPLY}
EXPECTED = {(STATES[s], DIRS[d], EVENTS[e]): STATES[n]
            for s, d, e, n in (line.split() for line in SPEC.strip().splitlines())}
# A representative flag combination for each event.
FLAGS = {"none": 0, "syn": TCP_SYN, "synack": TCP_SYN | TCP_ACK, "ack": TCP_ACK | TCP_PSH,
         "fin": TCP_FIN | TCP_ACK, "rst": TCP_RST | TCP_ACK}


@pytest.mark.parametrize("state,direction,ev", list(itertools.product(
    T.STATE_NAMES, ("orig", "reply"), T.EVENT_NAMES)))
def test_every_transition(state: str, direction: str, ev: str) -> None:
    key = (STATES[state], DIRS[direction], EVENTS[ev])
    want = EXPECTED.get(key, STATES[state])
    assert T.advance(STATES[state], DIRS[direction], FLAGS[ev]) == want
    assert T.TRANSITIONS.get(key, key[0]) == want


def test_the_table_holds_only_changes() -> None:
    assert set(T.TRANSITIONS) == set(EXPECTED)
    assert all(new != key[0] for key, new in T.TRANSITIONS.items())


@pytest.mark.parametrize("flags,ev", [
    (0, "none"), (TCP_PSH, "none"), (TCP_URG, "none"), (TCP_ACK, "ack"),
    (TCP_ACK | TCP_PSH, "ack"), (TCP_SYN, "syn"), (TCP_SYN | TCP_ACK, "synack"),
    (TCP_FIN, "fin"), (TCP_FIN | TCP_ACK, "fin"), (TCP_FIN | TCP_SYN, "syn"),
    (TCP_RST, "rst"), (TCP_RST | TCP_SYN, "rst"), (TCP_RST | TCP_FIN | TCP_ACK, "rst"),
])
def test_events_rst_over_syn_over_fin_over_ack(flags: int, ev: str) -> None:
    assert T.EVENT_NAMES[T.event(flags)] == ev


def test_a_full_connection_both_closes() -> None:
    st = T.NEW
    for d, f in [(T.ORIG, TCP_SYN), (T.REPLY, TCP_SYN | TCP_ACK), (T.ORIG, TCP_ACK),
                 (T.ORIG, TCP_ACK | TCP_PSH), (T.REPLY, TCP_ACK)]:
        st = T.advance(st, d, f)
    assert st == T.ESTABLISHED
    assert T.advance(T.advance(st, T.REPLY, TCP_FIN | TCP_ACK), T.ORIG,
                     TCP_FIN | TCP_ACK) == T.CLOSED


def test_reopen_only_by_a_pure_syn_on_a_closed_connection() -> None:
    assert T.reopens(T.CLOSED, TCP_SYN)
    assert not T.reopens(T.CLOSED, TCP_SYN | TCP_ACK)
    assert not T.reopens(T.CLOSED, TCP_SYN | TCP_RST)
    for st in range(T.CLOSED):
        assert not T.reopens(st, TCP_SYN)


def test_timeout_classes() -> None:
    by_class = {T.T_SYN: {"new", "syn_sent", "syn_recv"},
                T.T_ESTABLISHED: {"established", "fin_orig", "fin_reply"},
                T.T_CLOSED: {"closed"}}
    for cls, names in by_class.items():
        assert {T.STATE_NAMES[s] for s, c in enumerate(T.TIMEOUT_CLASS) if c == cls} == names


@pytest.mark.parametrize("flags", range(64))
def test_may_change_is_exact_for_established(flags: int) -> None:
    """The hot path skips the table only when no direction could change the state."""
    changes = any(T.advance(T.ESTABLISHED, d, flags) != T.ESTABLISHED
                  for d in (T.ORIG, T.REPLY))
    if changes:
        assert T.may_change(T.ESTABLISHED, flags)
    for st in range(len(T.STATE_NAMES)):
        if st != T.ESTABLISHED:
            assert T.may_change(st, flags)
