"""Multi-process mode, the pure parts: channel frames, backend state snapshot/apply, counter
reports and their sums, the connection-cap split, and the owner's /metrics adding its workers."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from balancer.admin.metrics import Metrics
from balancer.backend import BackendState
from balancer.cluster import channel, state
from balancer.config import Address, BackendConfig, LimitsConfig, PoolConfig, parse
from balancer.daemon import WorkerWiring
from balancer.pool import Pool
from balancer.proxy.limits import process_limits
from balancer.proxy.tcp import TcpContext
from tests.unit.test_metrics import FakeDaemon, FakeExchange, FakeListener, scrape, total, value

# -- frames ----------------------------------------------------------------------------------


def test_frames_round_trip_whole_and_split_anywhere() -> None:
    msgs = [
        {"type": "state", "seq": 3, "state": {"web": [{"name": "a", "load": 0.25}]}},
        {"type": "report", "id": 0, "counters": {"x": [1, 2.5]}},
        {"type": "stop"},
    ]
    data = b"".join(channel.encode(m) for m in msgs)
    got, rest = channel.decode_frames(data)
    assert got == msgs and rest == b""
    # cut at every byte: complete frames come out, the rest waits for more
    for cut in range(len(data) + 1):
        first, rest = channel.decode_frames(data[:cut])
        second, left = channel.decode_frames(rest + data[cut:])
        assert first + second == msgs and left == b""


def test_frames_refuse_garbage() -> None:
    with pytest.raises(channel.ProtocolError):
        channel.decode_frames(channel.HEADER.pack(channel.MAX_MESSAGE + 1) + b"x")
    body = b"[1, 2]"
    with pytest.raises(channel.ProtocolError):
        channel.decode_frames(channel.HEADER.pack(len(body)) + body)
    body = b"{not json"
    with pytest.raises(channel.ProtocolError):
        channel.decode_frames(channel.HEADER.pack(len(body)) + body)
    body = json.dumps({"kind": "no type"}).encode()
    with pytest.raises(channel.ProtocolError):
        channel.decode_frames(channel.HEADER.pack(len(body)) + body)


def test_channel_over_a_socketpair_and_eof() -> None:
    import socket

    async def main() -> None:
        a, b = socket.socketpair()
        left = await channel.Channel.open(a)
        right = await channel.Channel.open(b)
        big = {"type": "config", "text": "x" * 300_000}
        assert left.send({"type": "hello"}) and left.send(big)
        await left.flush()
        assert await right.recv() == {"type": "hello"}
        assert await right.recv() == big
        left.close()
        assert await right.recv() is None  # the peer is gone: EOF, not an exception
        right.close()

    asyncio.run(main())


# -- backend state ---------------------------------------------------------------------------


def pool_of(names: tuple[str, ...] = ("a", "b", "c"), strategy: str = "round_robin") -> Pool:
    backends = tuple(
        BackendConfig(n, Address("127.0.0.1", 9000 + i)) for i, n in enumerate(names, 1)
    )
    return Pool(PoolConfig("web", backends, strategy=strategy))


def picks(pool: Pool, n: int = 30) -> set[str]:
    ctx = TcpContext("198.18.0.1")
    out = set()
    for _ in range(n):
        b = pool.select(ctx)
        if b is not None:
            out.add(b.name)
    return out


def test_apply_makes_a_worker_pool_agree_with_the_owner() -> None:
    owner, worker = pool_of(), pool_of()
    a, b, c = owner.backends
    owner.set_healthy(b, False, "test")
    owner.set_admin_state(c, BackendState.DRAINING)
    owner.set_weight(a, 7)
    a.report_load(0.4)
    snap = state.snapshot({"web": owner}, {a: 123.0})
    json.dumps(snap)  # it crosses the channel as JSON
    changed = state.apply_state({"web": worker}, snap)
    assert changed == 3
    wa, wb, wc = worker.backends
    assert (wa.weight, wb.healthy, wc.admin_state) == (7, False, BackendState.DRAINING)
    assert wa.reported_load == 0.4
    assert picks(worker) == {"a"}  # the rebuilt strategy sees only what the owner allows
    # applying the same snapshot again changes nothing
    assert state.apply_state({"web": worker}, snap) == 0
    # the owner brings them back: so does the worker
    owner.set_healthy(b, True, "test")
    owner.set_admin_state(c, BackendState.UP)
    state.apply_state({"web": worker}, state.snapshot({"web": owner}))
    assert picks(worker) == {"a", "b", "c"}


def test_apply_adds_removes_and_replaces_backends() -> None:
    owner, worker = pool_of(), pool_of()
    removed: list[str] = []
    d = owner.backends[0].__class__("d", "127.0.0.1", 9100)
    d.healthy = False  # added at runtime: down until the owner's check passes
    owner.add_backend(d)
    owner.remove_backend(owner.find("b"))  # type: ignore[arg-type]
    # same name, another server: a different backend
    c = owner.find("c")
    owner.remove_backend(c)  # type: ignore[arg-type]
    owner.add_backend(c.__class__("c", "127.0.0.1", 9200))  # type: ignore[union-attr]
    old_c = worker.find("c")
    state.apply_state(
        {"web": worker},
        state.snapshot({"web": owner}),
        on_removed=lambda pool, b: removed.append(f"{b.name}@{b.port}"),
    )
    assert [(b.name, b.port, b.healthy) for b in worker.backends] == [
        ("a", 9001, True),
        ("d", 9100, False),
        ("c", 9200, True),
    ]
    assert sorted(removed) == ["b@9002", "c@9003"]
    assert worker.find("c") is not old_c
    assert picks(worker) == {"a", "c"}


def test_apply_ignores_pools_it_does_not_have_yet() -> None:
    worker = pool_of()
    snap = state.snapshot({"web": pool_of(), "api": pool_of(("x",))})
    state.apply_state({"web": worker}, snap)  # "api" arrives with the next config message
    assert [b.name for b in worker.backends] == ["a", "b", "c"]


def test_a_fresh_load_report_restarts_the_correction_even_with_the_same_value() -> None:
    owner, worker = pool_of(strategy="least_load"), pool_of(strategy="least_load")
    stamps: dict = {}
    a = owner.backends[0]
    a.report_load(0.5)
    state.apply_state({"web": worker}, state.snapshot({"web": owner}, {a: 1.0}), load_stamps=stamps)
    wa = worker.backends[0]
    wa.begin()
    wa.begin()
    assert wa.sent_since_report == 2
    # the same stamp again: not a new report
    state.apply_state({"web": worker}, state.snapshot({"web": owner}, {a: 1.0}), load_stamps=stamps)
    assert wa.sent_since_report == 2
    # a newer check saying the same load: a new report
    state.apply_state({"web": worker}, state.snapshot({"web": owner}, {a: 2.0}), load_stamps=stamps)
    assert (wa.reported_load, wa.sent_since_report, wa.inflight_at_report) == (0.5, 0, 2)
    # the backend stops reporting: the worker falls back to counting in-flight requests
    a.reported_load = None
    state.apply_state({"web": worker}, state.snapshot({"web": owner}), load_stamps=stamps)
    assert wa.reported_load is None


# -- counters --------------------------------------------------------------------------------


def test_add_sums_leaves_rows_and_nested_maps_without_changing_its_arguments() -> None:
    one = {"requests": {"web": {"a": [1, 2, 0.5]}}, "retries": {"web": 1}}
    two = {"requests": {"web": {"a": [10, 20, 1.5], "b": [1, 1, 1.0]}}, "retries": {"api": 4}}
    before = json.dumps([one, two])
    out = state.add(one, two)
    assert out == {
        "requests": {"web": {"a": [11, 22, 2.0], "b": [1, 1, 1.0]}},
        "retries": {"web": 1, "api": 4},
    }
    assert json.dumps([one, two]) == before
    assert state.total([one, two, {}]) == out


def test_a_dead_workers_gauges_are_dropped_and_its_counters_kept() -> None:
    report = {
        "backends": {"web": {"a": {"requests": 5, "errors": 1, "inflight": 3}}},
        "listeners": {"http": {"connections": 7, "refused": 2, "rejected": 1}},
        "queue_depth": {"web": 4},
        "metrics": {"requests": {"web": {"a": [5]}}},
    }
    assert state.without_gauges(report) == {
        "backends": {"web": {"a": {"requests": 5, "errors": 1}}},
        "listeners": {"http": {"refused": 2, "rejected": 1}},
        "metrics": {"requests": {"web": {"a": [5]}}},
    }


def test_merge_status_adds_worker_counts_to_backends_and_listeners() -> None:
    st = {
        "pools": {"web": {"backends": [{"name": "a", "inflight": 1, "requests": 10, "errors": 0}]}},
        "listeners": [
            {"name": "http", "connections": 2, "refused": 0, "rejected": 1},
            {"name": "db", "connections": 1, "refused": 0},
        ],
    }
    counters = {
        "backends": {"web": {"a": {"requests": 5, "errors": 2, "inflight": 3}}},
        "listeners": {
            "http": {"connections": 4, "refused": 1, "rejected": 0},
            "db": {"connections": 1, "refused": 0, "rejected": 0},
        },
    }
    state.merge_status(st, counters)
    assert st["pools"]["web"]["backends"][0] == {
        "name": "a",
        "inflight": 4,
        "requests": 15,
        "errors": 2,
    }
    assert st["listeners"][0] == {"name": "http", "connections": 6, "refused": 1, "rejected": 1}
    assert "rejected" not in st["listeners"][1]
    assert state.process_totals(counters) == {"connections": 5, "requests": 5}


def test_max_connections_is_split_between_processes_rounding_up() -> None:
    base = """
