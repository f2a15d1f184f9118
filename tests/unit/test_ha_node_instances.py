"""HaNode with two floating IPs on loopback: real heartbeats (version 2), VIPs kept in memory."""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from balancer.config import Address, HaConfig, HaInstanceConfig
from balancer.ha.node import HaNode
from tests.unit.test_ha_node import LOOPS, FakeVip, World, free_port, key_file, until

__all__ = ["key_file"]  # the fixture, used by name

ADV = 0.05
DEAD = 0.2
A, B = "198.18.0.100/24", "198.18.0.101/24"
A_IP, B_IP = "198.18.0.100", "198.18.0.101"


@pytest.fixture(params=sorted(LOOPS))
def run(request):  # type: ignore[no-untyped-def]
    return LOOPS[request.param]


def config(name: str, port: int, peer: int, key_file: str, instances, **kw: Any) -> HaConfig:  # type: ignore[no-untyped-def]
    specs = tuple(HaInstanceConfig(vip, prio) for vip, prio in instances)
    return HaConfig(
        node_id=name,
        interface="eth0",
        virtual_ip=specs[0].virtual_ip,
        priority=specs[0].priority,
        auth_key_file=key_file,
        peers=(Address("127.0.0.1", peer),),
        bind=Address("127.0.0.1", port),
        advert_interval=ADV,
        dead_after=kw.pop("dead_after", DEAD),
        instances=specs,
        **kw,
    )


class Pair:
    """lb1 prefers A, lb2 prefers B; a World per address says who holds it."""

    def __init__(self, key_file: str, **per_node: dict[str, Any]) -> None:
        p1, p2 = free_port(), free_port()
        self.key_file = key_file
        self.worlds = {A_IP: World(), B_IP: World()}
        self.roles: dict[str, list[str]] = {"lb1": [], "lb2": []}
        self.specs = {
            "lb1": (p1, p2, [(A, 150), (B, 100)]),
            "lb2": (p2, p1, [(B, 150), (A, 100)]),
        }
        self.nodes: dict[str, HaNode] = {}
        for name in self.specs:
            self.nodes[name] = self.make(name, **per_node.get(name, {}))

    def make(self, name: str, **kw: Any) -> HaNode:
        """A node of the pair (again, for a restart): same ports, same VIPs."""
        port, peer, instances = self.specs[name]
        instances = kw.pop("instances", instances)
        node = HaNode(
            config(name, port, peer, self.key_file, instances, **kw),
            on_role_change=self.roles[name].append,
        )
        for slot in node._slots:
            slot.vip = FakeVip(self.worlds[slot.address], name)  # type: ignore[assignment]
        return node

    def held(self, address: str) -> set[str]:
        return self.worlds[address].held

    def settled(self) -> bool:
        return self.held(A_IP) == {"lb1"} and self.held(B_IP) == {"lb2"}

    async def start(self) -> None:
        for node in self.nodes.values():
            await node.start()

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.shutdown()


def test_each_node_holds_its_preferred_address_and_says_so(run, key_file: str) -> None:
    pair = Pair(key_file)

    async def main() -> None:
        await pair.start()
        try:
            await until(pair.settled, 3, "each node holding its address")
            await asyncio.sleep(5 * ADV)
            assert pair.settled()
            lb1 = pair.nodes["lb1"]
            assert lb1.role == pair.nodes["lb2"].role == "active"
            assert lb1.instance_roles() == [(A, "active"), (B, "passive")]
            st = lb1.status()
            assert st["role"] == "active" and st["holds_vip"] is True
            assert (st["vip"], st["priority"]) == (A, 150)  # the first instance's, as before
            assert [(i["virtual_ip"], i["role"], i["priority"], i["holds_vip"]) for i in
                    st["instances"]] == [(A, "active", 150, True), (B, "passive", 100, False)]  # fmt: skip
            (peer_b,) = st["instances"][1]["peers"]
            assert (peer_b["node_id"], peer_b["role"], peer_b["priority"]) == (
                "lb2",
                "active",
                150,
            )
            assert st["transitions"] == 1
            assert sum(st["heartbeats"]["rejected"].values()) == 0
            # one heartbeat per interval for both addresses, not one per address
            sent = lb1.heartbeats_sent
            await asyncio.sleep(10 * ADV)
            assert lb1.heartbeats_sent - sent <= 13
            assert pair.roles == {"lb1": ["active"], "lb2": ["active"]}
        finally:
            await pair.close()

    run(main())


