"""Several floating IPs per pair: InstanceGroups exchanging heartbeats on a virtual clock (pure)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from balancer.config import HaInstanceConfig as Instance
from balancer.ha.instances import InstanceGroup, PeerRecord, address_of
from balancer.ha.state import (
    Action,
    HealthChanged,
    Outcome,
    PeerAdvert,
    PeerCrashed,
    ResignRequested,
    Role,
    Tick,
)

ADV = 0.1
DEAD = 0.3
A, B = "198.18.0.100/24", "198.18.0.101/24"
A_IP, B_IP = address_of(A), address_of(B)


class Sim:
    """Two (or more) nodes, their heartbeats delivered at once, the VIPs each would hold."""

    def __init__(self, preempt: bool = True, **nodes: Sequence[tuple[str, int]]) -> None:
        self.now = 0.0
        self.preempt = preempt
        self.specs = {name: list(spec) for name, spec in nodes.items()}
        self.groups: dict[str, InstanceGroup] = {}
        self.held: dict[str, set[str]] = {}
        self.next_advert: dict[str, float] = {}
        self.history: list[tuple[float, dict[str, frozenset[str]]]] = []  # per address: holders
        self.unmatched: dict[str, list[str]] = {}
        self._outbox: list[str] = []
        for name in nodes:
            self.start(name)

    def start(self, name: str) -> None:
        self.groups[name] = InstanceGroup(
            name,
            [Instance(vip, prio) for vip, prio in self.specs[name]],
            advert_interval=ADV,
            dead_after=DEAD,
            preempt=self.preempt,
            now=self.now,
        )
        self.held[name] = set()
        self.next_advert[name] = self.now
        self.unmatched[name] = []

    def kill(self, name: str, *, crash_seen: bool = True) -> None:
        """kill -9: no resign. crash_seen: the peer hears port-unreachable (R4)."""
        del self.groups[name]
        self.held[name] = set()  # the address may linger a little; the test is about the rest
        self._record()
        if crash_seen:
            for other in list(self.groups):
                self.apply(other, self.groups[other].handle(PeerCrashed(self.now, name)))
            self._flush()

    def apply(self, name: str, outcomes: list[tuple[str, Outcome]]) -> None:
        for address, outcome in outcomes:
            for action in outcome.actions:
                if action is Action.ADD_VIP:
                    self.held[name].add(address)
                elif action is Action.REMOVE_VIP:
                    self.held[name].discard(address)
                elif action in (Action.SEND_ADVERT, Action.SEND_RESIGN):
                    self._outbox.append(name)
        self._record()

    def send(self, name: str) -> None:
        group = self.groups[name]
        records = [
            PeerRecord(address, a.priority, a.role, a.resigning, a.ready, a.preempt)
            for address, a in group.adverts(self.now)
        ]
        self.deliver(name, records)

    def deliver(self, sender: str, records: list[PeerRecord]) -> None:
        for other, group in list(self.groups.items()):
            if other != sender:
                outcomes, unmatched = group.heard(self.now, sender, records)
                self.unmatched[other] += unmatched
                self.apply(other, outcomes)

    def _flush(self) -> None:
        for _ in range(100):  # bounded: each advert reflects a state change, they die out
            if not self._outbox:
                return
            name = self._outbox.pop(0)
            if name in self.groups:
                self.send(name)
        raise AssertionError("heartbeats never settled")

    def run(self, seconds: float, step: float = 0.01) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = round(self.now + step, 6)
            for name in list(self.groups):
                self.apply(name, self.groups[name].handle(Tick(self.now)))
                if self.now >= self.next_advert[name]:
                    self.next_advert[name] += ADV
                    self._outbox.append(name)
            self._flush()

    def resign(self, name: str) -> None:
        self.apply(name, self.groups[name].handle(ResignRequested(self.now)))
        self._flush()

    def holders(self, address: str) -> set[str]:
        return {name for name, held in self.held.items() if address in held}

    def role(self, name: str, address: str) -> Role:
        return self.groups[name].machines[address].role

    def _record(self) -> None:
        self.history.append((self.now, {a: frozenset(self.holders(a)) for a in (A_IP, B_IP)}))

    def mark(self) -> int:
        return len(self.history)

    def never_nobody(self, address: str, since: int) -> bool:
        """Some node held address at every change since the mark."""
        return all(h[address] for _, h in self.history[since:])


def crossed(preempt: bool = True) -> Sim:
    """lb1 prefers .100, lb2 prefers .101, each backs up the other's (the lists in any order)."""
    sim = Sim(preempt, lb1=[(A, 150), (B, 100)], lb2=[(B, 150), (A, 100)])
    sim.run(1.0)
    return sim


