"""A backend's complete response before the client finished its request (RFC 9113 8.1).

A server "MAY request that the client abort transmission of a request without error by
sending a RST_STREAM with an error code of NO_ERROR after sending a complete response";
Go's server and nghttpd --early-response do, and curl 7.88 uploads for ever without it once the
backend reads no more of the body. The activator relays a backend's own reset in order
behind the response, and resets the client's stream itself when the backend did not,
dropping what the client still sends on it but crediting the connection window for it
exactly once. Python ``h2`` plays both peers, as in test_http2_activator.py.
"""

from __future__ import annotations

import h2.errors
import h2.events
import h2.settings
from hyperframe.frame import DataFrame, RstStreamFrame, WindowUpdateFrame

from fabric.activator import abi
from tests.unit.test_http2_activator import NONE, SID, Rig, frames_of, req

NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
CANCEL = h2.errors.ErrorCodes.CANCEL


def counted(r: Rig, name: str) -> int:
    return sum(a.n for a in r.g.actions if isinstance(a, abi.Count) and a.name == name)


def backend_frames(r: Rig) -> list[object]:
    """Every frame the activator ever sent the backend (after the connection preface)."""
    data = b"".join(a.data for a in r.g.actions if isinstance(a, abi.UpstreamSend))
    return frames_of(data[24:])


def post_started(r: Rig, first: int) -> None:
    """Stream 1: a POST whose first `first` body bytes reach the backend, then a backend."""
    r.c.send_headers(1, req("/up", "POST"))
    r.c.send_data(1, b"u" * first)
    r.pump()
    r.connect_backend()
    got = sum(len(e.data) for e in r.of(r.sev, h2.events.DataReceived) if e.stream_id == 1)
    assert got == first


def test_complete_response_before_the_upload_resets_the_client_stream() -> None:
    """The backend answers (END_STREAM) and neither reads on nor resets: the client gets
    the whole response, then RST_STREAM(NO_ERROR); the backend RST_STREAM(CANCEL). DATA
    the client had in flight is dropped, and the connection window credited for exactly
    what the client sent: its window is whole again, and the next upload on the same
    connection goes through."""
    r = Rig()
    try:
        post_started(r, 16384)
        assert r.s is not None
        r.s.send_headers(1, [(":status", "200")])
        r.s.send_data(1, b"done", end_stream=True)
        answer = r.s.data_to_send()
        # the client keeps uploading before it reads the answer (30,000 bytes in flight)
        r.c.send_data(1, b"v" * 16000)
        r.c.send_data(1, b"v" * 14000)
        in_flight = r.c.data_to_send()
        r.g.backend(SID, answer)
        down = frames_of(r.g.to_client(SID))
        kinds = [(type(f).__name__, f.stream_id) for f in down]
        assert kinds == [("HeadersFrame", 1), ("DataFrame", 1), ("RstStreamFrame", 1)], kinds
        assert "END_STREAM" in down[1].flags and down[1].data == b"done"
        assert down[2].error_code == NO_ERROR
        up = frames_of(r.g.to_backend(SID))
        assert [(type(f).__name__, f.stream_id, f.error_code) for f in up] == [
            ("RstStreamFrame", 1, CANCEL)]
        r.sev += r.s.receive_data(b"".join(f.serialize() for f in up))
        assert [e.error_code for e in r.of(r.sev, h2.events.StreamReset)] == [CANCEL]
        assert r.g.need == NONE
        assert counted(r, "early_responses") == 1

        # what the client sent before it read the reset: dropped, credited on the connection
        r.g.client(SID, in_flight)
        assert not any(isinstance(f, DataFrame) for f in frames_of(r.g.to_backend(SID)))
        credit = frames_of(r.g.to_client(SID))
        assert all(isinstance(f, WindowUpdateFrame) and f.stream_id == 0 for f in credit), credit
        assert sum(f.window_increment for f in credit) == 16384 + 30000
        r.cev += r.c.receive_data(b"".join(f.serialize() for f in down + credit))
        ev = [type(e).__name__ for e in r.cev if getattr(e, "stream_id", 0) == 1]
        assert ev[-4:] == ["ResponseReceived", "DataReceived", "StreamEnded", "StreamReset"], ev
        assert r.of(r.cev, h2.events.StreamReset)[0].error_code == NO_ERROR
        assert r.c.outbound_flow_control_window == 65535  # every byte credited, once

        # the connection still serves: a 200 KiB upload on stream 3 reaches the backend
        body = bytes(range(256)) * 800
        r.c.send_headers(3, req("/again", "POST"))
        sent = 0
        got = bytearray()
        for _ in range(1000):
            while sent < len(body):
                room = min(r.c.local_flow_control_window(3), r.c.max_outbound_frame_size)
                if room <= 0:
                    break
                r.c.send_data(3, body[sent:sent + room], end_stream=sent + room >= len(body))
                sent += len(body[sent:sent + room])
            r.pump()
            for e in r.of(r.sev, h2.events.DataReceived):
                if e.stream_id == 3:
                    got += e.data
                    r.s.acknowledge_received_data(e.flow_controlled_length, 3)
            r.sev.clear()
            if len(got) == len(body):
                break
        assert bytes(got) == body
        r.respond(3)
        assert r.responses()[3][":status"] == "200"
        assert r.g.failed == 0
    finally:
        r.close()


