"""Traps a person can act on: a debug build's trap names the file:line of the instruction,
through the real host (its log line and last_failure) and the harness; a stripped build
reports as before; malformed debug info never breaks a trap report."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.activator import abi as A
from fabric.activator import dwarf
from fabric.activator.host import ActivatorHost
from fabric.cli.main import main
from tests.unit.test_activator_harness import handshake, http_session, seg, write

ROOT = Path(__file__).resolve().parents[2]
ACT = ROOT / "activators"
sys.path.insert(0, str(ACT))
import build  # noqa: E402  (activators/build.py: the one place the build flags live)

PACKET = A.Packet(7, 0, b"E" + bytes(39))


def trap_line(src: Path) -> int:
    """The 1-based line of the source's only trapping instruction."""
    lines = [i for i, text in enumerate(src.read_text().splitlines(), 1)
             if "__builtin_trap()" in text]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def debug(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Debug builds (build.py's debug flags, the pinned ziglang) of the trapping modules."""
    out = tmp_path_factory.mktemp("debug")
    built = {}
    for name in ("trap", "streamtrap"):
        built[name] = out / f"{name}.wasm"
        build.compile_one(ACT / "testing" / f"{name}.c", built[name], out / "cache",
                          debug=True)
    return built


def where(name: str) -> str:
    """``testing/trap.c:6`` (and a column) as a regex, from the source."""
    return rf"testing/{name}\.c:{trap_line(ACT / 'testing' / f'{name}.c')}(:\d+)?\)"


def test_the_debug_flags_keep_dwarf_and_the_release_flags_strip() -> None:
    flags = build.debug_cflags()
    assert "-g" in flags and not {"-g0", "-s", "-Wl,--strip-all"} & set(flags)
    assert {"-g0", "-s", "-Wl,--strip-all"} <= set(build.CFLAGS)
    assert build.debug_cflags(("-O", "ReleaseFast", "-fstrip")) == ("-O", "ReleaseFast")


def test_a_debug_trap_names_file_and_line_in_the_log_and_last_failure(
        debug: dict[str, Path], caplog: Any) -> None:
    with ActivatorHost(debug["trap"]) as host, \
            caplog.at_level(logging.WARNING, logger="fabric.activator.host"):
        assert host.process(80, [A.Tick(1), PACKET]) is None
        f = host.last_failure
        assert f is not None and f["reason"] == "traps", f
        assert re.fullmatch(r"fab_process\+0x[0-9a-f]+ \(" + where("trap"), f["frames"][0]), f
        assert f["events"] == "2: tick, packet(#7, 40 B)" and f["fuel_used"] > 0
        line = caplog.records[-1].getMessage()
        assert re.search(r"at fab_process\+0x[0-9a-f]+ \(" + where("trap"), line), line
        # the instance is recreated and traps again: same report, the DWARF parsed once
        parses = dwarf.cache.parses
        assert host.process(80, [PACKET]) is None
        assert host.last_failure["frames"] == f["frames"] and dwarf.cache.parses == parses


def test_the_module_offset_is_the_dwarf_address(debug: dict[str, Path]) -> None:
    """wasm DWARF addresses are offsets in the Code payload: the frame's module_offset
    less the payload's start (not func_offset, which is relative to the function)."""
    import wasmtime

    wasm = debug["trap"].read_bytes()
    sm = dwarf.parse(wasm)
    assert sm.code_start is not None and not sm.problem and sm.rows > 0
    with ActivatorHost(wasm) as host:
        inst = host.instance(80)
        with pytest.raises(wasmtime.Trap) as e:
            inst._run(A.encode_batch([PACKET]), 1, 1)
    frame = e.value.frames[0]
    loc = sm.at(frame.module_offset - sm.code_start)
    assert loc is not None and loc.line == trap_line(ACT / "testing" / "trap.c"), loc
    assert sm.at(frame.func_offset) != loc


def test_a_stripped_module_reports_as_before() -> None:
    wasm = (ACT / "testing" / "trap.wasm").read_bytes()
    assert dwarf.SourceIndex.probe(wasm) is None  # nothing kept, nothing parsed
    with ActivatorHost(wasm) as host:
        assert host.process(80, [PACKET]) is None
        assert host.last_failure is not None
        frames = host.last_failure["frames"]
    assert len(frames) == 1 and re.fullmatch(r"func\[\d+\]\+0x[0-9a-f]+", frames[0]), frames


def test_the_harness_shows_file_and_line(debug: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["activator", "test", str(debug["trap"]), "--pcap",
               str(http_session(tmp_path)), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert re.search(r"unreachable.* at fab_process\+0x[0-9a-f]+ \(" + where("trap"), err[0])
    pkts = handshake() + [seg(0.01, "PA", 101, 501, b"TRAP now")]
    rc = main(["activator", "test", str(debug["streamtrap"]), "--pcap",
               str(write(tmp_path, "t.pcap", pkts)), "--backend-ready-at", "0", "-o", "json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    f = out["summary"]["failures"][0]
    assert re.fullmatch(r"fab_process\+0x[0-9a-f]+ \(" + where("streamtrap"), f["frames"][0])
    assert "stream_data(#1, 8 B)" in f["events"]
    text = [r["detail"] for r in out["records"] if r["kind"] == "failure"]
    assert text and re.search(where("streamtrap"), text[0]), text


def test_a_line_program_over_the_bound_is_not_decoded(debug: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dwarf, "MAX_LINE_PROGRAM", 64)
    sm = dwarf.parse(debug["trap"].read_bytes())
    assert sm.rows == 0 and "over 64" in sm.problem
    assert sm.function(3) == "fab_process"  # the name section is still read


# --- malformed debug info ---------------------------------------------------------------


def _spans(wasm: bytes) -> list[tuple[int, int]]:
    _, custom = dwarf.sections(wasm)
    return [span for name, span in custom.items() if name.startswith(".debug_")]


@pytest.fixture(scope="module")
def debug_bytes(debug: dict[str, Path]) -> bytes:
    return debug["trap"].read_bytes()


@settings(max_examples=300)
@given(data=st.data())
def test_corrupt_dwarf_never_raises(debug_bytes: bytes, data: st.DataObject) -> None:
    """Bytes of the DWARF sections overwritten at random: parse and every lookup return,
    with a Location or None, never an exception."""
    buf = bytearray(debug_bytes)
    spans = _spans(debug_bytes)
    for _ in range(data.draw(st.integers(1, 24))):
        lo, hi = data.draw(st.sampled_from(spans))
        at = data.draw(st.integers(lo, hi - 1))
        buf[at] = data.draw(st.integers(0, 255))
    sm = dwarf.parse(bytes(buf))
    for off in data.draw(st.lists(st.integers(0, len(buf) + 8), max_size=8)):
        loc = sm.locate(off)
        assert loc is None or (isinstance(loc, dwarf.Location) and loc.line > 0)


def _custom(name: str, body: bytes) -> bytes:
    payload = bytes([len(name)]) + name.encode() + body
    return b"\0" + _uleb(len(payload)) + payload


def _uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@settings(max_examples=200)
@given(sections=st.dictionaries(
    st.sampled_from([".debug_info", ".debug_abbrev", ".debug_line", ".debug_str",
                     ".debug_line_str", ".debug_ranges", ".debug_rnglists", "name"]),
    st.binary(max_size=96), min_size=1), tail=st.binary(max_size=16))
def test_arbitrary_debug_sections_never_raise(sections: dict[str, bytes], tail: bytes) -> None:
    wasm = b"\0asm\1\0\0\0" + b"".join(_custom(k, v) for k, v in sections.items()) + tail
    sm = dwarf.parse(wasm)
    assert sm.locate(len(wasm) // 2) is None or sm.rows > 0
    idx = dwarf.SourceIndex(wasm)
    idx.locate(0)
    idx.function(0)


def test_a_module_with_corrupt_dwarf_still_traps_with_its_report(debug_bytes: bytes) -> None:
    buf = bytearray(debug_bytes)
    _, custom = dwarf.sections(debug_bytes)
    lo, hi = custom[".debug_line"]
    buf[lo:hi] = b"\xff" * (hi - lo)
    with ActivatorHost(bytes(buf)) as host:
        assert host.process(80, [PACKET]) is None
        f = host.last_failure
    assert f is not None and re.fullmatch(r"fab_process\+0x[0-9a-f]+", f["frames"][0]), f
    assert "unreachable" in f["message"]