def test_crash_moves_both_addresses_then_preempt_false_return_moves_nothing(
    run, key_file: str
) -> None:
    pair = Pair(key_file, lb1={"preempt": False}, lb2={"preempt": False})

    async def main() -> None:
        await pair.start()
        lb1, lb2 = pair.nodes["lb1"], pair.nodes["lb2"]
        try:
            await until(pair.settled, 3, "each node holding its address")
            await lb2._stop()  # kill -9: port unreachable, no resign
            took = await until(lambda: pair.held(B_IP) == {"lb1", "lb2"}, 2, "lb1 takes B")
            assert took < DEAD, "crash detection, not dead_after"
            assert lb1.instance_roles() == [(A, "active"), (B, "active")]
            assert "198.18.0.101/24: " in lb1.status()["last_transition"]
            pair.worlds[B_IP].set("lb2", False)  # the dead node's kernel lifetime ran out

            # lb2 comes back: preempt false, it takes back nothing
            new = pair.make("lb2", preempt=False)
            await new.start()
            try:
                await asyncio.sleep(6 * DEAD)
                assert pair.held(A_IP) == {"lb1"} and pair.held(B_IP) == {"lb1"}
                assert new.role == "passive"
                assert all(i["role"] == "passive" for i in new.status()["instances"])
            finally:
                await new.shutdown()
        finally:
            await lb1.shutdown()

    run(main())


def test_shutdown_hands_over_every_held_address_then_drains(run, key_file: str) -> None:
    pair = Pair(key_file)
    saw: list[Any] = []

    async def main() -> None:
        await pair.start()
        lb1, lb2 = pair.nodes["lb1"], pair.nodes["lb2"]
        try:
            await until(pair.settled, 3, "each node holding its address")
            await lb2._stop()
            await until(lambda: pair.held(B_IP) >= {"lb1"}, 2, "lb1 holds both")
            pair.worlds[B_IP].set("lb2", False)
            # lb2 back (same port), preempt on: it takes B back; then lb1 shuts down
            new = pair.make("lb2")
            t_back = time.monotonic()
            await new.start()
            await until(pair.settled, 3, "lb2 takes its preferred address back")
            assert time.monotonic() - t_back >= DEAD, "it listened first"
            pair.nodes["lb2"] = new

            async def drain() -> None:
                saw.append((set(pair.held(A_IP)), set(pair.held(B_IP))))

            t0 = time.monotonic()
            await lb1.shutdown(drain)
            took = time.monotonic() - t0
            assert saw == [({"lb1", "lb2"}, {"lb2"})], "successor holds A before the drain"
            assert pair.held(A_IP) == {"lb2"} and pair.held(B_IP) == {"lb2"}
            assert took < DEAD, "no dead_after wait"
            for address in (A_IP, B_IP):
                t_first = next(t for t, h in pair.worlds[address].history if t >= t_back and h)
                assert all(h for t, h in pair.worlds[address].history if t >= t_first)
            assert new.instance_roles() == [(B, "active"), (A, "active")]
        finally:
            await pair.nodes["lb2"].shutdown()

    run(main())


def test_notify_per_instance_with_its_address(run, key_file: str, tmp_path: Path) -> None:
    out = tmp_path / "notify.log"
    script = f"import sys; open({str(out)!r}, 'a').write(' '.join(sys.argv[1:]) + chr(10))"
    notify = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    pair = Pair(key_file, lb1={"notify": notify})

    async def main() -> None:
        await pair.start()
        try:
            await until(pair.settled, 3, "each node holding its address")
            await pair.nodes["lb2"]._stop()
            await until(lambda: "lb1" in pair.held(B_IP), 2, "lb1 takes B")
        finally:
            await pair.nodes["lb1"].shutdown()

    run(main())
    assert out.read_text().splitlines() == [f"active {A}", f"active {B}", *sorted(
        [f"passive {A}", f"passive {B}"])]  # fmt: skip


def test_a_single_ip_peer_is_refused_with_a_reason(run, key_file: str, caplog) -> None:
    """lb2 still has one floating IP (version 1): lb1, with two, refuses it and says why."""
    pair = Pair(key_file, lb2={"instances": [(A, 100)]})

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="balancer.ha"):
            await pair.start()
            try:
                lb1 = pair.nodes["lb1"]
                await until(lambda: lb1.heartbeats_rejected.get("version", 0) > 2, 2, "refusals")
                assert lb1.heartbeats_received == 0
            finally:
                await pair.close()

    run(main())
    assert "several ha.instances" in caplog.text
