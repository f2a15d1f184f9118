"""Layer-4 mode against real processes: raw TCP spliced to echo servers and to Redis.

Run as a module, this file is the echo backend:
  python -m tests.integration.test_tcp_mode --port N --name NAME
It greets each connection with "hello from NAME\\n", echoes every byte, and after the client's
FIN (half-close) still sends "bye from NAME\\n" before closing: a client only sees that line if
the balancer passed the FIN on *and* kept the way back open.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import socket
import sys
import threading
import time
from collections import Counter

from tests.integration.harness import Processes, free_port, wait_port
from tests.support import missing_tool

# -- the echo backend (run as a module) ------------------------------------------------------


async def serve(port: int, name: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(f"hello from {name}\n".encode())
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.write(f"bye from {name}\n".encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# -- helpers ---------------------------------------------------------------------------------


def echo_backend(procs: Processes, name: str) -> int:
    port = free_port()
    p = procs.start(
        [
            sys.executable,
            "-m",
            "tests.integration.test_tcp_mode",
            "--port",
            str(port),
            "--name",
            name,
        ],
        log_name=f"echo-{name}.log",
    )
    p.backend_name = name  # type: ignore[attr-defined]
    wait_port(port, p)
    return port


def tcp_config(backends: list[tuple[str, int]], **pool) -> dict:  # type: ignore[no-untyped-def]
    return {
        "listeners": [
            {"name": "db", "bind": f"127.0.0.1:{free_port()}", "mode": "tcp", "pool": "db"}
        ],
        "pools": {
            "db": {
                "strategy": "round_robin",
                "backends": [{"name": n, "address": f"127.0.0.1:{p}"} for n, p in backends],
                **pool,
            }
        },
        "admin": {"bind": f"127.0.0.1:{free_port()}"},
    }


FAST_CHECKS = {"type": "tcp", "interval": "200ms", "timeout": "200ms", "rise": 1, "fall": 1}


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        b = s.recv(1)
        assert b, f"closed after {data!r}"
        data += b
    return data


def greeting(port: int, source: str = "127.0.0.1") -> str:
    """Which backend a new connection lands on."""
    with connect(port, source) as s:
        line = read_line(s)
    assert line.startswith(b"hello from "), line
    return line[len(b"hello from ") : -1].decode()


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


# -- echo ------------------------------------------------------------------------------------


def test_round_robin_across_connections_and_echo(procs):
    backends = [(n, echo_backend(procs, n)) for n in ("e1", "e2")]
    lb = procs.balancer(tcp_config(backends, health_check=FAST_CHECKS))
    seen = [greeting(lb.port) for _ in range(10)]
    assert Counter(seen) == {"e1": 5, "e2": 5}
    assert all(a != b for a, b in zip(seen, seen[1:], strict=False))  # alternating
    with connect(lb.port) as s:
        read_line(s)
        for i in range(20):
            s.sendall(b"line %d\n" % i)
            assert read_line(s) == b"line %d\n" % i


def test_ten_mib_both_ways_intact_and_half_close(procs):
    lb = procs.balancer(tcp_config([("e1", echo_backend(procs, "e1"))]))
    payload = os.urandom(10 << 20)
    with connect(lb.port) as s:
        s.settimeout(30)

        def send() -> None:
            view = memoryview(payload)
            for i in range(0, len(view), 1 << 16):
                s.sendall(view[i : i + (1 << 16)])
            s.shutdown(socket.SHUT_WR)  # half-close: "that's all", still reading

        t = threading.Thread(target=send)
        t.start()
        got = read_all(s)
        t.join(30)
    head = b"hello from e1\n"
    tail = b"bye from e1\n"
    assert got.startswith(head) and got.endswith(tail), (got[:40], got[-40:])
    body = got[len(head) : -len(tail)]
    assert len(body) == len(payload)
    assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()


def echo_once(port: int, data: bytes) -> bytes:
    """One session: send `data`, half-close ("that's all"), read until the balancer closes."""
    with connect(port) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return read_all(s)


def test_half_close_before_the_backend_connection_is_up(procs):
    # a client that sends and shuts down its side at once (`printf ... | nc -N`): its FIN can
    # arrive before the backend connection exists; data and FIN must both still get there
    lb = procs.balancer(tcp_config([("e1", echo_backend(procs, "e1"))]))
    for _ in range(20):
        assert echo_once(lb.port, b"quick\n") == b"hello from e1\nquick\nbye from e1\n"


def test_a_session_ends_once_both_sides_have_sent_fin(procs):
    # the client's FIN went on to the backend, the backend's FIN came back, and then both
    # transports were kept open: every such session (curl through a tcp listener to a
    # keep-alive HTTP backend did it on each request) held two sockets, a connection slot
    # and the backend's in-flight count until tcp_idle, and made SIGTERM wait out the drain
    lb = procs.balancer(tcp_config([("e1", echo_backend(procs, "e1"))]))
    for _ in range(5):
        assert echo_once(lb.port, b"x\n") == b"hello from e1\nx\nbye from e1\n"
    deadline = time.monotonic() + 5
    while True:
        st = lb.status()
        held = st["listeners"][0]["connections"], st["pools"]["db"]["backends"][0]["inflight"]
        if held == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert held == (0, 0), st
    started = time.monotonic()
    assert procs.stop(lb.proc) == 0
    assert time.monotonic() - started < 5  # nothing left to drain


def test_idle_session_is_closed_after_tcp_idle_and_a_busy_one_is_not(procs):
    backends = [("e1", echo_backend(procs, "e1"))]
    cfg = tcp_config(backends)
    cfg["timeouts"] = {"tcp_idle": "1s"}
    lb = procs.balancer(cfg)
    with connect(lb.port) as idle, connect(lb.port) as busy:
        read_line(idle)
        read_line(busy)
        t0 = time.monotonic()
        # traffic every 0.25 s keeps a session alive well past tcp_idle
        while time.monotonic() - t0 < 3.0:
            busy.sendall(b"ping\n")
            assert read_line(busy) == b"ping\n"
            time.sleep(0.25)
        # the silent one was closed by the balancer (reset or FIN), not left open
        idle.settimeout(5)
        try:
            assert idle.recv(100) == b""
        except ConnectionResetError:
            pass
        busy.sendall(b"still here\n")
        assert read_line(busy) == b"still here\n"
    assert "idle for 1s: closed" in lb.log_text()


def test_consistent_hash_on_client_ip(procs):
    backends = [(n, echo_backend(procs, n)) for n in ("e1", "e2", "e3")]
    lb = procs.balancer(tcp_config(backends, strategy="consistent_hash", hash_key="client_ip"))
    # loopback answers for all of 127/8: each source address is another client IP
    sources = [f"127.0.0.{i}" for i in range(2, 27)]
    first = {ip: greeting(lb.port, ip) for ip in sources}
    # asked again in other orders (a rotation, unlike a hash, would now answer differently)
    assert {ip: greeting(lb.port, ip) for ip in reversed(sources)} == first
    assert {ip: greeting(lb.port, ip) for ip in sources[1::2] + sources[::2]} == first
    assert set(first.values()) == {"e1", "e2", "e3"}  # 25 clients spread over all three


def test_dead_backend_is_skipped_then_marked_down(procs):
    e1 = echo_backend(procs, "e1")
    e2 = echo_backend(procs, "e2")
    lb = procs.balancer(
        tcp_config([("e1", e1), ("e2", e2)], health_check={**FAST_CHECKS, "interval": "1s"})
    )
    assert Counter(greeting(lb.port) for _ in range(4)) == {"e1": 2, "e2": 2}
    victim = next(p for p in procs.procs if getattr(p, "backend_name", "") == "e1")
    procs.stop(victim)
    # before the health check notices, a refused connect is retried on the other backend
    t0 = time.monotonic()
    assert [greeting(lb.port) for _ in range(4)] == ["e2"] * 4
    assert time.monotonic() - t0 < 2
    lb.wait_state("db", "e1", "down", timeout=5)
    assert [greeting(lb.port) for _ in range(6)] == ["e2"] * 6
    # it comes back: traffic is shared again once a check passes
    procs.start(
        [
            sys.executable,
            "-m",
            "tests.integration.test_tcp_mode",
            "--port",
            str(e1),
            "--name",
            "e1",
        ],
        log_name="echo-e1-again.log",
    )
    lb.wait_state("db", "e1", "up", timeout=10)
    assert set(greeting(lb.port) for _ in range(6)) == {"e1", "e2"}


def test_no_backend_closes_the_client_connection(procs):
    lb = procs.balancer(tcp_config([("gone", free_port())]))
    with connect(lb.port) as s:
        t0 = time.monotonic()
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 5


# -- Redis -----------------------------------------------------------------------------------


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    missing_tool(
        "redis-server not installed (./dev test installs it: apt-get install redis-server)"
    )


def start_redis(procs: Processes, name: str) -> int:
    port = free_port()
    p = procs.start(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(procs.tmp),
        ],
        log_name=f"redis-{name}.log",
    )
    p.backend_name = name  # type: ignore[attr-defined]
    wait_port(port, p)
    return port


class Resp:
    """A minimal RESP2 client over a raw socket (no dependency, every byte visible)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = connect(port, source)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, *args: str | bytes) -> object:
        self.send(*args)
        return self.reply()

    def send(self, *args: str | bytes) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode() if isinstance(a, str) else a
            parts.append(b"$%d\r\n%b\r\n" % (len(b), b))
        self.sock.sendall(b"".join(parts))

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            assert chunk, "connection closed"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(1 << 16)
            assert chunk, "connection closed"
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def reply(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exactly(n)
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise AssertionError(f"not RESP: {line!r}")


def test_redis_through_the_balancer(procs):
    r1 = start_redis(procs, "r1")
    r2 = start_redis(procs, "r2")
    for name, port in (("r1", r1), ("r2", r2)):
        with Resp(port) as direct:  # label each server, behind the balancer's back
            assert direct.call("SET", "whoami", name) == "OK"
    lb = procs.balancer(tcp_config([("r1", r1), ("r2", r2)], health_check=FAST_CHECKS))

    def whoami(c: Resp) -> str:
        return c.call("GET", "whoami").decode()  # type: ignore[union-attr]

    with Resp(lb.port) as a, Resp(lb.port) as b:
        assert {whoami(a), whoami(b)} == {"r1", "r2"}  # round robin per connection
        assert a.call("PING") == "PONG"
        assert a.call("SET", "k", "v" * 100000) == "OK"
        assert a.call("GET", "k") == b"v" * 100000
        assert a.call("DEL", "n") in (0, 1)
        assert [a.call("INCR", "n") for _ in range(5)] == [1, 2, 3, 4, 5]
        assert isinstance(a.call("NOSUCHCOMMAND"), RuntimeError)  # errors pass through
        # pipelining: 1,000 commands in one write, 1,000 replies in order
        a.sock.sendall(b"".join(b"*2\r\n$4\r\nINCR\r\n$1\r\np\r\n" for _ in range(1000)))
        got = [a.reply() for _ in range(1000)]
        assert got == list(range(got[0], got[0] + 1000))  # type: ignore[arg-type]
        assert b.call("PING") == "PONG"
    # kill one: new connections all go to the survivor, and the data there is intact
    victim = next(p for p in procs.procs if getattr(p, "backend_name", "") == "r1")
    procs.stop(victim)
    lb.wait_state("db", "r1", "down", timeout=5)
    for _ in range(6):
        with Resp(lb.port) as c:
            assert whoami(c) == "r2"
            assert c.call("INCR", "after") is not None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="echo")
    args = ap.parse_args()
    try:
        asyncio.run(serve(args.port, args.name))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
