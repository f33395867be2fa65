"""A small, fast HTTP/1.1 keep-alive server for benchmarks: `python h1server.py PORT`.

Why not http.server: a thread per connection and a parse in Python per header line cap
it at a few hundred requests/s on a shared machine, which would hide what an activator in
front of it costs. This one is asyncio, answers every GET (pipelined ones in order)
with the same 13-byte body and a request with a body (Content-Length or chunked) with its
length, sends 100 Continue for Expect: 100-continue, and nothing else.
"""

from __future__ import annotations

import asyncio
import sys

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nhello http/1\n"


def chunked(buf: bytes, at: int) -> tuple[int, int] | None:
    """(end, body length) of a chunked body starting at `at`, or None while incomplete."""
    size = 0
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            return None
        n = int(buf[at:eol].split(b";")[0], 16)
        at = eol + 2
        if n == 0:
            end = buf.find(b"\r\n\r\n", at - 2)  # trailers, then the empty line
            return (end + 4, size) if end >= 0 else None
        if len(buf) < at + n + 2:
            return None
        size += n
        at += n + 2


def answer(head: bytes, size: int) -> bytes:
    """200 hello for a GET; for a request with a body, how many bytes it had."""
    if head.startswith((b"get ", b"head ")):
        return ANSWER
    body = b"got %d bytes\n" % size
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: answer each request as soon as its head (and body) is read; a
    100 Continue as soon as a head with Expect: 100-continue is in."""
    buf = b""
    continued = -1
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            buf += data
            out = []
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                head = buf[:end].lower()
                if b"\r\nexpect: 100-continue" in head and continued != end:
                    out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
                    continued = end
                if b"\r\ntransfer-encoding: chunked" in head:
                    got = chunked(buf, end + 4)
                    if got is None:
                        break
                    stop, size = got
                else:
                    size = 0
                    at = head.find(b"\r\ncontent-length:")
                    if at >= 0:
                        size = int(head[at + 17:].split(b"\r\n", 1)[0])
                    stop = end + 4 + size
                    if len(buf) < stop:
                        break
                buf = buf[stop:]
                continued = -1
                out.append(answer(head, size))
            if out:
                writer.write(b"".join(out))
                await writer.drain()
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "0.0.0.0", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
