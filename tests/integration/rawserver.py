"""A scripted HTTP/1.1 backend for tests: records every raw byte received, answers by --mode.

Modes:
  ok          answer 200 "ok" with Content-Length, keep-alive
  close       answer 200 then close the connection without saying so (stale pooled conns)
  reset       read the request, then close without answering (reset before response)
  hang        read the request, never answer
  garbage     answer something that is not HTTP
  head-then-die  send a response head with Content-Length 100 and 10 body bytes, then close
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", default="ok")
    ap.add_argument("--record", required=True)
    args = ap.parse_args()
    record = open(args.record, "ab", buffering=0)  # noqa: SIM115
    conns = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                lower = head.lower()
                if b"transfer-encoding: chunked" in lower:
                    while True:
                        size_line = await reader.readuntil(b"\r\n")
                        size = int(size_line.split(b";")[0], 16)
                        chunk = await reader.readexactly(size + 2)
                        body += size_line + chunk
                        if size == 0:
                            break
                else:
                    for line in lower.split(b"\r\n"):
                        if line.startswith(b"content-length:"):
                            body = await reader.readexactly(int(line.split(b":")[1]))
                record.write(head + body + b"\n--END--\n")
                mode = args.mode
                if mode == "reset":
                    writer.transport.abort()
                    return
                if mode == "hang":
                    await asyncio.sleep(3600)
                if mode == "garbage":
                    writer.write(b"this is not http\r\n\r\n")
                    await writer.drain()
                    writer.close()
                    return
                if mode == "head-then-die":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                    await writer.drain()
                    writer.transport.abort()
                    return
                payload = b"ok conn=%d\n" % conns
                # "upgrade-offer": what Apache with mod_http2 sends on every answer
                offer = (
                    b"Upgrade: h2,h2c\r\nConnection: Upgrade\r\n"
                    if mode == "upgrade-offer"
                    else b""
                )
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Raw: 1\r\n%b\r\n%b"
                    % (len(payload), offer, payload)
                )
                await writer.drain()
                if mode == "close":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port, limit=1 << 20)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
