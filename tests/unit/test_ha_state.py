"""The failover state table: every rule, one event at a time and in a simulated pair."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from balancer.ha.state import (
    FENCE_PENALTY,
    Action,
    FailoverMachine,
    HealthChanged,
    Outcome,
    PeerAdvert,
    PeerCrashed,
    ResignRequested,
    Role,
    Tick,
    fenced_priority,
    outranks,
)

ADV = 0.2
DEAD = 0.6
STEP = 0.005


def machine(node_id: str = "a", priority: int = 100, *, preempt: bool = True, now: float = 0.0):
    return FailoverMachine(
        node_id, priority, advert_interval=ADV, dead_after=DEAD, preempt=preempt, now=now
    )


def skew(priority: int) -> float:
    return (255 - priority) / 256 * ADV


def tick_until(m: FailoverMachine, start: float, end: float) -> list[tuple[float, Outcome]]:
    """Tick every STEP from start to end; return the outcomes that did something."""
    out = []
    t = start
    while t <= end + 1e-9:
        o = m.handle(Tick(t))
        if o.actions or o.changed:
            out.append((t, o))
        t = round(t + STEP, 9)
    return out


def active(m: FailoverMachine, now: float) -> None:
    """Drive a lone machine to ACTIVE by waiting out its listen period."""
    tick_until(m, m.last_tick, now)
    assert m.role is Role.ACTIVE


def advert(
    now: float,
    node_id: str = "b",
    priority: int = 100,
    role: Role = Role.PASSIVE,
    **flags: bool,
) -> PeerAdvert:
    return PeerAdvert(now, node_id, priority, role, **flags)


# ---------------------------------------------------------------------------------------------
# A small discrete-time world: machines, a network with latency, crashes and pauses.
# ---------------------------------------------------------------------------------------------


@dataclass
class SimNode:
    machine: FailoverMachine
    holds: bool = False
    alive: bool = True
    paused: bool = False
    next_advert: float = 0.0
    resign_left: int = 0
    inbox: list = field(default_factory=list)  # buffered while paused, as a socket would
    log: list = field(default_factory=list)


class Sim:
    def __init__(self, latency: float = 0.001) -> None:
        self.now = 0.0
        self.latency = latency
        self.nodes: dict[str, SimNode] = {}
        self.in_flight: list[tuple[float, str, PeerAdvert]] = []
        self.cut: set[frozenset[str]] = set()
        self.mute_periodic_until = 0.0  # periodic adverts before this are lost; immediate ones not

    def add(self, node_id: str, priority: int, *, preempt: bool = True) -> SimNode:
        m = FailoverMachine(
            node_id, priority, advert_interval=ADV, dead_after=DEAD, preempt=preempt, now=self.now
        )
        node = SimNode(m, next_advert=self.now)
        self.nodes[node_id] = node
        return node

    def send(self, src: str) -> None:
        m = self.nodes[src].machine
        a = m.advert(self.now)
        for dst in self.nodes:
            if dst != src and frozenset((src, dst)) not in self.cut:
                msg = PeerAdvert(0, src, a.priority, a.role, a.resigning, a.ready, a.preempt)
                self.in_flight.append((self.now + self.latency, dst, msg))

    def apply(self, node_id: str, outcome: Outcome) -> None:
        node = self.nodes[node_id]
        if outcome.actions:
            node.log.append((self.now, outcome))
        for action in outcome.actions:
            if action is Action.ADD_VIP:
                node.holds = True
            elif action is Action.REMOVE_VIP:
                node.holds = False
            elif action is Action.SEND_ADVERT:
                self.send(node_id)
            elif action is Action.SEND_RESIGN:
                self.send(node_id)
                node.resign_left = 2

    def deliver(self, node_id: str, msg: PeerAdvert) -> None:
        ev = PeerAdvert(
            self.now, msg.node_id, msg.priority, msg.role, msg.resigning, msg.ready, msg.preempt
        )
        self.apply(node_id, self.nodes[node_id].machine.handle(ev))

    def step(self) -> None:
        self.now = round(self.now + STEP, 9)
        due = [x for x in self.in_flight if x[0] <= self.now]
        self.in_flight = [x for x in self.in_flight if x[0] > self.now]
        for _, dst, msg in due:
            node = self.nodes[dst]
            if not node.alive:
                continue
            if node.paused:
                node.inbox.append(msg)
            else:
                self.deliver(dst, msg)
        for node_id, node in self.nodes.items():
            if not node.alive or node.paused:
                continue
            self.apply(node_id, node.machine.handle(Tick(self.now)))
            if node.resign_left:
                node.resign_left -= 1
                self.send(node_id)
            if self.now >= node.next_advert - 1e-9:
                if self.now >= self.mute_periodic_until:
                    self.send(node_id)
                node.next_advert += ADV
                if node.next_advert <= self.now:
                    node.next_advert = self.now + ADV

    def run(self, seconds: float, each=None) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.step()
            if each is not None:
                each(self)

    def run_until(self, cond, limit: float) -> float:
        start = self.now
        while not cond(self):
            assert self.now - start < limit, f"condition not met within {limit}s"
            self.step()
        return self.now - start

    def holders(self) -> list[str]:
        # A dead process's VIP goes with it (kernel lifetime); only live holders count.
        return sorted(n for n, node in self.nodes.items() if node.holds and node.alive)

    def kill(self, node_id: str) -> None:
        self.nodes[node_id].alive = False

    def crash_confirmed(self, dead: str) -> None:
        for node_id, node in self.nodes.items():
            if node_id != dead and node.alive and not node.paused:
                self.apply(node_id, node.machine.handle(PeerCrashed(self.now, dead)))

    def pause(self, node_id: str) -> None:
        self.nodes[node_id].paused = True

    def resume(self, node_id: str, *, datagrams_first: bool) -> None:
        node = self.nodes[node_id]
        node.paused = False
        if not datagrams_first:
            self.apply(node_id, node.machine.handle(Tick(self.now)))
        for msg in node.inbox:
            self.deliver(node_id, msg)
        node.inbox.clear()

    def restart(self, node_id: str, priority: int, *, preempt: bool = True) -> SimNode:
        return self.add(node_id, priority, preempt=preempt)

    def role(self, node_id: str) -> Role:
        return self.nodes[node_id].machine.role


def handover_entry(node: SimNode) -> Outcome:
    return next(o for _, o in node.log if Action.SEND_RESIGN in o.actions)


def converge(sim: Sim, limit: float = 3.0) -> None:
    sim.run_until(
        lambda s: (
            len(s.holders()) == 1
            and sum(n.machine.role is Role.ACTIVE for n in s.nodes.values() if n.alive) == 1
        ),
        limit,
    )


def assert_one_holder_for(sim: Sim, seconds: float) -> None:
    def check(s: Sim) -> None:
        assert len(s.holders()) == 1, f"holders {s.holders()} at {s.now:.3f}"

    sim.run(seconds, check)


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_outranks_priority_then_lower_node_id() -> None:
    assert outranks(150, "z", 100, "a")
    assert not outranks(100, "a", 150, "z")
    assert outranks(100, "a", 100, "b")
    assert not outranks(100, "b", 100, "a")
    assert not outranks(100, "a", 100, "a")


def test_fenced_priority_lowers_by_penalty_with_floor() -> None:
    assert fenced_priority(150, True) == 150
    assert fenced_priority(150, False) == 150 - FENCE_PENALTY
    assert fenced_priority(30, False) == 1
    assert fenced_priority(1, False) == 1


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        machine(priority=0)
    with pytest.raises(ValueError):
        machine(priority=255)
    with pytest.raises(ValueError):
        FailoverMachine("a", 100, advert_interval=1.0, dead_after=1.0, now=0.0)


# ---------------------------------------------------------------------------------------------
# Start and claim (R8)
# ---------------------------------------------------------------------------------------------


def test_starts_passive_and_does_nothing_at_once() -> None:
    m = machine()
    assert m.role is Role.PASSIVE
    o = m.handle(Tick(0.0))
    assert o == Outcome(Role.PASSIVE)
    assert not m.advert(0.0).ready


def test_lone_node_claims_exactly_after_dead_after_plus_skew() -> None:
    m = machine(priority=100)
    claim_at = DEAD + skew(100)
    assert m.next_deadline() == pytest.approx(claim_at)
    changes = tick_until(m, 0.0, 2.0)
    (t, o), *rest = changes
    assert not rest
    assert t == pytest.approx(claim_at, abs=STEP)
    assert t >= claim_at
    assert o.role is Role.ACTIVE and o.changed
    assert o.actions == (Action.ADD_VIP, Action.SEND_ADVERT, Action.NOTIFY)
    assert "no better peer" in o.reason
    assert m.transitions == 1
    assert m.next_deadline() is None


def test_skew_grows_as_priority_falls() -> None:
    assert machine(priority=254).skew == pytest.approx(ADV / 256)
    assert machine(priority=1).skew == pytest.approx(254 / 256 * ADV)
    assert machine(priority=150).skew < machine(priority=100).skew


def test_ready_flag_after_listen_period() -> None:
    m = machine(priority=100)
    m.handle(advert(0.1, "b", 200, Role.ACTIVE))
    tick_until(m, 0.0, DEAD + skew(100) - STEP)
    assert not m.advert(m.last_tick).ready
    m.handle(advert(m.last_tick, "b", 200, Role.ACTIVE))
    m.handle(Tick(DEAD + skew(100)))
    assert m.advert(DEAD + skew(100)).ready
    assert m.role is Role.PASSIVE  # an active peer still blocks


def test_lower_passive_peer_does_not_block_a_claim() -> None:
    m = machine("a", 150)
    t = 0.0
    while t < 1.5:
        m.handle(advert(t, "b", 100, Role.PASSIVE))
        m.handle(Tick(t))
        t = round(t + 0.1, 9)
    assert m.role is Role.ACTIVE


def test_higher_passive_peer_blocks_until_silent() -> None:
    m = machine("a", 100)
    t = 0.0
    while t < 1.5:
        m.handle(advert(t, "b", 150, Role.PASSIVE))
        m.handle(Tick(t))
        t = round(t + 0.1, 9)
    assert m.role is Role.PASSIVE
    last = 1.4
    changes = tick_until(m, 1.5, 3.0)
    assert changes[0][0] >= last + DEAD + skew(100) - 1e-9
    assert changes[0][1].role is Role.ACTIVE
    assert "b silent" in changes[0][1].reason


def test_passive_claims_only_after_active_silent_for_dead_after_plus_skew() -> None:
    m = machine("b", 100)
    t = 0.0
    while t <= 2.0 + 1e-9:
        m.handle(advert(t, "a", 150, Role.ACTIVE))
        m.handle(Tick(t))
        t = round(t + ADV, 9)
    assert m.role is Role.PASSIVE
    changes = tick_until(m, 2.0, 4.0)
    t_claim, o = changes[0]
    assert t_claim >= 2.0 + DEAD + skew(100) - 1e-9
    assert t_claim <= 2.0 + DEAD + skew(100) + STEP
    assert o.actions == (Action.ADD_VIP, Action.SEND_ADVERT, Action.NOTIFY)
    assert "a silent" in o.reason


def test_own_heartbeat_is_ignored() -> None:
    m = machine("a")
    o = m.handle(advert(0.1, "a", 200, Role.ACTIVE))
    assert o == Outcome(Role.PASSIVE)
    assert "a" not in m.peers


# ---------------------------------------------------------------------------------------------
# Two passives at once: the skew
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("high", "low"), [("a", "b"), ("b", "a")])
def test_skew_prevents_simultaneous_promotion(high: str, low: str) -> None:
    # Priorities 10 apart give claims 7.8 ms apart; the first claim's advert must get there first.
    sim = Sim(latency=0.002)
    sim.add(high, 110)
    sim.add(low, 100)
    # Neither hears the other's periodic adverts before claiming, so only the skew orders them.
    sim.mute_periodic_until = 1.0
    sim.run(2.0)
    assert sim.role(high) is Role.ACTIVE
    assert sim.role(low) is Role.PASSIVE
    assert sim.nodes[low].machine.transitions == 0, "the lower one never claimed"


def test_pair_starting_together_ends_with_one_holder_and_stays() -> None:
    sim = Sim()
    sim.add("lb1", 150)
    sim.add("lb2", 100)
    converge(sim)
    assert sim.holders() == ["lb1"]
    assert sim.nodes["lb2"].machine.transitions == 0
    assert_one_holder_for(sim, 5.0)


def test_equal_priorities_starting_together_settle_on_lower_node_id() -> None:
    sim = Sim(latency=0.0005)
    sim.add("lb2", 100)
    sim.add("lb1", 100)
    sim.cut.add(frozenset(("lb1", "lb2")))
    sim.run(DEAD + skew(100) + 0.02)  # both claim, blind to each other
    assert sim.holders() == ["lb1", "lb2"]
    sim.cut.clear()
    converge(sim, limit=1.0)
    assert sim.holders() == ["lb1"]
    assert_one_holder_for(sim, 3.0)


# ---------------------------------------------------------------------------------------------
# Split brain (R3)
# ---------------------------------------------------------------------------------------------


def test_split_brain_lower_priority_yields_at_once() -> None:
    m = machine("b", 100)
    active(m, 1.0)
    o = m.handle(advert(1.0, "a", 150, Role.ACTIVE))
    assert o.role is Role.PASSIVE and o.changed
    assert o.actions == (Action.REMOVE_VIP, Action.SEND_ADVERT, Action.NOTIFY)
    assert "split brain" in o.reason


def test_split_brain_winner_keeps_and_reannounces() -> None:
    m = machine("a", 150)
    active(m, 1.0)
    o = m.handle(advert(1.0, "b", 100, Role.ACTIVE))
    assert o.role is Role.ACTIVE and not o.changed
    assert o.actions == (Action.ANNOUNCE, Action.SEND_ADVERT)


@pytest.mark.parametrize(("me", "peer", "i_yield"), [("lb1", "lb2", False), ("lb2", "lb1", True)])
def test_split_brain_tie_goes_to_lower_node_id(me: str, peer: str, i_yield: bool) -> None:
    m = machine(me, 100)
    active(m, 1.0)
    o = m.handle(advert(1.0, peer, 100, Role.ACTIVE))
    assert (o.role is Role.PASSIVE) == i_yield


def test_healed_partition_leaves_exactly_one_holder() -> None:
    sim = Sim()
    sim.add("lb1", 150)
    sim.add("lb2", 100)
    converge(sim)
    sim.cut.add(frozenset(("lb1", "lb2")))
    sim.run(2.0)
    assert sim.holders() == ["lb1", "lb2"]
    sim.cut.clear()
    sim.run_until(lambda s: s.holders() == ["lb1"], 0.5)
    assert_one_holder_for(sim, 3.0)


# ---------------------------------------------------------------------------------------------
# Preemption and hand-over (R7, R2, R1)
# ---------------------------------------------------------------------------------------------


def test_preempt_true_higher_node_takes_over_make_before_break() -> None:
    sim = Sim()
    sim.add("lb2", 100)
    converge(sim)
    assert sim.holders() == ["lb2"]
    sim.add("lb1", 150, preempt=True)
    seen: list[list[str]] = []
    sim.run(2.0, lambda s: seen.append(s.holders()))
    assert sim.holders() == ["lb1"]
    assert [] not in seen, "the VIP was never held by nobody"
    both = sum(1 for h in seen if len(h) == 2)
    assert both * STEP <= 0.01, "the overlap lasts one message round"
    lb2 = sim.nodes["lb2"]
    first = handover_entry(lb2)
    assert first.role is Role.PASSIVE
    assert first.actions == (Action.SEND_RESIGN, Action.NOTIFY)
    assert "preempted by lb1" in first.reason
    release = next(o for _, o in lb2.log if Action.REMOVE_VIP in o.actions)
    assert release.actions == (Action.REMOVE_VIP,)
    assert "hand-over done" in release.reason
    assert_one_holder_for(sim, 3.0)


def test_returning_node_waits_its_listen_period_before_taking_over() -> None:
    sim = Sim()
    sim.add("lb2", 100)
    converge(sim)
    start = sim.now
    sim.add("lb1", 150)
    took = sim.run_until(lambda s: s.holders() == ["lb1"], 2.0)
    assert took >= DEAD + skew(150) - 1e-9
    # ready advert, resign, claim, release: a message and a step each, not an advert interval
    assert took <= DEAD + skew(150) + 4 * STEP + 1e-9, "the ready advert goes out at once"
    assert sim.now - start == pytest.approx(took)


def test_preempt_false_current_active_keeps_role() -> None:
    sim = Sim()
    sim.add("lb2", 100, preempt=False)
    converge(sim)
    sim.add("lb1", 150, preempt=False)
    assert_one_holder_for(sim, 5.0)
    assert sim.holders() == ["lb2"]
    assert sim.nodes["lb1"].machine.advert(sim.now).ready


def test_preempt_is_the_returning_nodes_choice() -> None:
    sim = Sim()
    sim.add("lb2", 100, preempt=False)
    converge(sim)
    sim.add("lb1", 150, preempt=True)
    sim.run(2.0)
    assert sim.holders() == ["lb1"]


def test_active_does_not_hand_over_to_a_peer_that_is_not_ready() -> None:
    m = machine("b", 100)
    active(m, 1.0)
    o = m.handle(advert(1.0, "a", 150, Role.PASSIVE, ready=False, preempt=True))
    assert o.role is Role.ACTIVE and not o.actions
    o = m.handle(advert(1.01, "a", 150, Role.PASSIVE, ready=True, preempt=True))
    assert o.role is Role.PASSIVE
    assert o.actions == (Action.SEND_RESIGN, Action.NOTIFY)
    assert m.advert(1.01).resigning
    assert m.holding_release


def test_hand_over_releases_when_successor_is_active() -> None:
    m = machine("b", 100)
    active(m, 1.0)
    m.handle(advert(1.0, "a", 150, Role.PASSIVE, ready=True, preempt=True))
    o = m.handle(advert(1.002, "a", 150, Role.ACTIVE))
    assert o.actions == (Action.REMOVE_VIP,)
    assert not o.changed
    assert not m.holding_release
    assert not m.advert(1.002).resigning


def test_hand_over_releases_anyway_when_no_successor_shows() -> None:
    m = machine("b", 100)
    active(m, 1.0)
    m.handle(advert(1.0, "a", 150, Role.PASSIVE, ready=True, preempt=True))
    assert m.next_deadline() == pytest.approx(1.0 + DEAD)
    changes = tick_until(m, 1.0, 1.0 + DEAD + 0.05)
    t, o = changes[0]
    assert t == pytest.approx(1.0 + DEAD, abs=STEP)
    assert o.actions == (Action.REMOVE_VIP,)
    assert "no successor" in o.reason


def test_resigning_active_lets_passive_claim_without_waiting() -> None:
    m = machine("b", 100)
    m.handle(advert(0.05, "a", 150, Role.ACTIVE))
    m.handle(Tick(0.1))
    o = m.handle(advert(0.15, "a", 150, Role.PASSIVE, resigning=True))
    assert o.role is Role.ACTIVE, "even before its own listen period is over"
    assert o.actions == (Action.ADD_VIP, Action.SEND_ADVERT, Action.NOTIFY)
    assert "a handed over" in o.reason


def test_resign_from_a_peer_never_seen_active_is_not_a_hand_over() -> None:
    m = machine("b", 100)
    m.handle(Tick(0.1))
    o = m.handle(advert(0.15, "a", 150, Role.PASSIVE, resigning=True))
    assert o.role is Role.PASSIVE


def test_hand_over_goes_to_the_best_candidate_only() -> None:
    sim = Sim()
    sim.add("lb3", 50)
    converge(sim)
    sim.add("lb1", 150)
    sim.add("lb2", 100)
    seen: list[list[str]] = []
    sim.run(3.0, lambda s: seen.append(s.holders()))
    assert sim.holders() == ["lb1"]
    assert sim.nodes["lb2"].machine.transitions == 0
    assert [] not in seen


# ---------------------------------------------------------------------------------------------
# Self-fencing (R5)
# ---------------------------------------------------------------------------------------------


def test_health_change_lowers_effective_priority_and_advertises() -> None:
    m = machine("a", 150)
    o = m.handle(HealthChanged(0.1, False))
    assert o.actions == (Action.SEND_ADVERT,)
    assert m.effective_priority == 100
    assert m.advert(0.1).priority == 100
    assert "unhealthy" in o.reason
    assert m.handle(HealthChanged(0.2, False)).actions == ()
    m.handle(HealthChanged(0.3, True))
    assert m.effective_priority == 150


def test_fenced_active_hands_over_even_to_a_peer_without_preempt() -> None:
    sim = Sim()
    sim.add("lb1", 150, preempt=False)
    sim.add("lb2", 120, preempt=False)
    converge(sim)
    assert sim.holders() == ["lb1"]
    sim.apply("lb1", sim.nodes["lb1"].machine.handle(HealthChanged(sim.now, False)))
    seen: list[list[str]] = []
    sim.run(1.0, lambda s: seen.append(s.holders()))
    assert sim.holders() == ["lb2"]
    assert [] not in seen
    assert "fenced" in handover_entry(sim.nodes["lb1"]).reason
    # Healthy again, but preempt is off: lb2 keeps the role.
    sim.apply("lb1", sim.nodes["lb1"].machine.handle(HealthChanged(sim.now, True)))
    assert_one_holder_for(sim, 3.0)
    assert sim.holders() == ["lb2"]


def test_fenced_active_with_no_healthy_peer_keeps_the_role() -> None:
    sim = Sim()
    sim.add("lb1", 150)
    sim.add("lb2", 60)
    converge(sim)
    sim.apply("lb1", sim.nodes["lb1"].machine.handle(HealthChanged(sim.now, False)))
    assert_one_holder_for(sim, 3.0)
    assert sim.holders() == ["lb1"]  # 100 still beats 60


def test_fenced_passive_lets_the_other_claim_first() -> None:
    sim = Sim()
    sim.add("lb1", 150)
    sim.add("lb2", 120)
    sim.apply("lb1", sim.nodes["lb1"].machine.handle(HealthChanged(0.0, False)))
    converge(sim)
    assert sim.holders() == ["lb2"]
    assert sim.nodes["lb1"].machine.transitions == 0


def test_recovered_node_with_preempt_takes_back() -> None:
    sim = Sim()
    sim.add("lb1", 150)
    sim.add("lb2", 120)
    converge(sim)
    sim.apply("lb1", sim.nodes["lb1"].machine.handle(HealthChanged(sim.now, False)))
    sim.run(1.0)
    assert sim.holders() == ["lb2"]
    sim.apply("lb1", sim.nodes["lb1"].machine.handle(HealthChanged(sim.now, True)))
    sim.run(2.0)
    assert sim.holders() == ["lb1"]


# ---------------------------------------------------------------------------------------------
# Resign (R6)
# ---------------------------------------------------------------------------------------------


def test_resign_while_active_hands_over_and_keeps_vip_for_the_caller() -> None:
    m = machine("a", 150)
    active(m, 1.0)
    o = m.handle(ResignRequested(1.0))
    assert o.role is Role.PASSIVE and o.changed
    assert o.actions == (Action.SEND_RESIGN, Action.NOTIFY)
    assert Action.REMOVE_VIP not in o.actions
    assert m.advert(1.0).resigning
    assert not m.advert(5.0).ready
    assert m.next_deadline() is None
    # Never claims again, and a successor's heartbeat does not make it remove the VIP.
    assert tick_until(m, 1.0, 5.0) == []
    assert m.handle(advert(5.0, "b", 100, Role.ACTIVE)).actions == ()
    assert m.handle(ResignRequested(5.0)).actions == ()


def test_resign_while_passive_does_nothing_but_flag() -> None:
    m = machine("a", 150)
    o = m.handle(ResignRequested(0.1))
    assert o.actions == () and o.role is Role.PASSIVE
    assert m.advert(0.1).resigning
    assert tick_until(m, 0.1, 3.0) == []


def test_resign_in_a_pair_moves_the_vip_with_overlap_not_gap() -> None:
    sim = Sim()
    sim.add("lb1", 150)
    sim.add("lb2", 100)
    converge(sim)
    sim.apply("lb1", sim.nodes["lb1"].machine.handle(ResignRequested(sim.now)))
    sim.run_until(lambda s: s.nodes["lb2"].holds, 0.05)
    assert sim.holders() == ["lb1", "lb2"]  # lb1 drains, then its caller removes the VIP
    sim.nodes["lb1"].holds = False
    assert_one_holder_for(sim, 3.0)
    assert sim.holders() == ["lb2"]


# ---------------------------------------------------------------------------------------------
# Crash confirmed (R4)
# ---------------------------------------------------------------------------------------------


def test_crash_of_active_lets_passive_claim_at_once() -> None:
    m = machine("b", 100)
    tick_until(m, 0.0, 2.0)
    m.handle(advert(0.0, "a", 150, Role.ACTIVE))
    t = 2.0
    m.handle(advert(t, "a", 150, Role.ACTIVE))
    o = m.handle(PeerCrashed(t + 0.01, "a"))
    assert o.role is Role.ACTIVE
    assert o.actions == (Action.ADD_VIP, Action.SEND_ADVERT, Action.NOTIFY)
    assert "a crashed" in o.reason


def test_crash_of_active_right_after_start_still_claims() -> None:
    m = machine("b", 100)
    m.handle(advert(0.05, "a", 150, Role.ACTIVE))
    o = m.handle(PeerCrashed(0.06, "a"))
    assert o.role is Role.ACTIVE


def test_crash_of_unknown_or_passive_peer_changes_nothing() -> None:
    m = machine("b", 100)
    assert m.handle(PeerCrashed(0.05, "nobody")) == Outcome(Role.PASSIVE)
    m.handle(advert(0.05, "c", 200, Role.PASSIVE))
    o = m.handle(PeerCrashed(0.06, "c"))
    assert o.role is Role.PASSIVE  # our own listen period still runs
    changes = tick_until(m, 0.06, 2.0)
    assert changes[0][0] == pytest.approx(DEAD + skew(100), abs=STEP)


def test_crashed_peer_counts_again_once_heard() -> None:
    m = machine("b", 100)
    m.handle(advert(0.05, "a", 150, Role.ACTIVE))
    m.handle(PeerCrashed(0.06, "a"))
    assert m.role is Role.ACTIVE
    m.handle(advert(0.1, "a", 150, Role.ACTIVE))
    assert m.role is Role.PASSIVE  # split brain: a outranks us
    assert not m.peers["a"].crashed


def test_crash_in_a_pair_beats_dead_after() -> None:
    sim = Sim()
    sim.add("lb1", 150)
    sim.add("lb2", 100)
    converge(sim)
    sim.kill("lb1")
    sim.run(0.1)
    sim.crash_confirmed("lb1")
    assert sim.holders() == ["lb2"]


# ---------------------------------------------------------------------------------------------
# Sleep detection (R0)
# ---------------------------------------------------------------------------------------------


def test_sleep_gap_is_below_dead_after_and_above_an_advert() -> None:
    m = machine()
    assert 2 * ADV <= m.sleep_gap < DEAD


def test_wake_after_long_gap_drops_to_passive_first() -> None:
    m = machine("a", 150)
    active(m, 1.0)
    o = m.handle(Tick(1.0 + 1.5))
    assert o.role is Role.PASSIVE and o.changed
    assert o.actions == (Action.REMOVE_VIP, Action.SEND_ADVERT, Action.NOTIFY)
    assert "woke after a 1.50s pause" in o.reason
    # and listens again for a full dead_after + skew, though nobody is heard
    changes = tick_until(m, 2.5, 4.0)
    assert changes[0][0] == pytest.approx(2.5 + DEAD + skew(150), abs=STEP)
    assert changes[0][1].role is Role.ACTIVE


def test_wake_detected_on_a_heartbeat_before_any_tick() -> None:
    m = machine("a", 150)
    active(m, 1.0)
    o = m.handle(advert(2.0, "b", 100, Role.ACTIVE))
    assert o.role is Role.PASSIVE
    assert o.actions[0] is Action.REMOVE_VIP
    assert "woke" in o.reason
    # b, the active now, blocks us: no split-brain win for the sleeper
    assert tick_until(m, 2.0, 2.0 + 0.1) == []


def test_short_gap_is_not_a_sleep() -> None:
    m = machine("a", 150)
    active(m, 1.0)
    o = m.handle(Tick(1.0 + m.sleep_gap - 0.01))
    assert o.role is Role.ACTIVE and not o.actions


def test_wake_during_hand_over_releases() -> None:
    m = machine("b", 100)
    active(m, 1.0)
    m.handle(advert(1.0, "a", 150, Role.PASSIVE, ready=True, preempt=True))
    o = m.handle(Tick(2.0))
    assert o.actions == (Action.REMOVE_VIP,)
    assert not m.holding_release


def test_wake_ignores_a_hand_over_heard_before_it() -> None:
    m = machine("b", 100)
    m.handle(advert(0.05, "a", 150, Role.ACTIVE))
    o = m.handle(advert(1.5, "a", 150, Role.PASSIVE, resigning=True))
    assert o.role is Role.PASSIVE, "after a pause nothing counts until we listened again"


@pytest.mark.parametrize("datagrams_first", [True, False])
def test_hung_active_wakes_and_never_holds_alongside(datagrams_first: bool) -> None:
    sim = Sim()
    sim.add("lb1", 150, preempt=False)
    sim.add("lb2", 100, preempt=False)
    converge(sim)
    assert sim.holders() == ["lb1"]
    sim.pause("lb1")
    took = sim.run_until(lambda s: s.nodes["lb2"].holds, 2.0)
    assert took <= DEAD + skew(100) + ADV + 0.01
    sim.run(0.5)
    sim.resume("lb1", datagrams_first=datagrams_first)
    # The first thing lb1 did on waking was to drop the VIP.
    assert sim.nodes["lb1"].log[-1][1].actions[0] is Action.REMOVE_VIP
    assert sim.nodes["lb1"].holds is False
    assert_one_holder_for(sim, 5.0)
    assert sim.holders() == ["lb2"]


def test_hung_higher_node_wakes_and_takes_back_cleanly_with_preempt() -> None:
    sim = Sim()
    sim.add("lb1", 150)
    sim.add("lb2", 100)
    converge(sim)
    sim.pause("lb1")
    sim.run(1.5)
    sim.resume("lb1", datagrams_first=True)
    seen: list[list[str]] = []
    sim.run(3.0, lambda s: seen.append(s.holders()))
    assert sim.holders() == ["lb1"]
    assert [] not in seen
    assert sum(len(h) == 2 for h in seen) * STEP <= 0.01
