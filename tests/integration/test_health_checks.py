"""Active health checks against real backend processes on 127.0.0.1, on uvloop as in production."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
import uvloop

from balancer.backend import Backend
from balancer.config import Address, BackendConfig, HealthCheckConfig, PoolConfig
from balancer.health import ActiveChecker
from balancer.pool import Pool, PoolEvents

# A purpose-built backend: /healthz answers as told through POST /_control, a JSON object
# merged into its state: status (int), header_load (str sent as X-Backend-Load, or null),
# body (str sent as the body), hang (bool: read the request, never answer). It binds port 0
# and prints the port it got, so there is no race for a free port.
BACKEND = r"""
import asyncio, json, socket, sys
from aiohttp import web

state = {"status": 200, "header_load": None, "body": "{}", "hang": False}
hits = 0

async def healthz(request):
    global hits
    hits += 1
    if state["hang"]:
        await asyncio.sleep(3600)
    headers = {"Content-Type": "application/json"}
    if state["header_load"] is not None:
        headers["X-Backend-Load"] = state["header_load"]
    return web.Response(status=state["status"], text=state["body"], headers=headers)

async def control(request):
    state.update(await request.json())
    return web.json_response(dict(state, hits=hits))

async def main():
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/_control", control)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    print(sock.getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

INTERVAL = 0.2
# Generous slack for a machine with 2 noisy cores: bounds are upper bounds, never windows.
SLACK = 1.5


class BackendProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def spawn() -> Iterator[Callable[[], BackendProcess]]:
    """Start backend processes; every one is killed by its PID at teardown."""
    started: list[BackendProcess] = []

    def start() -> BackendProcess:
        proc = subprocess.Popen(
            [sys.executable, "-c", BACKEND], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        backend = None
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 20.0)
            line = proc.stdout.readline() if ready else b""  # type: ignore[union-attr]
            if not line.strip().isdigit():
                raise RuntimeError(f"backend process did not start (exit {proc.poll()})")
            backend = BackendProcess(proc, int(line))
            return backend
        finally:
            started.append(backend or BackendProcess(proc, 0))

    yield start
    for b in started:
        b.kill()


class Flips(PoolEvents):
    """Records every health flip with its time and reason."""

    def __init__(self) -> None:
        self.flips: list[tuple[float, str, bool, str]] = []

    def health_changed(self, pool: Pool, backend: Backend, healthy: bool, reason: str) -> None:
        self.flips.append((time.monotonic(), backend.name, healthy, reason))


def make_pool(*servers: BackendProcess | int) -> tuple[Pool, Flips]:
    ports = [s.port if isinstance(s, BackendProcess) else s for s in servers]
    config = PoolConfig(
        name="web",
        backends=tuple(
            BackendConfig(f"b{i}", Address("127.0.0.1", port)) for i, port in enumerate(ports)
        ),
    )
    events = Flips()
    return Pool(config, events=events), events


def check_config(**kw: Any) -> HealthCheckConfig:
    values: dict[str, Any] = {"interval": INTERVAL, "timeout": 0.5, "rise": 2, "fall": 2}
    values.update(kw)
    return HealthCheckConfig(**values)


async def control(session: aiohttp.ClientSession, server: BackendProcess, **state: Any) -> None:
    async with session.post(f"{server.url}/_control", data=json.dumps(state)) as r:
        assert r.status == 200