def test_backend_reset_after_its_response_is_relayed_behind_it() -> None:
    """The backend answers and resets the stream itself, as nghttpd and Go's server do:
    its RST_STREAM(NO_ERROR) reaches the client after the whole response, even a response
    that waits for the client's stream window, and the activator adds no reset of its own
    either way."""
    r = Rig()
    try:
        r.c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        post_started(r, 100)
        assert r.s is not None
        r.s.send_headers(1, [(":status", "200")])
        r.s.send_data(1, b"a" * 5000, end_stream=True)
        r.s.reset_stream(1, NO_ERROR)
        r.pump()
        got = 0
        for _ in range(20):  # the client reads: its WINDOW_UPDATEs move the rest
            for e in r.of(r.cev, h2.events.DataReceived):
                if e.stream_id == 1 and not getattr(e, "acked", False):
                    got += len(e.data)
                    r.c.acknowledge_received_data(e.flow_controlled_length, 1)
                    e.acked = True
            r.pump()
        assert got == 5000
        ev = [type(e).__name__ for e in r.cev
              if getattr(e, "stream_id", 0) == 1 and not isinstance(e, h2.events.DataReceived)]
        assert ev[-3:] == ["ResponseReceived", "StreamEnded", "StreamReset"], ev
        resets = r.of(r.cev, h2.events.StreamReset)
        assert [e.error_code for e in resets] == [NO_ERROR]
        assert not [f for f in backend_frames(r) if isinstance(f, RstStreamFrame)]
        assert counted(r, "early_responses") == 1
        assert r.g.need == NONE
    finally:
        r.close()


def test_client_reset_drops_a_response_queued_behind_a_reset() -> None:
    """A response waiting for the client's window behind the backend's RST_STREAM, and
    the client resets the stream: nothing of it is sent any more, and the backend's
    connection window is credited for the bytes dropped."""
    r = Rig()
    try:
        r.c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        post_started(r, 100)
        assert r.s is not None
        r.s.send_headers(1, [(":status", "200")])
        for n in (16384, 16384, 7232):
            r.s.send_data(1, b"a" * n, end_stream=n == 7232)
        r.s.reset_stream(1, NO_ERROR)
        r.g.backend(SID, r.s.data_to_send())
        first = frames_of(r.g.to_client(SID))
        assert sum(len(f.data) for f in first if isinstance(f, DataFrame)) == 1000
        rst = RstStreamFrame(1)
        rst.error_code = CANCEL
        grant = WindowUpdateFrame(1)
        grant.window_increment = 10000
        r.g.client(SID, rst.serialize() + grant.serialize())
        after = frames_of(r.g.to_client(SID))
        assert not [f for f in after if f.stream_id == 1], after
        credit = sum(f.window_increment for f in backend_frames(r)
                     if isinstance(f, WindowUpdateFrame) and f.stream_id == 0)
        assert credit == 40000  # 1000 handed on, 39,000 dropped
        assert r.g.failed == 0
    finally:
        r.close()
