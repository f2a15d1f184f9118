"""HaNode on loopback: two real nodes with real heartbeats, the VIP kept in memory (no root)."""

from __future__ import annotations

import asyncio
import logging
import shlex
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from balancer.config import Address, HaConfig
from balancer.ha.node import HaNode, vip_lifetime

ADV = 0.05
DEAD = 0.2
KEY = "node-test-key-0123456789abcdef"


class World:
    """Which node 'holds' the VIP, as the fake VIPs of all nodes in a test see it."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.history: list[tuple[float, frozenset[str]]] = []

    def set(self, name: str, held: bool) -> None:
        (self.held.add if held else self.held.discard)(name)
        self.history.append((time.monotonic(), frozenset(self.held)))


class FakeVip:
    """Stands in for balancer.ha.vip.Vip: same calls, a set instead of the kernel."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name
        self.announced = 0
        self.garp_count = 5
        self.add_delay = 0.0
        self.closed = False

    def _done(self, value: Any) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(value)
        return fut

    def add(self) -> asyncio.Future:
        if not self.add_delay:
            self.world.set(self.name, True)
            return self._done(None)
        # Like netlink in its worker thread: the address appears a little later.
        fut = asyncio.get_running_loop().create_future()

        def done() -> None:
            self.world.set(self.name, True)
            fut.set_result(None)

        asyncio.get_running_loop().call_later(self.add_delay, done)
        return fut

    def remove(self) -> asyncio.Future:
        was = self.name in self.world.held
        self.world.set(self.name, False)
        return self._done(was)

    def holds_vip(self) -> asyncio.Future:
        return self._done(self.name in self.world.held)

    async def send_garp(self) -> None:
        self.announced += 1

    async def announce(self, count: int | None = None, *, delay_first: bool = False) -> None:
        self.announced += self.garp_count if count is None else count

    def close(self) -> None:
        self.closed = True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "ha.key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return str(path)


def config(name: str, port: int, peer: int, key_file: str, **kw: Any) -> HaConfig:
    return HaConfig(
        node_id=name,
        interface="eth0",
        virtual_ip="198.18.0.100/24",
        auth_key_file=key_file,
        peers=(Address("127.0.0.1", peer),),
        priority=kw.pop("priority", 100),
        bind=Address("127.0.0.1", port),
        advert_interval=ADV,
        dead_after=kw.pop("dead_after", DEAD),
        **kw,
    )


class Pair:
    def __init__(self, key_file: str, world: World, **per_node: dict[str, Any]) -> None:
        p1, p2 = free_port(), free_port()
        self.roles: dict[str, list[str]] = {"lb1": [], "lb2": []}
        self.health = {"lb1": True, "lb2": True}
        specs = {"lb1": (p1, p2, 150), "lb2": (p2, p1, 100)}
        self.nodes: dict[str, HaNode] = {}
        for name, (port, peer, prio) in specs.items():
            kw = {"priority": prio, **per_node.get(name, {})}
            node = HaNode(
                config(name, port, peer, key_file, **kw),
                local_health=lambda n=name: self.health[n],
                on_role_change=self.roles[name].append,
            )
            node._slots[0].vip = FakeVip(world, name)  # type: ignore[assignment]
            self.nodes[name] = node

    async def start(self) -> None:
        for node in self.nodes.values():
            await node.start()

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.shutdown()


async def until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"no {what} within {timeout}s"
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