listeners: [{name: web, bind: "127.0.0.1:8080", routes: [{pool: web}]}]
pools: {web: {backends: [{name: a, address: "127.0.0.1:9001"}]}}
limits: {max_connections: 1001, max_connections_per_ip: 10, rate_per_ip: 5}
"""
    one = parse(base)
    assert process_limits(one) == one.limits
    three = dataclasses.replace(one, workers=3)
    limits = process_limits(three)
    assert limits.max_connections == 334  # ceil(1001 / 3): never fewer than configured in all
    assert (limits.max_connections_per_ip, limits.rate_per_ip) == (10, 5.0)
    uncapped = dataclasses.replace(three, limits=LimitsConfig(max_connections=0))
    assert process_limits(uncapped).max_connections == 0


# -- the owner's /metrics: its own counts plus its workers' ------------------------------------


class FakeCluster:
    restarts = 3
    hung = 1

    def __init__(self, counters: dict) -> None:
        self._counters = counters

    def counters(self) -> dict:
        return self._counters

    def status(self) -> list[dict]:
        return [{"in_sync": True}, {"in_sync": False}]


def test_owner_metrics_add_the_workers_reports() -> None:
    # the worker: a pool and listener of its own, counting its own traffic
    wpool = pool_of(("a", "b"))
    wdaemon = FakeDaemon({"web": wpool})
    wlistener = FakeListener("http")
    wlistener.refused = 2
    wdaemon.listeners = {"http": wlistener}
    wdaemon.metrics = None  # type: ignore[attr-defined]
    worker = Metrics(wdaemon)  # type: ignore[arg-type]
    wdaemon.metrics = worker  # type: ignore[attr-defined]
    for _ in range(30):
        worker.request_done(FakeExchange(wpool, "a", 200), 0.01, False)
    worker.request_done(FakeExchange(wpool, "b", 502), 0.2, False)
    worker.retried(FakeExchange(wpool, "b", 502), wpool.backends[1])  # type: ignore[arg-type]
    wpool.sticky_hits = 4
    wpool.backends[0].inflight = 2
    report = json.loads(json.dumps(state.process_report(wdaemon)))  # as it crosses the channel

    pool = pool_of(("a", "b"))
    daemon = FakeDaemon({"web": pool})
    listener = FakeListener("http")
    listener.refused = 1
    daemon.listeners = {"http": listener}
    owner = Metrics(daemon)  # type: ignore[arg-type]
    for _ in range(10):
        owner.request_done(FakeExchange(pool, "a", 200), 0.01, False)
    pool.sticky_hits = 1
    pool.backends[0].inflight = 1
    daemon.cluster = FakeCluster(report)  # type: ignore[attr-defined]
    s = scrape(owner)
    assert total(s, "balancer_requests_total") == 41
    assert value(s, "balancer_requests_total", backend="a", code_class="2xx") == 40
    assert value(s, "balancer_requests_total", backend="b", code_class="5xx") == 1
    assert value(s, "balancer_request_duration_seconds_count", pool="web") == 41
    assert value(s, "balancer_retries_total", pool="web") == 1
    assert value(s, "balancer_backend_inflight", backend="a") == 3
    assert value(s, "balancer_sticky_total", pool="web", result="hit") == 5
    assert value(s, "balancer_connections_refused_total", listener="http") == 3
    assert value(s, "balancer_processes") == 3
    assert value(s, "balancer_processes_serving") == 2  # one worker is not in sync
    assert value(s, "balancer_worker_restarts_total") == 3
    assert value(s, "balancer_worker_hangs_total") == 1
    # and without workers the owner's own numbers are untouched
    daemon.cluster = None  # type: ignore[attr-defined]
    s = scrape(owner)
    assert total(s, "balancer_requests_total") == 10
    assert "balancer_processes" not in s


def test_respawn_back_off_doubles_for_quick_deaths_and_resets_after_a_stable_spell() -> None:
    from balancer.cluster.supervisor import RESPAWN_MAX, RESPAWN_MIN, STABLE_AFTER, respawn_delay

    backoff = RESPAWN_MIN
    delays = []
    for _ in range(10):
        delay, backoff = respawn_delay(backoff, lived=0.2)
        delays.append(delay)
    assert delays[:4] == [RESPAWN_MIN, 2 * RESPAWN_MIN, 4 * RESPAWN_MIN, 8 * RESPAWN_MIN]
    assert delays[-1] == RESPAWN_MAX and all(d <= RESPAWN_MAX for d in delays)
    # up for a while, then dead: back to the shortest wait
    assert respawn_delay(backoff, lived=STABLE_AFTER) == (RESPAWN_MIN, 2 * RESPAWN_MIN)


def test_a_worker_refuses_an_owner_of_another_protocol() -> None:
    import socket

    from balancer.cluster import worker

    async def main() -> None:
        a, b = socket.socketpair()
        owner = await channel.Channel.open(a)
        owner.send({"type": "config", "protocol": channel.PROTOCOL + 1, "generation": 1})
        assert await worker.run(b.detach(), 1, WorkerWiring()) == 1
        msg = await owner.recv()
        assert msg is not None and msg["type"] == "failed"
        assert "upgraded under a running owner" in msg["error"]
        owner.close()

    asyncio.run(main())