async def wait_for(predicate: Callable[[], bool], limit: float) -> float:
    """Seconds until `predicate` holds; fails the test if it does not within `limit`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > limit:
            raise AssertionError(f"condition not met within {limit:.1f}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- down and up --------------------------------------------------------------------------------


def test_down_within_fall_intervals_and_up_after_rise(spawn: Callable[[], BackendProcess]) -> None:
    server = spawn()

    async def scenario() -> None:
        pool, events = make_pool(server)
        b = pool.backends[0]
        checker = ActiveChecker(pool, check_config(rise=2, fall=2))
        checker.start()
        try:
            async with aiohttp.ClientSession() as session:
                await wait_for(lambda: checker.results[b][0] >= 2, 5.0)
                assert b.healthy and events.flips == []

                await control(session, server, status=503)
                took = await wait_for(lambda: not b.healthy, INTERVAL * 2 + INTERVAL + SLACK)
                assert took <= INTERVAL * 2 + INTERVAL + SLACK
                # down after exactly `fall` failures in a row, not after the first one
                history = checker.history(b)
                assert [h["ok"] for h in history[-3:]] == [True, False, False]
                assert history[-1]["status"] == 503
                assert events.flips[-1][1:] == (
                    "b0",
                    False,
                    "2 consecutive failures: status 503 not in 200-399",
                )
                assert b not in pool.strategy.backends

                await control(session, server, status=200)
                took = await wait_for(lambda: b.healthy, INTERVAL * 2 + INTERVAL + SLACK)
                assert took <= INTERVAL * 3 + SLACK
                history = checker.history(b)
                assert [h["ok"] for h in history[-3:]] == [False, True, True]
                assert events.flips[-1][1:] == ("b0", True, "2 consecutive passes")
                assert b in pool.strategy.backends
                assert len(events.flips) == 2
        finally:
            await checker.stop()

    uvloop.run(scenario())


def test_killed_backend_goes_down(spawn: Callable[[], BackendProcess]) -> None:
    server, other = spawn(), spawn()

    async def scenario() -> None:
        pool, events = make_pool(server, other)
        b0, b1 = pool.backends
        checker = ActiveChecker(pool, check_config(fall=2))
        checker.start()
        try:
            await wait_for(lambda: checker.results[b0][0] >= 1, 5.0)
            server.kill()
            await wait_for(lambda: not b0.healthy, INTERVAL * 3 + SLACK)
            assert events.flips[-1][1:] == (
                "b0",
                False,
                "2 consecutive failures: connection refused",
            )
            assert b1.healthy
            assert pool.strategy.backends == (b1,)
        finally:
            await checker.stop()

    uvloop.run(scenario())


def test_backend_present_at_start_but_dead_goes_down_on_first_check(
    spawn: Callable[[], BackendProcess],
) -> None:
    live = spawn()
    dead = free_port()

    async def scenario() -> None:
        pool, events = make_pool(live, dead)
        checker = ActiveChecker(pool, check_config(fall=3))
        b_live, b_dead = pool.backends
        assert b_dead.healthy  # assumed up until checked
        checker.start()
        try:
            await wait_for(lambda: not b_dead.healthy, INTERVAL + SLACK)
            assert checker.results[b_dead] == (0, 1)
            assert events.flips == [
                (events.flips[0][0], "b1", False, "first check failed: connection refused")
            ]
            assert b_live.healthy
        finally:
            await checker.stop()

    uvloop.run(scenario())


def test_runtime_added_backend_starts_down_and_comes_up_after_one_pass(
    spawn: Callable[[], BackendProcess],
) -> None:
    first, added = spawn(), spawn()

    async def scenario() -> None:
        pool, events = make_pool(first)
        checker = ActiveChecker(pool, check_config(rise=3))
        checker.start()
        try:
            new = Backend("new", "127.0.0.1", added.port)
            pool.add_backend(new)
            checker.add(new, verified=False)
            assert not new.healthy
            assert new not in pool.strategy.backends
            assert events.flips[-1][1:] == ("new", False, "new backend, waiting for first check")
            await wait_for(lambda: new.healthy, INTERVAL + SLACK)
            assert checker.results[new] == (1, 0)  # one pass, although rise is 3
            assert events.flips[-1][1:] == ("new", True, "first check passed")
            assert new in pool.strategy.backends
        finally:
            await checker.stop()

    uvloop.run(scenario())


def test_removed_backend_is_no_longer_checked(spawn: Callable[[], BackendProcess]) -> None:
    a, b = spawn(), spawn()

    async def scenario() -> None:
        pool, _ = make_pool(a, b)
        b0, b1 = pool.backends
        checker = ActiveChecker(pool, check_config())
        checker.start()
        try:
            await wait_for(lambda: checker.results[b0][0] >= 2, 5.0)
            checker.remove(b0)
            pool.remove_backend(b0)
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{a.url}/_control", data="{}") as r:
                    hits_after_remove = (await r.json())["hits"]
                before = checker.results[b1][0]
                await wait_for(lambda: checker.results[b1][0] >= before + 4, 5.0)
                async with session.post(f"{a.url}/_control", data="{}") as r:
                    # at most one check was already on the wire when remove() was called
                    assert (await r.json())["hits"] <= hits_after_remove + 1
            assert b0 not in checker.results
        finally:
            await checker.stop()

    uvloop.run(scenario())


# -- load feedback ------------------------------------------------------------------------------


def test_load_by_header_and_by_json_body(spawn: Callable[[], BackendProcess]) -> None:
    server = spawn()

    async def scenario() -> None:
        pool, _ = make_pool(server)
        b = pool.backends[0]
        checker = ActiveChecker(pool, check_config())
        checker.start()
        try:
            async with aiohttp.ClientSession() as session:
                await control(session, server, body=json.dumps({"load": 0.42}))
                await wait_for(lambda: b.reported_load == 0.42, 5.0)

                await control(session, server, header_load="0.9")
                await wait_for(lambda: b.reported_load == 0.9, 5.0)  # header wins over body

                await control(session, server, header_load=None, body='{"load": 1.75}')
                await wait_for(lambda: b.reported_load == 1.75, 5.0)

                # garbage is no report: the stale one is dropped (least_load falls back to
                # in-flight counting) and the backend stays up
                await control(session, server, header_load="lots", body='{"load": "high"}')
                checks = checker.results[b][0]
                await wait_for(lambda: checker.results[b][0] >= checks + 3, 5.0)
                assert b.reported_load is None
                assert b.healthy
                assert checker.history(b)[-1]["load"] is None
        finally:
            await checker.stop()

    uvloop.run(scenario())


# -- expect_status and tcp ----------------------------------------------------------------------


def test_expect_status_range_respected(spawn: Callable[[], BackendProcess]) -> None:
    low, mid, high = spawn(), spawn(), spawn()

    async def scenario() -> None:
        pool, _ = make_pool(low, mid, high)
        b_low, b_mid, b_high = pool.backends
        checker = ActiveChecker(pool, check_config(expect_status=(204, 302)))
        async with aiohttp.ClientSession() as session:
            await control(session, low, status=200)
            await control(session, mid, status=204)
            await control(session, high, status=302)
        checker.start()
        try:
            await wait_for(
                lambda: all(
                    checker.results[b][0] + checker.results[b][1] >= 3 for b in pool.backends
                ),
                5.0,
            )
            assert not b_low.healthy
            assert checker.history(b_low)[-1]["error"] == "status 200 not in 204-302"
            assert b_mid.healthy and checker.results[b_mid][1] == 0
            assert b_high.healthy and checker.results[b_high][1] == 0
        finally:
            await checker.stop()

    uvloop.run(scenario())


def test_tcp_check(spawn: Callable[[], BackendProcess]) -> None:
    live = spawn()
    dead = free_port()

    async def scenario() -> None:
        pool, events = make_pool(live, dead)
        b_live, b_dead = pool.backends
        checker = ActiveChecker(pool, check_config(type="tcp"))
        async with aiohttp.ClientSession() as session:
            # a tcp check does not care what HTTP would say
            await control(session, live, status=500, hang=True)
        checker.start()
        try:
            await wait_for(lambda: checker.results[b_live][0] >= 3 and not b_dead.healthy, 5.0)
            assert b_live.healthy and checker.results[b_live][1] == 0
            assert checker.history(b_live)[-1]["status"] is None
            assert checker.history(b_dead)[-1]["error"] == "connection refused"
            live.kill()
            await wait_for(lambda: not b_live.healthy, INTERVAL * 3 + SLACK)
        finally:
            await checker.stop()

    uvloop.run(scenario())


# -- a hanging backend ------------------------------------------------------------------------


def test_hanging_check_times_out_without_delaying_others(
    spawn: Callable[[], BackendProcess],
) -> None:
    hanging, healthy = spawn(), spawn()
    timeout = 1.5  # well above the interval, so a blocked loop would show in the gaps

    async def scenario() -> None:
        pool, _ = make_pool(hanging, healthy)
        b_hang, b_ok = pool.backends
        checker = ActiveChecker(pool, check_config(timeout=timeout, fall=1))
        async with aiohttp.ClientSession() as session:
            await control(session, hanging, hang=True)
        seen: list[float] = []
        checker.start()
        try:
            started = time.monotonic()
            while time.monotonic() - started < 4.0:
                last = checker.last_check.get(b_ok)
                if last is not None and (not seen or last != seen[-1]):
                    seen.append(last)
                await asyncio.sleep(0.01)
            failures = [h for h in checker.history(b_hang) if not h["ok"]]
            assert failures, "the hanging backend was never found failing"
            for h in failures:
                assert h["error"] == f"timed out after {timeout:g}s"
                assert timeout * 1000 * 0.9 <= h["duration_ms"] <= (timeout + SLACK) * 1000
            assert not b_hang.healthy
            # the healthy backend kept its own cadence while the other one hung
            assert checker.results[b_ok][1] == 0
            assert len(seen) >= 8  # about 20 expected in 4 s at 0.2 s
            gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
            assert max(gaps) < timeout * 0.75
        finally:
            await checker.stop()

    uvloop.run(scenario())


def test_checks_of_many_backends_run_concurrently(spawn: Callable[[], BackendProcess]) -> None:
    servers = [spawn() for _ in range(4)]
    timeout = 1.0

    async def scenario() -> None:
        pool, _ = make_pool(*servers)
        async with aiohttp.ClientSession() as session:
            for s in servers:
                await control(session, s, hang=True)
        checker = ActiveChecker(pool, check_config(timeout=timeout, fall=1))
        checker.start()
        try:
            took = await wait_for(
                lambda: all(not b.healthy for b in pool.backends), timeout + INTERVAL + SLACK
            )
            # four hangs of 1 s each, done side by side rather than one after another
            assert took < timeout * 4
        finally:
            await checker.stop()

    uvloop.run(scenario())