LOOPS: dict[str, Callable[[Awaitable[Any]], Any]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(params=sorted(LOOPS))
def run(request) -> Callable[[Awaitable[Any]], Any]:
    return LOOPS[request.param]


def test_vip_lifetime_whole_seconds_at_least_two() -> None:
    assert vip_lifetime(0.6) == 2
    assert vip_lifetime(3.0) == 6
    assert vip_lifetime(1.1) == 3


def test_status_before_start(key_file: str) -> None:
    node = HaNode(config("lb1", 5405, 5406, key_file, priority=150))
    st = node.status()
    assert st["role"] == node.role == "passive"
    assert st["node_id"] == "lb1" and st["priority"] == st["effective_priority"] == 150
    assert st["holds_vip"] is False
    assert st["peers"] == [
        {
            "address": "127.0.0.1:5406",
            "node_id": None,
            "live": False,
            "last_seen_age": None,
            "role": None,
            "priority": None,
        }
    ]
    assert (node.heartbeats_sent, node.heartbeats_received, node.transitions) == (0, 0, 0)
    assert node.heartbeats_rejected == {}


def test_pair_elects_higher_priority_and_reports_status(run, key_file: str) -> None:
    world = World()
    pair = Pair(key_file, world)

    async def main() -> None:
        await pair.start()
        try:
            lb1, lb2 = pair.nodes["lb1"], pair.nodes["lb2"]
            await until(lambda: world.held == {"lb1"}, 2, "lb1 holding")
            await asyncio.sleep(5 * ADV)
            assert (lb1.role, lb2.role) == ("active", "passive")
            assert pair.roles == {"lb1": ["active"], "lb2": []}
            assert lb1._slots[0].vip.announced == 5  # type: ignore[attr-defined]
            st = lb1.status()
            assert st["holds_vip"] is True and st["transitions"] == 1
            (peer,) = st["peers"]
            assert peer["node_id"] == "lb2" and peer["live"] and peer["role"] == "passive"
            assert lb1.heartbeats_sent > 3 and lb1.heartbeats_received > 3
            assert sum(lb1.heartbeats_rejected.values()) == 0
            assert world.held == {"lb1"}
        finally:
            await pair.close()

    run(main())


def test_crashed_active_is_replaced_before_dead_after(run, key_file: str) -> None:
    world = World()
    # A long dead_after, so only crash detection can explain a fast takeover.
    pair = Pair(key_file, world, lb1={"dead_after": 1.0}, lb2={"dead_after": 1.0})

    async def main() -> None:
        await pair.start()
        try:
            await until(lambda: world.held == {"lb1"}, 5, "lb1 holding")
            # What kill -9 leaves: no resign, sockets closed, the port unreachable.
            await pair.nodes["lb1"]._stop()
            took = await until(lambda: pair.nodes["lb2"].role == "active", 2, "takeover")
            assert took < 0.5, f"took {took:.3f}s: crash detection, not dead_after (1 s)"
            assert "crashed" in pair.nodes["lb2"].status()["last_transition"]
        finally:
            await pair.nodes["lb2"].shutdown()

    run(main())


def test_shutdown_of_active_hands_over_then_drains_then_releases(run, key_file: str) -> None:
    world = World()
    pair = Pair(key_file, world)
    drain_saw: list[Any] = []

    async def main() -> None:
        await pair.start()
        lb1, lb2 = pair.nodes["lb1"], pair.nodes["lb2"]
        try:
            await until(lambda: world.held == {"lb1"}, 2, "lb1 holding")
            # lb2 must not be heard active before its VIP is really there, or lb1 would
            # release while clients still come to it.
            lb2._slots[0].vip.add_delay = 0.05  # type: ignore[attr-defined]

            async def drain() -> None:
                drain_saw.append((lb2.role, set(world.held)))
                await asyncio.sleep(0.1)
                drain_saw.append(set(world.held))

            t0 = time.monotonic()
            await lb1.shutdown(drain)
            took = time.monotonic() - t0
            assert drain_saw[0] == ("active", {"lb1", "lb2"}), "successor first, then drain"
            assert drain_saw[1] == {"lb1", "lb2"}, "the VIP stays while draining"
            assert world.held == {"lb2"}
            assert took < DEAD, "no dead_after wait: the resign is heard at once"
            assert pair.roles["lb1"] == ["active", "passive"]
            assert lb1._slots[0].vip.closed  # type: ignore[attr-defined]
            # never a moment with nobody holding it
            assert all(h for t, h in world.history if t > t0)
        finally:
            await lb2.shutdown()

    run(main())


def test_shutdown_of_a_lone_active_does_not_wait_for_a_successor(run, key_file: str) -> None:
    world = World()
    pair = Pair(key_file, world, lb1={"dead_after": 1.0}, lb2={"dead_after": 1.0})

    async def main() -> None:
        await pair.start()
        lb1, lb2 = pair.nodes["lb1"], pair.nodes["lb2"]
        await until(lambda: world.held == {"lb1"}, 5, "lb1 holding")
        await lb2._stop()  # the peer is gone (killed): its port answers unreachable
        await until(lambda: not lb1._group.any_live_peer(lb1._clock()), 3, "peer seen gone")
        t0 = time.monotonic()
        await lb1.shutdown()
        assert time.monotonic() - t0 < 0.5, "no dead_after (1 s) wait for a successor"
        assert world.held == set()

    run(main())


def test_shutdown_of_passive_just_stops(run, key_file: str) -> None:
    world = World()
    pair = Pair(key_file, world)
    drained: list[bool] = []

    async def main() -> None:
        await pair.start()
        try:
            await until(lambda: world.held == {"lb1"}, 2, "lb1 holding")

            async def drain() -> None:
                drained.append(True)

            await pair.nodes["lb2"].shutdown(drain)
            assert drained == [True]
            assert world.held == {"lb1"}
            assert pair.nodes["lb1"].role == "active"
        finally:
            await pair.nodes["lb1"].shutdown()

    run(main())


def test_unhealthy_active_fences_itself_and_takes_back_when_healthy(run, key_file: str) -> None:
    world = World()
    pair = Pair(key_file, world, lb2={"priority": 120})

    async def main() -> None:
        await pair.start()
        try:
            lb1 = pair.nodes["lb1"]
            await until(lambda: world.held == {"lb1"}, 2, "lb1 holding")
            pair.health["lb1"] = False
            await until(lambda: world.held == {"lb2"}, 2, "fenced hand-over")
            assert lb1.status()["effective_priority"] == 100
            pair.health["lb1"] = True
            await until(lambda: world.held == {"lb1"}, 3, "take back")
            t_first = next(t for t, h in world.history if h == {"lb1"})
            assert all(h for t, h in world.history if t >= t_first), "never nobody"
            assert pair.roles["lb1"] == ["active", "passive", "active"]
        finally:
            await pair.close()

    run(main())


def test_start_removes_a_left_over_vip_and_passive_never_keeps_one(
    run, key_file: str, caplog
) -> None:
    world = World()
    world.held = {"lb2"}  # left by a previous run of lb2
    pair = Pair(key_file, world)

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="balancer.ha"):
            await pair.start()
            try:
                assert world.held == set()
                await until(lambda: world.held == {"lb1"}, 2, "lb1 holding")
                world.set("lb2", True)  # someone adds it by hand on the passive
                await until(lambda: world.held == {"lb1"}, 4 * ADV, "passive cleanup")
            finally:
                await pair.close()
        assert "left by a previous run" in caplog.text
        assert "a passive node must not hold it" in caplog.text

    run(main())


