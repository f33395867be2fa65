"""A small, fast HTTP/1.1 keep-alive server for benchmarks: `python h1server.py PORT`.

Why not http.server: a thread per connection and a parse in Python per header line cap
it at a few hundred requests/s on a shared machine, which would hide what an activator in
front of it costs. This one is asyncio, answers every request (pipelined ones in order)
with the same 13-byte body, reads Content-Length bodies, and nothing else: enough for wrk.
"""

from __future__ import annotations

import asyncio
import sys

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nhello http/1\n"


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: answer each request as soon as its head (and body) is read."""
    buf = b""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            buf += data
            out = []
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                head = buf[:end].lower()
                n = 0
                at = head.find(b"\r\ncontent-length:")
                if at >= 0:
                    n = int(head[at + 17:].split(b"\r\n", 1)[0])
                if len(buf) < end + 4 + n:
                    break
                buf = buf[end + 4 + n:]
                out.append(ANSWER)
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
