"""The C SDK's own data structures (activators/sdk/c/fabricd.h), through the real host.

activators/testing/sdkcheck.c turns events into commands: the table against a dict model
under random operations (small capacity, so probe runs wrap and the table fills), the
JSON reader against Python's json, the pool's bounds and fab_logf's formats.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.activator import abi as A
from fabric.activator.host import ActivatorHost, ActivatorInstance

WASM = Path(__file__).resolve().parents[2] / "activators" / "testing" / "sdkcheck.wasm"
CAP = 16


@pytest.fixture(scope="module")
def host() -> Iterator[ActivatorHost]:
    with ActivatorHost(WASM) as h:
        yield h


def fresh(host: ActivatorHost, port: int) -> ActivatorInstance:
    host.instances.pop(port, None)
    return host.instance(port)


def call(inst: ActivatorInstance, *events: A.Event) -> list[A.Record]:
    out = inst.process(list(events), streams=1)
    assert out is not None, inst.last_failure
    return out


def sent(actions: list[A.Record]) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, A.DownstreamSend)]


def home(key: int) -> int:
    return (key * 2654435761) & (2 * CAP - 1)


# Keys with few homes, so runs form, overlap and wrap past the last index slot.
KEYS = [k for k in range(1, 2000) if home(k) in (0, 1, 17, 30, 31)][:24] + [0xFFFFFFFF]
OPS = st.lists(st.tuples(st.sampled_from([1, 1, 2, 3]), st.sampled_from(KEYS)),
               min_size=20, max_size=300)


def test_table_keeps_a_run_findable_after_deleting_its_head(host: ActivatorHost) -> None:
    inst = fresh(host, 1)
    a, b, c = [k for k in KEYS if home(k) == 17][:3]
    for op, key, found in [(1, a, 1), (1, b, 1), (1, c, 1), (2, a, 1), (3, b, 1), (3, c, 1),
                           (3, a, 0)]:
        (reply,) = sent(call(inst, A.StreamOpen(key, op)))
        assert reply[0] == found, (op, key)


@settings(max_examples=200, deadline=None)
@given(ops=OPS)
def test_table_matches_a_dict(host: ActivatorHost, ops: list[tuple[int, int]]) -> None:
    inst = fresh(host, 1)
    model: set[int] = set()
    for op, key in ops:
        (reply,) = sent(call(inst, A.StreamOpen(key & 0xFFFFFFFF, op)))
        found, count = reply[0], reply[1] | reply[2] << 8
        if op == 1:
            expect = key not in model and len(model) < CAP
            if expect:
                model.add(key)
        elif op == 2:
            expect = key in model
            model.discard(key)
        else:
            expect = key in model
        assert (bool(found), count) == (expect, len(model)), (op, key)
    # every key still present is still found after all the shifting
    for key in model:
        (reply,) = sent(call(inst, A.StreamOpen(key, 3)))
        assert reply[0] == 1
    assert inst.stats.traps == 0


def probe(inst: ActivatorInstance, text: bytes) -> tuple[int, int, bytes | None, list[int]]:
    (r,) = sent(call(inst, A.StreamData(0, text)))
    n = struct.unpack_from("<I", r)[0]
    b = r[4]
    sl = r[5]
    s = None if sl == 255 else r[6:6 + sl]
    at = 6 + (0 if s is None else sl)
    k = r[at]
    return n, b, s, list(r[at + 1:at + 1 + k])


def test_json_reader_reads_top_level_keys_only(host: ActivatorHost) -> None:
    inst = fresh(host, 2)
    doc = {"x": {"n": 1, "s": "inner"}, "n": 42, "b": True, "s": "a\"b\\c\u0041",
           "a": [1, 2, [3, 4], {"q": 5}, 250]}
    n, b, s, arr = probe(inst, json.dumps(doc, indent=2).encode())
    assert (n, b, s) == (42, 1, b'a"b\\cA')
    assert arr == [1, 2, 255, 255, 250]  # nested values are not integers
    assert probe(inst, b'{"n": -1, "b": false}')[:3] == (7777, 0, None)
    assert probe(inst, b'{"n": 4294967296}')[0] == 7777  # over 2^32-1: the default
    assert probe(inst, b'{"n": 4294967295}')[0] == 4294967295
    assert probe(inst, b'{"s": "\\u00e9"}')[2] is None  # non-ASCII escapes refused


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | st.text(alphabet='{}[]",:0123456789nbsa \\', max_size=80)
       .map(str.encode))
def test_json_reader_never_traps_on_garbage(host: ActivatorHost, data: bytes) -> None:
    inst = host.instance(3)
    out = inst.process([A.StreamData(0, data)], streams=1)
    assert out is not None, inst.last_failure


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(0, 2**32 - 1) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                        max_size=3),
                    max_leaves=8), st.integers(0, 2**32 - 1))
def test_json_reader_finds_n_whatever_surrounds_it(host: ActivatorHost, other: object,
                                                   n: int) -> None:
    inst = host.instance(4)
    text = json.dumps({"before": other, "n": n, "after": other}).encode()
    assert probe(inst, text)[0] == n


def test_pool_hands_out_at_most_its_blocks(host: ActivatorHost) -> None:
    inst = fresh(host, 5)
    (r,) = sent(call(inst, A.StreamData(1, b"ggggg")))
    assert list(r) == [1, 1, 1, 1, 0]
    (r,) = sent(call(inst, A.StreamData(1, b"pgg")))
    assert list(r) == [2, 1, 0]


def test_logf_formats(host: ActivatorHost) -> None:
    inst = fresh(host, 6)
    logs = [a.message for a in call(inst, A.StreamData(2, b"ok\x01")) if isinstance(a, A.Log)]
    assert logs == ["u=4000000000 d=-42 x=beef s=str c=z b=ok. %"]
