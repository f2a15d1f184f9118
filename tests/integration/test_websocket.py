"""WebSocket through the balancer: a real server process (the `websockets` package, this file
run as a script) and real clients, spliced after 101 Switching Protocols.

Run as a module, this file is the backend:
  python -m tests.integration.test_websocket --port N --name NAME --events FILE
Paths: /echo echoes every message as it came (text or binary); /tick sends "tick N" every
0.25 s and ignores what it gets; /close-after-first closes (code 4001) after echoing one
message; /forbidden refuses the upgrade with 403. Every connection's open and close is
appended to the events file, so a test can tell that the backend side really ended.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import sys
import time
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.integration.harness import Balancer, Processes, config, free_port, wait_port

WS_OPTS = {"ping_interval": None, "max_size": 4 << 20, "close_timeout": 2, "proxy": None}


# -- the backend (run as a module) -----------------------------------------------------------


async def serve(port: int, name: str, events: Path) -> None:
    from websockets.asyncio.server import ServerConnection
    from websockets.asyncio.server import serve as ws_serve
    from websockets.http11 import Request, Response

    log = open(events, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    counter = 0

    def process_request(conn: ServerConnection, request: Request) -> Response | None:
        if request.path == "/forbidden":
            return conn.respond(403, "no websocket for you\n")
        return None

    async def handler(conn: ServerConnection) -> None:
        nonlocal counter
        counter += 1
        cid = counter
        path = conn.request.path  # type: ignore[union-attr]
        log.write(f"open {cid} {path}\n")
        try:
            if path == "/tick":
                n = 0
                while True:
                    await conn.send(f"tick {n}")
                    n += 1
                    await asyncio.sleep(0.25)
            elif path == "/close-after-first":
                await conn.send(await conn.recv())
                await conn.close(4001, "done")
            else:
                async for message in conn:
                    await conn.send(message)
        except ConnectionClosed:
            pass
        finally:
            log.write(f"close {cid} {conn.close_code}\n")

    async with ws_serve(
        handler,
        "127.0.0.1",
        port,
        process_request=process_request,
        ping_interval=None,
        max_size=4 << 20,
        close_timeout=2,
        server_header=f"ws-{name}",
    ):
        await asyncio.Future()


# -- helpers ---------------------------------------------------------------------------------


def ws_backend(procs: Processes, name: str) -> tuple[int, Path]:
    port = free_port()
    events = procs.tmp / f"ws-{name}.events"
    events.touch()
    p = procs.start(
        [
            sys.executable,
            "-m",
            "tests.integration.test_websocket",
            "--port",
            str(port),
            "--name",
            name,
            "--events",
            str(events),
        ],
        log_name=f"ws-{name}.log",
    )
    wait_port(port, p)
    return port, events


def ws_balancer(procs: Processes, **top) -> tuple[Balancer, Path]:  # type: ignore[no-untyped-def]
    port, events = ws_backend(procs, "ws1")
    return procs.balancer(config([("ws1", port)], **top)), events


def opened_and_closed(events: Path) -> tuple[int, int]:
    lines = events.read_text().splitlines()
    return sum(ln.startswith("open ") for ln in lines), sum(ln.startswith("close ") for ln in lines)


def wait_events(events: Path, opened: int, closed: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while opened_and_closed(events) != (opened, closed):
        assert time.monotonic() < deadline, events.read_text()
        time.sleep(0.05)


def run(coro, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """Run one client scenario, bounded in time."""

    async def bounded():  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client-to-server frame (RFC 6455 5.2; clients must mask)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# -- tests -----------------------------------------------------------------------------------


def test_text_and_binary_both_ways_and_a_large_message(procs):
    lb, events = ws_balancer(procs)
    big = os.urandom(1 << 20)  # 1 MiB, incompressible

    async def scenario() -> None:
        async with connect(f"ws://127.0.0.1:{lb.port}/echo", **WS_OPTS) as ws:
            await ws.send("héllo")
            assert await ws.recv() == "héllo"
            await ws.send(b"\x00\x01\xff")
            assert await ws.recv() == b"\x00\x01\xff"
            await ws.send(big)
            assert await ws.recv() == big
            await ws.send("x" * 70000)  # a 64-bit length text frame
            assert await ws.recv() == "x" * 70000
            for i in range(100):
                await ws.send(f"m{i}")
            assert [await ws.recv() for _ in range(100)] == [f"m{i}" for i in range(100)]

    run(scenario())
    wait_events(events, 1, 1)


def test_server_pushes_without_client_traffic(procs):
    lb, events = ws_balancer(procs)

    async def scenario() -> list[str]:
        async with connect(f"ws://127.0.0.1:{lb.port}/tick", **WS_OPTS) as ws:
            return [await ws.recv() for _ in range(4)]

    assert run(scenario()) == ["tick 0", "tick 1", "tick 2", "tick 3"]


def test_client_close_ends_both_connections(procs):
    lb, events = ws_balancer(procs)

    async def scenario() -> int | None:
        async with connect(f"ws://127.0.0.1:{lb.port}/echo", **WS_OPTS) as ws:
            await ws.send("bye")
            assert await ws.recv() == "bye"
            await ws.close(4002, "client leaves")
            return ws.close_code

    assert run(scenario()) == 4002
    wait_events(events, 1, 1)
    assert "close 1 4002" in events.read_text()  # the close frame crossed the balancer
    wait_connections(lb, 0)


def test_server_close_ends_both_connections(procs):
    lb, events = ws_balancer(procs)

    async def scenario() -> tuple[int | None, float]:
        async with connect(f"ws://127.0.0.1:{lb.port}/close-after-first", **WS_OPTS) as ws:
            await ws.send("only one")
            assert await ws.recv() == "only one"
            t0 = time.monotonic()
            try:
                await ws.recv()
            except ConnectionClosed:
                pass
            await ws.wait_closed()  # the TCP connection itself, not just the close frame
            return ws.close_code, time.monotonic() - t0

    code, took = run(scenario())
    assert code == 4001 and took < 2.0
    wait_events(events, 1, 1)
    wait_connections(lb, 0)


def wait_connections(lb: Balancer, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while lb.status()["listeners"][0]["connections"] != n:
        assert time.monotonic() < deadline, lb.status()["listeners"]
        time.sleep(0.05)


def test_concurrent_connections_stay_separate(procs):
    lb, events = ws_balancer(procs)

    async def one(i: int) -> None:
        async with connect(f"ws://127.0.0.1:{lb.port}/echo", **WS_OPTS) as ws:
            for j in range(50):
                msg = f"conn {i} msg {j}" if j % 2 else f"conn {i} msg {j}".encode()
                await ws.send(msg)
                assert await ws.recv() == msg

    async def scenario() -> None:
        await asyncio.gather(*(one(i) for i in range(8)))

    run(scenario())
    wait_events(events, 8, 8)


def test_frame_sent_with_the_upgrade_request_is_not_lost(procs):
    # a client may send its first frame right behind the handshake, before the 101 arrives:
    # those bytes belong to the tunnel, not to the HTTP parser
    lb, events = ws_balancer(procs)
    handshake = (
        b"GET /echo HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
        s.sendall(handshake + masked_frame(0x1, b"early bird"))
        data = b""
        while b"early bird" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    head, frame = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101 ")
    lower = head.lower()
    assert b"upgrade: websocket" in lower and b"connection: upgrade" in lower
    assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in lower  # RFC 6455 example
    assert frame == b"\x81\x0aearly bird"  # unmasked text frame from the server


def test_refused_upgrade_answers_and_closes(procs):
    lb, events = ws_balancer(procs)
    handshake = (
        b"GET /forbidden HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
        s.sendall(handshake)
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        took = time.monotonic() - t0
    # the bytes after an upgrade request can't be trusted as HTTP: the answer closes
    assert data.startswith(b"HTTP/1.1 403 ") and b"connection: close" in data.lower()
    assert data.endswith(b"no websocket for you\n")
    assert took < 2.0


def test_idle_tunnel_is_closed_and_traffic_keeps_it_open(procs):
    lb, events = ws_balancer(procs, timeouts={"client_idle": "1s"})

    async def idle() -> float:
        async with connect(f"ws://127.0.0.1:{lb.port}/echo", **WS_OPTS) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            t0 = time.monotonic()
            try:
                await ws.recv()
            except ConnectionClosed:
                return time.monotonic() - t0
            raise AssertionError("an idle tunnel got a message")

    took = run(idle())
    assert 0.8 < took < 2.5, took
    wait_events(events, 1, 1)  # the backend's side was closed too

    async def chatty() -> None:
        # client-to-server messages every 0.4 s for 3 s: well past client_idle
        async with connect(f"ws://127.0.0.1:{lb.port}/echo", **WS_OPTS) as ws:
            end = time.monotonic() + 3
            while time.monotonic() < end:
                await ws.send("ping")
                assert await ws.recv() == "ping"
                await asyncio.sleep(0.4)

    async def listening() -> int:
        # traffic in one direction only (server to client) also counts
        async with connect(f"ws://127.0.0.1:{lb.port}/tick", **WS_OPTS) as ws:
            n = 0
            end = time.monotonic() + 3
            while time.monotonic() < end:
                await ws.recv()
                n += 1
            return n

    run(chatty())
    assert run(listening()) >= 10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="ws")
    ap.add_argument("--events", type=Path, required=True)
    args = ap.parse_args()
    try:
        asyncio.run(serve(args.port, args.name, args.events))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
