"""Idle backend connections that sent a PROXY header: reused only for the same header."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from balancer.proxy.upstream import BackendConnections, Upstreams, Watchdog


class FakeTransport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


class FakeConn:
    """The parts of an UpstreamConnection the idle pool touches."""

    def __init__(self, pool: BackendConnections, key: bytes) -> None:
        self.pool = pool
        self.proxy_key = key
        self.transport = FakeTransport()
        self.closed = False
        self.deadline = 0.0
        self.reused = False
        self.idle_since = 0.0

    def _reset_response(self) -> None:
        pass

    def close(self) -> None:
        # as UpstreamConnection: closed now, forgotten when the transport reports it lost
        self.closed = True
        self.pool.forget(self)  # type: ignore[arg-type]


@pytest.fixture
def conns() -> Iterator[BackendConnections]:
    loop = asyncio.new_event_loop()
    try:
        ups = Upstreams(
            loop,
            Watchdog(loop),
            connect_timeout=1.0,
            backend_timeout=1.0,
            idle_timeout=1.0,
            max_idle=3,
        )
        yield BackendConnections("127.0.0.1", 1, ups)
    finally:
        loop.close()


A = b"PROXY TCP4 127.0.0.5 127.0.0.1 1000 80\r\n"
B = b"PROXY TCP4 127.0.0.6 127.0.0.1 1000 80\r\n"


def test_a_keyed_connection_goes_only_to_its_own_header(conns: BackendConnections) -> None:
    a = FakeConn(conns, A)
    conns.release(a)  # type: ignore[arg-type]
    assert conns.acquire_idle() is None  # not to a pool that sends no header
    assert conns.acquire_idle(B) is None  # not to another client
    assert conns.acquire_idle(A) is a and a.reused
    assert conns.acquire_idle(A) is None and conns.keyed_count == 0 and not conns.keyed


def test_unkeyed_connections_never_serve_a_header(conns: BackendConnections) -> None:
    plain = FakeConn(conns, b"")
    conns.release(plain)  # type: ignore[arg-type]
    assert conns.acquire_idle(A) is None
    assert conns.acquire_idle() is plain


def test_full_pool_evicts_the_least_recently_used_client(conns: BackendConnections) -> None:
    keys = [b"PROXY TCP4 127.0.0.%d 127.0.0.1 1 2\r\n" % i for i in range(4)]
    made = [FakeConn(conns, k) for k in keys]
    for c in made[:3]:
        conns.release(c)  # type: ignore[arg-type]
    # client 0 comes back and returns its connection: now the most recent
    assert conns.acquire_idle(keys[0]) is made[0]
    conns.release(made[0])  # type: ignore[arg-type]
    conns.release(made[3])  # type: ignore[arg-type]  # full (3): client 1's goes
    assert made[1].closed and not made[0].closed
    assert conns.keyed_count == 3
    assert conns.acquire_idle(keys[1]) is None
    assert all(conns.acquire_idle(k) is c for k, c in zip(keys[2:], made[2:], strict=True))


def test_closed_ones_are_skipped_and_forgotten(conns: BackendConnections) -> None:
    a1, a2 = FakeConn(conns, A), FakeConn(conns, A)
    conns.release(a1)  # type: ignore[arg-type]
    conns.release(a2)  # type: ignore[arg-type]
    a2.transport.closing = True
    assert conns.acquire_idle(A) is a1  # a2 (newest) was closing: skipped
    a1.close()
    assert conns.keyed_count == 0 and not conns.keyed
    b = FakeConn(conns, B)
    conns.release(b)  # type: ignore[arg-type]
    b.close()  # closed by the backend while idle
    assert conns.keyed_count == 0 and conns.acquire_idle(B) is None
    c = FakeConn(conns, B)
    conns.release(c)  # type: ignore[arg-type]
    conns.close_idle()
    assert c.closed and conns.keyed_count == 0
