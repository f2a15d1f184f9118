"""ActiveChecker parts against scripted in-process servers: parsing, load, reasons, upkeep."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from balancer.backend import Backend, parse_load
from balancer.config import Address, BackendConfig, HealthCheckConfig, PoolConfig
from balancer.health import ActiveChecker, maintain_forever
from balancer.health.active import first_check_delay, load_from_body
from balancer.pool import Pool, PoolEvents

Answer = bytes | Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A server on 127.0.0.1 that answers every connection with the next scripted answer
    (raw bytes, then close; or a coroutine given the stream) and records the requests."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            if isinstance(answer, bytes):
                writer.write(answer)
                await writer.drain()
            else:
                await answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class Events(PoolEvents):
    def __init__(self) -> None:
        self.flips: list[tuple[str, bool, str]] = []

    def health_changed(self, pool: Pool, backend: Backend, healthy: bool, reason: str) -> None:
        self.flips.append((backend.name, healthy, reason))


def make_pool(*ports: int, check: HealthCheckConfig | None = None) -> tuple[Pool, Events]:
    config = PoolConfig(
        name="web",
        backends=tuple(
            BackendConfig(f"b{i}", Address("127.0.0.1", port)) for i, port in enumerate(ports)
        ),
        health_check=check or HealthCheckConfig(),
    )
    events = Events()
    return Pool(config, events=events), events


def ok_json(body: bytes, *, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n".encode()
        + extra
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def check(
    answers: list[Answer], config: HealthCheckConfig | None = None, **kw: object
) -> tuple[dict, Backend, Scripted]:
    async with Scripted(answers) as server:
        pool, _ = make_pool(server.port)
        checker = ActiveChecker(pool, config or HealthCheckConfig(timeout=2.0), **kw)  # type: ignore[arg-type]
        backend = pool.backends[0]
        entry = await checker.check_once(backend)
        return entry, backend, server


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


# -- the request and the answer ----------------------------------------------------------------


def test_request_bytes_and_default_host() -> None:
    entry, backend, server = run(check([ok_json(b"{}")]))  # type: ignore[misc]
    assert entry["ok"] is True and entry["status"] == 200 and entry["error"] is None
    assert server.requests == [
        b"GET /healthz HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{backend.port}\r\n".encode()
        + b"User-Agent: balancer-health\r\nConnection: close\r\n\r\n"
    ]


def test_configured_path_and_host() -> None:
    config = HealthCheckConfig(path="/status?deep=1", host="app.internal", timeout=2.0)
    _, _, server = run(check([ok_json(b"{}")], config))  # type: ignore[misc]
    assert server.requests[0].startswith(b"GET /status?deep=1 HTTP/1.1\r\nHost: app.internal\r\n")


@pytest.mark.parametrize(
    ("answer", "load"),
    [
        (ok_json(b'{"load": 0.5, "name": "a"}'), 0.5),
        (ok_json(b'{"load": 3}'), 3.0),  # may exceed 1.0; ints count
        (ok_json(b'{"load": 0.9}', extra=b"X-Backend-Load: 0.25\r\n"), 0.25),  # header wins
        (ok_json(b'{"load": 0.9}', extra=b"x-backend-load:  0.125 \r\n"), 0.125),
        (ok_json(b'{"load": 0.9}', extra=b"X-Backend-Load: busy\r\n"), 0.9),  # bad header
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'7\r\n{"load"\r\n6;ext=1\r\n: 0.75\r\n1\r\n}\r\n0\r\n\r\n',
            0.75,
        ),
        (b'HTTP/1.1 200 OK\r\n\r\n{"load": 0.375}', 0.375),  # body until close
        (b"HTTP/1.0 200 OK\r\nX-Backend-Load: 1.5\r\n\r\n", 1.5),
    ],
)
def test_load_reported(answer: bytes, load: float) -> None:
    entry, backend, _ = run(check([answer]))  # type: ignore[misc]
    assert entry["ok"] is True
    assert entry["load"] == load
    assert backend.reported_load == load


@pytest.mark.parametrize(
    "answer",
    [
        ok_json(b"{}"),
        ok_json(b"not json"),
        ok_json(b'{"load": "0.3"}'),
        ok_json(b'{"load": true}'),
        ok_json(b'{"load": null}'),
        ok_json(b'{"load": -0.1}'),
        ok_json(b"[0.5]"),
        ok_json(b'{"load": 1e999}'),
        ok_json(b"\xff\xfe"),
        ok_json(b"[" * 100_000),
        ok_json(b"{}", extra=b"X-Backend-Load: nan\r\n"),
        ok_json(b"{}", extra=b"X-Backend-Load: inf\r\n"),
        ok_json(b"{}", extra=b"X-Backend-Load: -1\r\n"),
        ok_json(b"{}", extra=b"X-Backend-Load: \r\n"),
    ],
)
def test_garbage_load_is_ignored(answer: bytes) -> None:
    async def scenario() -> None:
        async with Scripted([answer]) as server:
            pool, _ = make_pool(server.port)
            backend = pool.backends[0]
            backend.report_load(0.2)
            backend.begin()  # so that a report would visibly reset sent_since_report
            entry = await ActiveChecker(pool, HealthCheckConfig(timeout=2.0)).check_once(backend)
            assert entry["ok"] is True
            assert entry["load"] is None
            # no valid report in this answer: the old one is dropped (least_load then counts
            # in-flight requests) rather than kept growing stale
            assert backend.reported_load is None

    run(scenario())


def test_body_beyond_64k_is_cut_and_still_passes() -> None:
    body = b'{"load": 0.5, "pad": "' + b"x" * 100_000 + b'"}'
    entry, backend, _ = run(check([ok_json(body)]))  # type: ignore[misc]
    assert entry["ok"] is True
    assert entry["load"] is None  # truncated JSON does not parse
    assert backend.reported_load is None


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"", "connection closed before the status line"),
        (b"garbage\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n", "connection closed in the response headers"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "before the answer was complete"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", "response head too large"),
        (ok_json(b"{}", status="503 Service Unavailable"), "status 503 not in 200-399"),
        (ok_json(b"{}", status="404 Not Found"), "status 404 not in 200-399"),
    ],
)
def test_bad_answers_fail(answer: bytes, error: str) -> None:
    entry, _, _ = run(check([answer]))  # type: ignore[misc]
    assert entry["ok"] is False
    assert error in entry["error"]


def test_expect_status_range_is_inclusive() -> None:
    config = HealthCheckConfig(expect_status=(204, 302), timeout=2.0)
    for status, ok in (("204 No Content", True), ("302 Found", True), ("200 OK", False)):
        entry, _, _ = run(check([ok_json(b"", status=status)], config))  # type: ignore[misc]
        assert entry["ok"] is ok, status


def test_connection_refused_and_timeout() -> None:
    async def scenario() -> None:
        async with Scripted([b""]) as server:
            port = server.port
        pool, _ = make_pool(port)  # the server is gone: nothing listens there now
        entry = await ActiveChecker(pool, HealthCheckConfig(timeout=2.0)).check_once(
            pool.backends[0]
        )
        assert entry["error"] == "connection refused"

        async def never_answer(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await asyncio.sleep(30)

        async with Scripted([never_answer]) as server:
            pool, _ = make_pool(server.port)
            checker = ActiveChecker(pool, HealthCheckConfig(timeout=0.3))
            loop = asyncio.get_running_loop()
            started = loop.time()
            entry = await checker.check_once(pool.backends[0])
            elapsed = loop.time() - started
            assert entry["error"] == "timed out after 0.3s"
            assert 0.25 <= elapsed < 2.0
            assert 250 <= entry["duration_ms"] < 2000

    run(scenario())


def test_tcp_check_connects_only() -> None:
    async def scenario() -> None:
        async with Scripted([b""]) as server:
            pool, _ = make_pool(server.port)
            checker = ActiveChecker(pool, HealthCheckConfig(type="tcp", timeout=2.0))
            entry = await checker.check_once(pool.backends[0])
            assert entry["ok"] is True and entry["status"] is None
            port = server.port
        pool, _ = make_pool(port)
        checker = ActiveChecker(pool, HealthCheckConfig(type="tcp", timeout=2.0))
        entry = await checker.check_once(pool.backends[0])
        assert entry["ok"] is False and entry["error"] == "connection refused"

    run(scenario())


# -- counters, flips and reasons -------------------------------------------------------------


def test_flip_reasons_counters_and_history() -> None:
    async def scenario() -> None:
        fail = ok_json(b"{}", status="500 Internal Server Error")
        good = ok_json(b'{"load": 0.5}')
        answers: list[Answer] = [good, fail, fail, fail, good, good, good]
        async with Scripted(answers) as server:
            pool, events = make_pool(server.port)
            config = HealthCheckConfig(rise=2, fall=3, timeout=2.0)
            checker = ActiveChecker(pool, config)
            b = pool.backends[0]
            for _ in range(4):
                await checker.check_once(b)
            assert events.flips == [
                ("b0", False, "3 consecutive failures: status 500 not in 200-399")
            ]
            assert not b.healthy
            await checker.check_once(b)
            assert b.healthy is False  # one pass of rise=2
            await checker.check_once(b)
            assert events.flips[-1] == ("b0", True, "2 consecutive passes")
            await checker.check_once(b)
            assert len(events.flips) == 2
            assert checker.results[b] == (4, 3)
            history = checker.history(b)
            assert [h["ok"] for h in history] == [True, False, False, False, True, True, True]
            assert [h["status"] for h in history] == [200, 500, 500, 500, 200, 200, 200]
            assert history[0]["load"] == 0.5
            assert history[-1]["time"] == checker.last_check[b]
            assert all(h["duration_ms"] >= 0 for h in history)

    run(scenario())


def test_history_keeps_the_last_ten() -> None:
    async def scenario() -> None:
        async with Scripted([ok_json(b"{}")]) as server:
            pool, _ = make_pool(server.port)
            checker = ActiveChecker(pool, HealthCheckConfig(timeout=2.0))
            b = pool.backends[0]
            for _ in range(13):
                await checker.check_once(b)
            assert len(checker.history(b)) == 10
            assert checker.results[b] == (13, 0)
            checker.history(b)[0]["ok"] = False  # a copy: callers cannot alter the record
            assert checker.history(b)[0]["ok"] is True

    run(scenario())


def test_verified_backend_goes_down_on_first_failure() -> None:
    async def scenario() -> None:
        async with Scripted([b""]) as server:
            port = server.port
        pool, events = make_pool(port)
        checker = ActiveChecker(pool, HealthCheckConfig(fall=5, timeout=2.0))
        assert pool.backends[0].healthy  # assumed up until checked
        await checker.check_once(pool.backends[0])
        assert events.flips == [("b0", False, "first check failed: connection refused")]

    run(scenario())


def test_runtime_added_backend_is_down_until_one_pass() -> None:
    async def scenario() -> None:
        async with Scripted([ok_json(b"{}")]) as server:
            pool, events = make_pool(server.port)
            checker = ActiveChecker(pool, HealthCheckConfig(rise=5, timeout=2.0))
            new = Backend("new", "127.0.0.1", server.port)
            pool.add_backend(new)
            checker.add(new, verified=False)
            assert new.healthy is False
            assert events.flips == [("new", False, "new backend, waiting for first check")]
            assert new not in pool.strategy.backends
            checker.add(new, verified=False)  # already checked: nothing happens
            assert len(events.flips) == 1
            await checker.check_once(new)
            assert events.flips[-1] == ("new", True, "first check passed")
            assert new in pool.strategy.backends

    run(scenario())


def test_verified_backend_already_down_needs_full_rise() -> None:
    async def scenario() -> None:
        async with Scripted([ok_json(b"{}")]) as server:
            pool, events = make_pool(server.port)
            b = pool.backends[0]
            pool.set_healthy(b, False, "before")
            checker = ActiveChecker(pool, HealthCheckConfig(rise=2, timeout=2.0))
            await checker.check_once(b)
            assert not b.healthy
            await checker.check_once(b)
            assert b.healthy

    run(scenario())


def test_remove_forgets_backend() -> None:
    async def scenario() -> None:
        async with Scripted([ok_json(b"{}")]) as server:
            pool, _ = make_pool(server.port)
            checker = ActiveChecker(pool, HealthCheckConfig(timeout=2.0))
            b = pool.backends[0]
            await checker.check_once(b)
            assert b in checker and b in checker.results and b in checker.last_check
            checker.remove(b)
            assert b not in checker
            assert b not in checker.results and b not in checker.last_check
            assert checker.history(b) == []
            checker.remove(b)  # unknown: ignored

    run(scenario())


def test_start_requires_running_loop_and_stop_cancels() -> None:
    pool, _ = make_pool(1)
    checker = ActiveChecker(pool, HealthCheckConfig())
    with pytest.raises(RuntimeError):
        checker.start()
    assert not checker.running

    async def scenario() -> None:
        checker.start()
        assert checker.running
        tasks = [t for t in asyncio.all_tasks() if (t.get_name() or "").startswith("health:")]
        assert len(tasks) == 1
        await checker.stop()
        assert not checker.running
        assert all(t.done() for t in tasks)

    run(scenario())


@pytest.mark.parametrize(
    "config",
    [
        HealthCheckConfig(type="udp"),
        HealthCheckConfig(path="healthz"),
        HealthCheckConfig(path="/a b"),
        HealthCheckConfig(path="/a\r\nX-Evil: 1"),
        HealthCheckConfig(interval=0),
        HealthCheckConfig(timeout=-1),
    ],
)
def test_bad_config_is_rejected(config: HealthCheckConfig) -> None:
    pool, _ = make_pool(1)
    with pytest.raises(ValueError):
        ActiveChecker(pool, config)


# -- the load parsers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.37", 0.37),
        (" 2 ", 2.0),
        ("0", 0.0),
        (0.5, 0.5),
        (7, 7.0),
        (None, None),
        (True, None),
        ("", None),
        ("nan", None),
        ("-inf", None),
        ("-0.5", None),
        (10**400, None),
        ([0.5], None),
    ],
)
def test_parse_load(value: object, expected: float | None) -> None:
    assert parse_load(value) == expected


def test_load_from_body() -> None:
    assert load_from_body(b'{"load": 0.25}') == 0.25
    assert load_from_body(b'{"load": "0.25"}') is None
    assert load_from_body(b'{"other": 1}') is None
    assert load_from_body(b"0.25") is None


# -- maintain_forever ------------------------------------------------------------------------


class CountingPool:
    def __init__(self, name: str, explode: bool = False) -> None:
        self.name = name
        self.calls = 0
        self.explode = explode

    def maintain(self) -> None:
        self.calls += 1
        if self.explode:
            raise RuntimeError("boom")


def test_maintain_forever_calls_every_pool_and_survives_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        good, bad = CountingPool("good"), CountingPool("bad", explode=True)
        pools = {"bad": bad, "good": good}
        task = asyncio.create_task(maintain_forever(pools.values(), period=0.02))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        late = CountingPool("late")
        pools["late"] = late  # a live view follows additions
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert good.calls >= 5 and bad.calls >= 5
        assert late.calls >= 2

    with caplog.at_level(logging.ERROR, logger="balancer.health"):
        run(scenario())
    assert any("pool bad: maintain() failed" in r.getMessage() for r in caplog.records)


def test_maintain_forever_accepts_a_function() -> None:
    async def scenario() -> None:
        current = {"a": CountingPool("a")}
        holder = {"pools": current}
        task = asyncio.create_task(
            maintain_forever(lambda: holder["pools"].values(), period=0.02)  # type: ignore[arg-type,return-value]
        )
        await asyncio.sleep(0.15)
        replaced = {"b": CountingPool("b")}
        holder["pools"] = replaced  # a reload swaps the whole dict
        calls_a = current["a"].calls
        await asyncio.sleep(0.15)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert calls_a >= 2
        assert current["a"].calls <= calls_a + 1
        assert replaced["b"].calls >= 2

    run(scenario())


def test_maintain_forever_drives_real_pool_ejection_expiry() -> None:
    async def scenario() -> None:
        pool, _ = make_pool(9001, 9002, 9003, 9004)
        b = pool.backends[0]
        assert pool.eject(b, 0.1)
        task = asyncio.create_task(maintain_forever([pool], period=0.02))
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not b.ejected_until

    run(scenario())


def test_maintain_forever_rejects_bad_period() -> None:
    with pytest.raises(ValueError):
        run(maintain_forever([], period=0))


def test_first_check_waits_a_short_random_spread_whatever_the_interval() -> None:
    # spread over a tenth of a short interval, but never minutes for a long one: a backend
    # added at runtime is down until its first check
    short = [first_check_delay(2.0) for _ in range(2000)]
    assert min(short) >= 0.0 and max(short) <= 0.2 and max(short) > 0.1
    long = [first_check_delay(3600.0) for _ in range(2000)]
    assert max(long) <= 1.0 and max(long) > 0.5