def test_each_node_is_active_for_its_preferred_address() -> None:
    sim = crossed()
    assert sim.holders(A_IP) == {"lb1"} and sim.holders(B_IP) == {"lb2"}
    assert (sim.role("lb1", A_IP), sim.role("lb1", B_IP)) == (Role.ACTIVE, Role.PASSIVE)
    assert (sim.role("lb2", B_IP), sim.role("lb2", A_IP)) == (Role.ACTIVE, Role.PASSIVE)
    # the node's role: active while it holds any address
    assert sim.groups["lb1"].role is sim.groups["lb2"].role is Role.ACTIVE
    assert sim.groups["lb1"].transitions == 1
    assert sim.unmatched == {"lb1": [], "lb2": []}
    # and it stays that way: no flapping
    sim.run(2.0)
    assert sim.groups["lb1"].transitions == sim.groups["lb2"].transitions == 1


def test_a_crashed_node_leaves_both_addresses_to_the_other_at_once() -> None:
    sim = crossed()
    sim.kill("lb2")  # port unreachable heard: no dead_after wait
    assert sim.holders(A_IP) == {"lb1"} and sim.holders(B_IP) == {"lb1"}
    assert "crashed" in sim.groups["lb1"].machines[B_IP].last_reason


def test_a_silent_node_leaves_both_addresses_after_dead_after() -> None:
    sim = crossed()
    t, mark = sim.now, sim.mark()
    sim.kill("lb1", crash_seen=False)  # a hang or a cut cable: only silence
    sim.run(DEAD - 0.05)
    assert sim.holders(A_IP) == set(), "nothing claimed before dead_after"
    sim.run(0.3)
    assert sim.holders(A_IP) == {"lb2"} and sim.holders(B_IP) == {"lb2"}
    claimed = next(t2 for t2, h in sim.history if h[A_IP] == {"lb2"})
    assert DEAD <= claimed - t <= DEAD + ADV, claimed - t
    assert sim.never_nobody(B_IP, mark), "the address lb2 held never moved"


def test_return_without_preempt_takes_back_nothing() -> None:
    sim = crossed(preempt=False)
    sim.kill("lb2")
    sim.start("lb2")
    sim.run(3.0)
    assert sim.holders(A_IP) == {"lb1"} and sim.holders(B_IP) == {"lb1"}
    assert sim.role("lb2", A_IP) is sim.role("lb2", B_IP) is Role.PASSIVE
    assert sim.groups["lb2"].role is Role.PASSIVE
    # it is ready to take either back the moment lb1 goes
    assert all(a.ready for _, a in sim.groups["lb2"].adverts(sim.now))
    sim.kill("lb1")
    assert sim.holders(A_IP) == {"lb2"} and sim.holders(B_IP) == {"lb2"}


def test_return_with_preempt_takes_back_only_the_preferred_address() -> None:
    sim = crossed(preempt=True)
    sim.kill("lb2")
    t_back = sim.mark()
    sim.start("lb2")
    sim.run(0.2)
    assert sim.holders(B_IP) == {"lb1"}, "the returning node listens before it takes over"
    sim.run(2.0)
    assert sim.holders(B_IP) == {"lb2"}
    assert sim.holders(A_IP) == {"lb1"}, "the address lb1 prefers stays"
    assert sim.role("lb2", A_IP) is Role.PASSIVE
    assert sim.never_nobody(B_IP, t_back), "make before break: never nobody"
    assert sim.never_nobody(A_IP, t_back)
    assert "preempted by lb2" in sim.groups["lb1"].machines[B_IP].last_reason
    assert sim.groups["lb1"].machines[A_IP].transitions == 1


def test_equal_priorities_break_the_tie_by_node_id_per_address() -> None:
    sim = Sim(lb2=[(A, 100), (B, 100)], lb1=[(B, 100), (A, 100)])
    sim.run(1.0)
    assert sim.holders(A_IP) == {"lb1"} and sim.holders(B_IP) == {"lb1"}
    assert sim.groups["lb2"].role is Role.PASSIVE
    # and with one tie and one preference, each address is decided on its own
    sim = Sim(lb1=[(A, 100), (B, 100)], lb2=[(A, 100), (B, 120)])
    sim.run(1.0)
    assert sim.holders(A_IP) == {"lb1"} and sim.holders(B_IP) == {"lb2"}


