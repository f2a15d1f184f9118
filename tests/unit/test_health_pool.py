"""Pool health policy on a fake clock: flips, slow start, passive ejection, panic, the queue."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from balancer import strategies
from balancer.backend import Backend, BackendState
from balancer.config import (
    Address,
    BackendConfig,
    PassiveHealthConfig,
    PoolConfig,
    QueueConfig,
)
from balancer.pool import SLOW_START_FLOOR, Pool, PoolEvents


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Ctx:
    """The least RequestContext: no headers, no cookies."""

    client_ip = "127.0.0.1"
    path = "/"

    def header(self, name: str) -> str | None:
        return None

    def cookie(self, name: str) -> str | None:
        return None


class RecordingEvents(PoolEvents):
    def __init__(self) -> None:
        self.health: list[tuple[str, bool, str]] = []
        self.ejections: list[tuple[str, float]] = []
        self.panics: list[bool] = []

    def health_changed(self, pool: Pool, backend: Backend, healthy: bool, reason: str) -> None:
        self.health.append((backend.name, healthy, reason))

    def ejected(self, pool: Pool, backend: Backend, duration: float) -> None:
        self.ejections.append((backend.name, duration))

    def panic(self, pool: Pool, active: bool) -> None:
        self.panics.append(active)


CTX = Ctx()


def make_pool(
    n: int = 3,
    *,
    strategy: str = "round_robin",
    weights: tuple[int, ...] | None = None,
    max_connections: int = 0,
    slow_start: float = 0.0,
    panic_threshold: int = 0,
    passive: PassiveHealthConfig | None = None,
    queue: QueueConfig | None = None,
) -> tuple[Pool, FakeClock, RecordingEvents]:
    backends = tuple(
        BackendConfig(
            name=f"b{i}",
            address=Address("127.0.0.1", 9001 + i),
            weight=weights[i] if weights else 1,
            max_connections=max_connections,
        )
        for i in range(n)
    )
    config = PoolConfig(
        name="web",
        backends=backends,
        strategy=strategy,
        slow_start=slow_start,
        panic_threshold=panic_threshold,
        passive_health=passive or PassiveHealthConfig(),
        queue=queue or QueueConfig(),
    )
    clock = FakeClock()
    events = RecordingEvents()
    return Pool(config, clock=clock, events=events), clock, events


def picks(pool: Pool, n: int) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        b = pool.select(CTX)
        out[b.name if b is not None else None] += 1  # type: ignore[index]
    return out


def weight_of(pool: Pool, backend: Backend) -> float:
    s = pool.strategy
    return s.weights[s.backends.index(backend)]


def fail(pool: Pool, backend: Backend, times: int) -> None:
    for _ in range(times):
        pool.begin(backend)
        pool.release(backend, failed=True)


def succeed(pool: Pool, backend: Backend) -> None:
    pool.begin(backend)
    pool.release(backend)


# -- set_healthy ------------------------------------------------------------------------------


def test_set_healthy_removes_from_selection_and_back() -> None:
    pool, _, events = make_pool(3)
    b0, b1, b2 = pool.backends
    assert set(picks(pool, 30)) == {"b0", "b1", "b2"}

    pool.set_healthy(b1, False, "3 consecutive failures: connection refused")
    assert b1.state is BackendState.DOWN
    assert picks(pool, 30) == Counter({"b0": 15, "b2": 15})
    assert events.health == [("b1", False, "3 consecutive failures: connection refused")]

    pool.set_healthy(b1, False, "again")  # no change: no event, no log
    assert len(events.health) == 1

    pool.set_healthy(b1, True, "2 consecutive passes")
    assert b1.state is BackendState.UP
    assert picks(pool, 30) == Counter({"b0": 10, "b1": 10, "b2": 10})
    assert events.health[-1] == ("b1", True, "2 consecutive passes")


def test_no_healthy_backend_selects_none() -> None:
    pool, _, _ = make_pool(2)
    for b in pool.backends:
        pool.set_healthy(b, False)
    assert pool.select(CTX) is None
    assert not pool.all_full()  # nothing eligible: 503 at once, not a wait in the queue


# -- slow start -------------------------------------------------------------------------------


def test_slow_start_ramps_weight_over_window() -> None:
    pool, clock, _ = make_pool(3, weights=(1, 4, 1), slow_start=10.0)
    b1 = pool.backends[1]
    assert weight_of(pool, b1) == 4.0  # present at start: no ramp

    pool.set_healthy(b1, False)
    clock.advance(30)
    pool.set_healthy(b1, True)
    assert pool.ramping
    assert weight_of(pool, b1) == pytest.approx(4.0 * SLOW_START_FLOOR)

    clock.advance(1.0)  # 10 % of the window
    pool.maintain()
    assert weight_of(pool, b1) == pytest.approx(0.4)
    clock.advance(4.0)  # 50 %
    pool.maintain()
    assert weight_of(pool, b1) == pytest.approx(2.0)
    clock.advance(5.0)  # 100 %
    pool.maintain()
    assert weight_of(pool, b1) == pytest.approx(4.0)
    assert not pool.ramping
    # the others never ramped
    assert weight_of(pool, pool.backends[0]) == 1.0
    assert weight_of(pool, pool.backends[2]) == 1.0


def test_slow_start_off_gives_full_weight_at_once() -> None:
    pool, clock, _ = make_pool(2, weights=(3, 3), slow_start=0.0)
    b0 = pool.backends[0]
    pool.set_healthy(b0, False)
    clock.advance(1)
    pool.set_healthy(b0, True)
    assert weight_of(pool, b0) == 3.0
    assert not pool.ramping


@pytest.mark.skipif(
    "weighted_round_robin" not in strategies.registered_names(),
    reason="weighted_round_robin not registered yet (the ramp is checked on weights above)",
)
def test_slow_start_share_with_weighted_round_robin() -> None:
    pool, clock, _ = make_pool(3, strategy="weighted_round_robin", slow_start=10.0)
    b1 = pool.backends[1]
    pool.set_healthy(b1, False)
    clock.advance(5)
    pool.set_healthy(b1, True)
    for elapsed, fraction in ((1.0, 0.1), (5.0, 0.5), (10.0, 1.0)):
        clock.now = b1.slow_start_began + elapsed
        pool.maintain()
        share = picks(pool, 2000)["b1"] / 2000
        expected = fraction / (fraction + 2.0)
        assert share == pytest.approx(expected, abs=0.05), (elapsed, share, expected)


# -- passive ejection -------------------------------------------------------------------------

PASSIVE = PassiveHealthConfig(
    consecutive_failures=3, ejection_time=10.0, max_ejection_time=50.0, max_ejected_percent=50
)


def test_passive_ejection_after_consecutive_failures_and_return() -> None:
    pool, clock, events = make_pool(4, passive=PASSIVE)
    b0 = pool.backends[0]

    fail(pool, b0, 2)
    succeed(pool, b0)  # a success breaks the streak
    fail(pool, b0, 2)
    assert not b0.ejected_until
    assert "b0" in picks(pool, 8)

    fail(pool, b0, 1)  # the third in a row
    assert b0.ejected_until == pytest.approx(clock() + 10.0)
    assert events.ejections == [("b0", 10.0)]
    assert b0.inflight == 0
    assert "b0" not in picks(pool, 30)
    assert b0.healthy  # ejection is not a health flip
    assert events.health == []

    clock.advance(9.9)
    pool.maintain()
    assert "b0" not in picks(pool, 30)
    clock.advance(0.2)
    pool.maintain()  # the ejection has expired: maintain() returns b0 to selection
    assert not b0.ejected_until
    assert "b0" in picks(pool, 8)


def test_ejection_time_doubles_on_repeat_up_to_the_cap() -> None:
    pool, clock, events = make_pool(4, passive=PASSIVE)
    b0 = pool.backends[0]
    durations = []
    for _ in range(5):
        fail(pool, b0, 3)
        durations.append(b0.ejected_until - clock())
        clock.advance(b0.ejected_until - clock() + 0.01)
        pool.maintain()
        assert not b0.ejected_until
    assert durations == pytest.approx([10.0, 20.0, 40.0, 50.0, 50.0])
    assert [d for _, d in events.ejections] == pytest.approx([10.0, 20.0, 40.0, 50.0, 50.0])


def test_max_ejected_percent_is_respected() -> None:
    pool, _, events = make_pool(4, passive=PASSIVE)  # 50 % of 4: at most 2 ejected
    b0, b1, b2, b3 = pool.backends
    fail(pool, b0, 3)
    fail(pool, b1, 3)
    assert b0.ejected_until and b1.ejected_until
    fail(pool, b2, 6)
    assert not b2.ejected_until
    assert pool.eject(b3, 10.0) is False
    assert [name for name, _ in events.ejections] == ["b0", "b1"]
    assert picks(pool, 20) == Counter({"b2": 10, "b3": 10})


def test_passive_ejection_disabled_with_zero_threshold() -> None:
    pool, _, events = make_pool(2, passive=PassiveHealthConfig(consecutive_failures=0))
    fail(pool, pool.backends[0], 50)
    assert not pool.backends[0].ejected_until
    assert events.ejections == []


def test_return_from_ejection_starts_slow_start() -> None:
    pool, clock, _ = make_pool(4, weights=(2, 2, 2, 2), slow_start=10.0, passive=PASSIVE)
    b0 = pool.backends[0]
    fail(pool, b0, 3)
    clock.advance(10.5)
    pool.maintain()
    assert weight_of(pool, b0) == pytest.approx(2.0 * SLOW_START_FLOOR)
    clock.advance(5.0)
    pool.maintain()
    assert weight_of(pool, b0) == pytest.approx(1.0)


# -- panic ------------------------------------------------------------------------------------


def test_panic_spreads_over_all_backends_including_down_ones() -> None:
    pool, _, events = make_pool(4, panic_threshold=50)
    b0, b1, b2, b3 = pool.backends
    pool.set_healthy(b0, False)
    pool.set_healthy(b1, False)  # 2 of 4 healthy: exactly at the threshold, no panic
    assert not pool.panic
    assert set(picks(pool, 20)) == {"b2", "b3"}

    pool.set_healthy(b2, False)  # 1 of 4 healthy: below 50 %
    assert pool.panic
    assert events.panics == [True]
    assert picks(pool, 40) == Counter({"b0": 10, "b1": 10, "b2": 10, "b3": 10})
    assert pool.status()["panic"] is True

    pool.set_healthy(b0, True)
    assert not pool.panic
    assert events.panics == [True, False]
    assert set(picks(pool, 20)) == {"b0", "b3"}


def test_panic_includes_ejected_backends() -> None:
    passive = PassiveHealthConfig(consecutive_failures=1, max_ejected_percent=100)
    pool, _, _ = make_pool(3, panic_threshold=50, passive=passive)
    b0, b1, b2 = pool.backends
    fail(pool, b0, 1)
    fail(pool, b1, 1)
    assert b0.ejected_until and b1.ejected_until
    assert pool.panic
    assert set(picks(pool, 30)) == {"b0", "b1", "b2"}


def test_drained_and_disabled_never_selected_even_in_panic() -> None:
    pool, _, _ = make_pool(4, panic_threshold=50)
    b0, b1, b2, b3 = pool.backends
    pool.set_admin_state(b0, BackendState.DISABLED)
    pool.set_admin_state(b1, BackendState.DRAINING)
    pool.set_healthy(b2, False)
    # only the two in service count: one of two healthy is 50%, not below the threshold
    assert not pool.panic
    assert picks(pool, 40) == Counter({"b3": 40})

    pool.set_healthy(b3, False)  # nothing healthy at all: panic, still only the two not drained
    assert pool.panic
    assert picks(pool, 40) == Counter({"b2": 20, "b3": 20})


def test_without_panic_threshold_down_backends_stay_out() -> None:
    pool, _, events = make_pool(4, panic_threshold=0)
    for b in pool.backends[:3]:
        pool.set_healthy(b, False)
    assert not pool.panic
    assert picks(pool, 12) == Counter({"b3": 12})
    assert events.panics == []


# -- max_connections and the wait queue --------------------------------------------------------


def fill(pool: Pool) -> None:
    for b in pool.backends:
        while not b.full:
            pool.begin(b)


def test_full_backends_are_skipped() -> None:
    pool, _, _ = make_pool(2, max_connections=1)
    b0, b1 = pool.backends
    pool.begin(b0)
    assert picks(pool, 4) == Counter({"b1": 4})
    pool.begin(b1)
    assert pool.all_full()
    assert pool.select(CTX) is None


def test_queued_request_wakes_when_a_slot_is_released() -> None:
    async def scenario() -> None:
        pool, _, _ = make_pool(2, max_connections=1, queue=QueueConfig(size=10, timeout=5.0))
        fill(pool)
        assert pool.all_full()
        first = asyncio.create_task(pool.wait_for_capacity(5.0))
        second = asyncio.create_task(pool.wait_for_capacity(5.0))
        await asyncio.sleep(0.01)
        assert pool.queue_depth == 2
        assert not first.done()

        pool.release(pool.backends[0])
        assert await asyncio.wait_for(first, 1.0) is True
        await asyncio.sleep(0.01)
        assert not second.done()  # one release wakes one waiter, in arrival order
        assert pool.select(CTX) is pool.backends[0]

        pool.release(pool.backends[1])
        assert await asyncio.wait_for(second, 1.0) is True
        assert pool.queue_depth == 0

    asyncio.run(scenario())


def test_queued_request_times_out() -> None:
    async def scenario() -> None:
        pool, _, _ = make_pool(1, max_connections=1)
        fill(pool)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await pool.wait_for_capacity(0.05) is False
        assert loop.time() - started >= 0.04
        assert pool.queue_timeouts == 1
        assert pool.queue_depth == 0
        assert not pool.has_capacity_waiters

    asyncio.run(scenario())


def test_queue_size_is_bounded() -> None:
    async def scenario() -> None:
        pool, _, _ = make_pool(1, max_connections=1, queue=QueueConfig(size=2, timeout=5.0))
        fill(pool)
        waiting = [asyncio.create_task(pool.wait_for_capacity(5.0)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert pool.queue_depth == 2
        # the queue is full: refused at once, not after the timeout
        assert await asyncio.wait_for(pool.wait_for_capacity(5.0), 0.5) is False
        assert pool.queue_depth == 2
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert pool.queue_depth == 0

    asyncio.run(scenario())


def test_queue_size_zero_means_no_queue() -> None:
    async def scenario() -> None:
        pool, _, _ = make_pool(1, max_connections=1, queue=QueueConfig(size=0))
        fill(pool)
        assert await asyncio.wait_for(pool.wait_for_capacity(5.0), 0.5) is False

    asyncio.run(scenario())


# -- a rebuilt snapshot keeps its rotation ----------------------------------------------------


@pytest.mark.parametrize(
    "strategy", ["round_robin", "weighted_round_robin", "least_connections", "least_load"]
)
def test_rotation_survives_a_rebuild_per_pick(strategy: str) -> None:
    # a slow-start ramp rebuilds the strategy on every maintain() tick; if each rebuild
    # restarted the rotation, every request between two ticks would go to the first backend
    pool, clock, _ = make_pool(3, strategy=strategy, slow_start=60.0)
    pool.set_healthy(pool.backends[2], False)
    pool.set_healthy(pool.backends[2], True)  # b2 now ramping: maintain() rebuilds each time
    seen: Counter[str] = Counter()
    for _ in range(60):
        clock.advance(0.5)
        pool.maintain()
        b = pool.select(CTX)
        assert b is not None
        seen[b.name] += 1
    assert seen["b0"] >= 20 and seen["b1"] >= 20, seen