def test_notify_runs_in_order_with_role_argument(run, key_file: str, tmp_path: Path) -> None:
    out = tmp_path / "notify.log"
    script = f"import sys; open({str(out)!r}, 'a').write(sys.argv[1] + chr(10))"
    notify = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    world = World()
    pair = Pair(key_file, world, lb1={"notify": notify})

    async def main() -> None:
        await pair.start()
        try:
            await until(lambda: world.held == {"lb1"}, 2, "lb1 holding")
        finally:
            await pair.close()  # the final notify (passive) runs before shutdown returns

    run(main())
    assert out.read_text().split() == ["active", "passive"]


def test_failing_notify_is_logged_and_blocks_nothing(run, key_file: str, caplog) -> None:
    world = World()
    pair = Pair(key_file, world, lb1={"notify": "/nonexistent/notify-script --flag"})

    async def main() -> None:
        with caplog.at_level(logging.ERROR, logger="balancer.ha"):
            await pair.start()
            try:
                await until(lambda: world.held == {"lb1"}, 2, "lb1 holding")
                await until(lambda: "notify" in caplog.text, 2, "notify error")
            finally:
                await pair.close()

    run(main())
    assert "/nonexistent/notify-script --flag active" in caplog.text


def test_role_changes_are_logged_at_warning_with_reason(run, key_file: str, caplog) -> None:
    world = World()
    pair = Pair(key_file, world)

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="balancer.ha"):
            await pair.start()
            try:
                await until(lambda: world.held == {"lb1"}, 2, "lb1 holding")
            finally:
                await pair.close()

    run(main())
    records = [r for r in caplog.records if "is now" in r.getMessage()]
    assert records[0].levelno == logging.WARNING
    assert "lb1 is now active: no better peer heard" in records[0].getMessage()
    assert "lb1 is now passive: resigning" in caplog.text