def test_resign_hands_over_every_held_address_make_before_break() -> None:
    sim = crossed()
    t = sim.mark()
    sim.resign("lb1")
    assert sim.held["lb1"] == {A_IP}, "resigning keeps the VIP until the caller has drained"
    assert sim.holders(A_IP) == {"lb1", "lb2"}, "the successor claimed at once"
    assert sim.groups["lb1"].role is Role.PASSIVE
    sim.run(2.0)
    assert sim.holders(B_IP) == {"lb2"}
    assert sim.never_nobody(A_IP, t)
    assert sim.groups["lb1"].next_deadline() is None, "a resigned node never claims again"


def test_fencing_lowers_every_instance_and_hands_over_only_where_outranked() -> None:
    sim = Sim(lb1=[(A, 150), (B, 120)], lb2=[(A, 110), (B, 60)])
    sim.run(1.0)
    assert sim.holders(A_IP) == {"lb1"} and sim.holders(B_IP) == {"lb1"}
    sim.apply("lb1", sim.groups["lb1"].handle(HealthChanged(sim.now, False)))
    sim.run(1.0)
    # 150 - 50 = 100 < 110: handed over; 120 - 50 = 70 > 60: kept
    assert sim.holders(A_IP) == {"lb2"} and sim.holders(B_IP) == {"lb1"}
    assert [a.priority for _, a in sim.groups["lb1"].adverts(sim.now)] == [100, 70]


def test_old_single_instance_format_counts_only_for_a_single_instance_node() -> None:
    old = PeerRecord(None, 200, Role.ACTIVE)  # a version-1 heartbeat names no address
    single = InstanceGroup("lb2", [Instance(A, 100)], advert_interval=ADV, dead_after=DEAD, now=0)
    outcomes, unmatched = single.heard(0.1, "lb1", [old])
    assert unmatched == [] and [a for a, _ in outcomes] == [A_IP]
    assert single.machines[A_IP].peers["lb1"].priority == 200

    # a node with two addresses cannot tell which one it means: ignored and reported, so the
    # old peer's claim does not block it (the heartbeat layer refuses version 1 before this)
    sim = Sim(lb2=[(A, 100), (B, 100)])
    for _ in range(20):
        sim.deliver("lb1", [old])
        sim.run(ADV)
    assert sim.holders(A_IP) == {"lb2"} and sim.holders(B_IP) == {"lb2"}
    assert sim.unmatched["lb2"][0] == "(a single-instance heartbeat)"


def test_records_for_addresses_we_do_not_have_are_reported_not_applied() -> None:
    group = InstanceGroup("lb1", [Instance(A, 150)], advert_interval=ADV, dead_after=DEAD, now=0)
    outcomes, unmatched = group.heard(
        0.1,
        "lb2",
        [PeerRecord("198.18.0.199", 200, Role.ACTIVE), PeerRecord(A_IP, 100, Role.PASSIVE)],
    )
    assert unmatched == ["198.18.0.199"]
    assert [a for a, _ in outcomes] == [A_IP]
    # an address missing from a peer's heartbeat: that instance simply does not hear it
    group.heard(0.2, "lb2", [PeerRecord("198.18.0.199", 200, Role.ACTIVE)])
    assert group.machines[A_IP].peers["lb2"].last_seen == 0.1


def test_group_construction_and_misuse() -> None:
    with pytest.raises(ValueError, match="at least one"):
        InstanceGroup("lb1", [], advert_interval=ADV, dead_after=DEAD, now=0)
    with pytest.raises(ValueError, match="given twice"):
        InstanceGroup(
            "lb1",
            [Instance(A, 100), Instance("198.18.0.100/25", 120)],
            advert_interval=ADV,
            dead_after=DEAD,
            now=0,
        )
    with pytest.raises(ValueError, match="priority"):
        InstanceGroup("lb1", [Instance(A, 255)], advert_interval=ADV, dead_after=DEAD, now=0)
    group = InstanceGroup(
        "lb1", [Instance(A, 100), Instance(B, 100)], advert_interval=ADV, dead_after=DEAD, now=0
    )
    assert group.addresses == (A_IP, B_IP) and not group.single
    with pytest.raises(TypeError):
        group.handle(PeerAdvert(0.1, "lb2", 100, Role.ACTIVE))
    # node events reach every instance; the earliest deadline of all is the group's
    assert [a for a, _ in group.handle(Tick(0.05))] == [A_IP, B_IP]
    assert group.next_deadline() == min(m.next_deadline() for m in group.machines.values())
    assert not group.any_live_peer(0.05)
