"""The failover state machine: roles, events and the one transition function; pure, no I/O, no clock.

Every input is an event carrying `now` (a monotonic time the caller read); every output is an
`Outcome`: the role after the event plus the actions the caller must carry out, in order.

The rules, all inside `FailoverMachine.handle` (R0..R8 are the labels used there):

====  ======================================  ==================================================
rule  when                                    then
====  ======================================  ==================================================
R0    any event arrives more than             ACTIVE -> PASSIVE at once (REMOVE_VIP): we were
      `sleep_gap` after the last tick         asleep (SIGSTOP, VM pause) and a peer may hold the
                                              VIP now; listen again for dead_after before claiming
R1    tick, a hand-over is pending and the    REMOVE_VIP: release anyway
      successor did not show within
      dead_after
R2    heartbeat from a peer                   remember it; a successor seen ACTIVE ends a pending
                                              hand-over (REMOVE_VIP)
R3    ACTIVE hears another ACTIVE             the lower claim (priority, then node_id: lower
      (healed partition, split brain)         string wins a tie) yields at once (REMOVE_VIP); the
                                              winner re-announces (ANNOUNCE) and tells it now
R4    peer crash confirmed (ECONNREFUSED      the peer is dead: no waiting out dead_after for it
      twice)
R5    local health changed                    effective priority = priority, or priority - 50
                                              (floor 1) while unhealthy (self-fencing)
R6    resign requested (planned shutdown)     ACTIVE -> PASSIVE with SEND_RESIGN; the VIP stays
                                              until the caller has drained, then it removes it
R7    ACTIVE, a live PASSIVE peer outranks    hand over: ACTIVE -> PASSIVE with SEND_RESIGN,
      us, has listened long enough (ready)    keeping the VIP until the successor is heard ACTIVE
      and either wants preemption or we are   (R2) or dead_after passes (R1): make before break
      fenced
R8    PASSIVE, listened for dead_after+skew   PASSIVE -> ACTIVE (ADD_VIP). A peer blocks us while
      (skipped when the active handed over    it is live (heard within dead_after+skew), not
      or crashed) and no peer blocks us       resigning and either ACTIVE or outranking us.
====  ======================================  ==================================================

The skew, (255 - effective priority) / 256 x advert_interval, is added to every wait so that two
passives that lost the active at the same instant do not promote together: the better one claims
first and its heartbeat reaches the other before the other's wait is over.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

FENCE_PENALTY = 50  # priority lost while the local proxy is unhealthy
MIN_PRIORITY = 1
MAX_PRIORITY = 255

T = TypeVar("T")


class Role(enum.Enum):
    PASSIVE = "passive"
    ACTIVE = "active"


class Action(enum.Enum):
    ADD_VIP = "add_vip"  # add the VIP and announce it with gratuitous ARP
    REMOVE_VIP = "remove_vip"
    ANNOUNCE = "announce"  # gratuitous ARP again: another holder may have won neighbours' caches
    SEND_ADVERT = "send_advert"  # a heartbeat now instead of at the next interval
    SEND_RESIGN = "send_resign"  # a few resigning heartbeats, fast: a successor claims at once
    NOTIFY = "notify"  # the role changed: callback and notify command


class _Via(enum.Enum):
    CLAIM = "claim"
    YIELD = "yield"  # drop the VIP now
    HANDOVER = "handover"  # keep the VIP until the successor is active
    RESIGN = "resign"  # keep the VIP; the caller drains, then removes it


# from x to x how -> actions: the one place a role change turns into work (keepalived style).
_TRANSITIONS: dict[tuple[Role, Role, _Via], tuple[Action, ...]] = {
    (Role.PASSIVE, Role.ACTIVE, _Via.CLAIM): (Action.ADD_VIP, Action.SEND_ADVERT, Action.NOTIFY),
    (Role.ACTIVE, Role.PASSIVE, _Via.YIELD): (
        Action.REMOVE_VIP,
        Action.SEND_ADVERT,
        Action.NOTIFY,
    ),
    (Role.ACTIVE, Role.PASSIVE, _Via.HANDOVER): (Action.SEND_RESIGN, Action.NOTIFY),
    (Role.ACTIVE, Role.PASSIVE, _Via.RESIGN): (Action.SEND_RESIGN, Action.NOTIFY),
}


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed. The caller ticks at least every advert_interval and at `next_deadline()`."""

    now: float


@dataclass(frozen=True, slots=True)
class PeerAdvert:
    """An authenticated heartbeat from a peer."""

    now: float
    node_id: str
    priority: int  # the peer's effective priority
    role: Role
    resigning: bool = False  # handing the role over, or shutting down
    ready: bool = False  # a passive that has listened long enough to take over at once
    preempt: bool = False  # it takes the role from a lower-priority active when ready


@dataclass(frozen=True, slots=True)
class PeerCrashed:
    """The peer's host answered our heartbeat with port-unreachable, twice: its process is gone."""

    now: float
    node_id: str


@dataclass(frozen=True, slots=True)
class HealthChanged:
    now: float
    healthy: bool


@dataclass(frozen=True, slots=True)
class ResignRequested:
    """Planned shutdown: hand the role over and never claim again."""

    now: float


Event = Tick | PeerAdvert | PeerCrashed | HealthChanged | ResignRequested


@dataclass(frozen=True, slots=True)
class Outcome:
    role: Role
    actions: tuple[Action, ...] = ()
    reason: str = ""
    changed: bool = False  # the role differs from before the event


@dataclass(frozen=True, slots=True)
class Advert:
    """What our next heartbeat says."""

    role: Role
    priority: int
    resigning: bool
    ready: bool
    preempt: bool


@dataclass(slots=True)
class PeerView:
    """The last word heard from one peer."""

    node_id: str
    priority: int
    role: Role
    last_seen: float
    resigning: bool = False
    ready: bool = False
    preempt: bool = False
    handing_over: bool = False  # it was ACTIVE and is now resigning: we need not wait it out
    crashed: bool = False


def outranks(priority: int, node_id: str, other_priority: int, other_node_id: str) -> bool:
    """Whether a claim beats another: higher priority, and on a tie the lower node_id."""
    if priority != other_priority:
        return priority > other_priority
    return node_id < other_node_id


def fenced_priority(priority: int, healthy: bool) -> int:
    return priority if healthy else max(MIN_PRIORITY, priority - FENCE_PENALTY)


class FailoverMachine:
    """One node's view of the pair and the rules that decide its role."""

    def __init__(
        self,
        node_id: str,
        priority: int,
        *,
        advert_interval: float,
        dead_after: float,
        preempt: bool = True,
        now: float,
    ) -> None:
        if not MIN_PRIORITY <= priority < MAX_PRIORITY:
            raise ValueError(f"priority must be {MIN_PRIORITY}..{MAX_PRIORITY - 1}, not {priority}")
        if advert_interval <= 0 or dead_after <= advert_interval:
            raise ValueError("need 0 < advert_interval < dead_after")
        self.node_id = node_id
        self.priority = priority
        self.advert_interval = advert_interval
        self.dead_after = dead_after
        self.preempt = preempt
        self.role = Role.PASSIVE
        self.healthy = True
        self.resigned = False
        self.release_until: float | None = None  # a hand-over is pending until then (R7)
        self.listen_since = now
        self.ready_announced = False  # our heartbeat said "ready" since listen_since
        self.last_tick = now
        self.transitions = 0
        self.last_reason = "started passive"
        self.peers: dict[str, PeerView] = {}
        # A pause this long means a peer may have stopped hearing us and taken over. Our last
        # heartbeat left at our last tick at the latest, and a peer waits dead_after after it.
        self.sleep_gap = max(dead_after - advert_interval, 2 * advert_interval)

    # -- derived values ------------------------------------------------------------------------

    @property
    def effective_priority(self) -> int:
        return fenced_priority(self.priority, self.healthy)

    @property
    def skew(self) -> float:
        return (MAX_PRIORITY - self.effective_priority) / 256 * self.advert_interval

    @property
    def holding_release(self) -> bool:
        return self.release_until is not None

    def ready(self, now: float) -> bool:
        """A passive that has listened long enough to claim the moment the active lets go."""
        return (
            self.role is Role.PASSIVE
            and not self.resigned
            and self.release_until is None
            and now - self.listen_since >= self.dead_after + self.skew
        )

    def advert(self, now: float) -> Advert:
        return Advert(
            role=self.role,
            priority=self.effective_priority,
            resigning=self.resigned or self.release_until is not None,
            ready=self.ready(now),
            preempt=self.preempt,
        )

    def live(self, peer: PeerView, now: float) -> bool:
        return not peer.crashed and now - peer.last_seen < self.dead_after

    def any_live_peer(self, now: float) -> bool:
        """Whether some peer could still take over (heard within dead_after, not crashed)."""
        return any(self.live(peer, now) for peer in self.peers.values())

    def active_peer(self, now: float) -> PeerView | None:
        """A live peer that claims the role (a successor, when we are handing over)."""
        for peer in self.peers.values():
            if peer.role is Role.ACTIVE and not peer.resigning and self.live(peer, now):
                return peer
        return None

    def next_deadline(self) -> float | None:
        """When a Tick could change something though nothing is heard; None: nothing pending."""
        if self.resigned:
            return None
        deadlines = []
        if self.release_until is not None:
            deadlines.append(self.release_until)
        elif self.role is Role.PASSIVE:
            deadlines.append(self._claim_time())
            if not self.ready_announced:
                deadlines.append(self.listen_since + self.dead_after + self.skew)
        return min(deadlines) if deadlines else None

    # -- the transition function ---------------------------------------------------------------

    def handle(self, event: Event) -> Outcome:
        """Apply one event; return the role and what the caller must do, in order."""
        if isinstance(event, PeerAdvert) and event.node_id == self.node_id:
            return Outcome(self.role)  # our own heartbeat looped back: not a peer
        before = self.role
        actions: list[Action] = []
        reasons: list[str] = []
        now = event.now
        waive_listen = False

        # R0: whatever the event, a long gap since the last tick means we were not running.
        gap = now - self.last_tick
        woke = gap > self.sleep_gap
        if woke:
            self.last_tick = now
            self._listen_afresh(now)
            if not self.resigned:
                if self.role is Role.ACTIVE:
                    self._move(
                        now,
                        Role.PASSIVE,
                        _Via.YIELD,
                        actions,
                        reasons,
                        f"woke after a {gap:.2f}s pause; a peer may have taken over",
                    )
                elif self.release_until is not None:
                    self.release_until = None
                    actions.append(Action.REMOVE_VIP)
                    reasons.append(f"woke after a {gap:.2f}s pause during a hand-over")

        match event:
            case Tick():
                self.last_tick = now
                # R1: the successor never showed up; do not hold a role we gave away.
                if self.release_until is not None and now >= self.release_until:
                    self.release_until = None
                    actions.append(Action.REMOVE_VIP)
                    reasons.append("hand-over: no successor within dead_after, released anyway")

            case PeerAdvert():
                waive_listen = self._remember(event)
                # R2: the successor holds the role now; release ours.
                if (
                    self.release_until is not None
                    and event.role is Role.ACTIVE
                    and not event.resigning
                ):
                    self.release_until = None
                    actions.append(Action.REMOVE_VIP)
                    reasons.append(f"hand-over done: {event.node_id} is active")
                # R3: two actives; the lower claim yields at once, the higher re-announces.
                if (
                    self.role is Role.ACTIVE
                    and not self.resigned
                    and event.role is Role.ACTIVE
                    and not event.resigning
                ):
                    if outranks(
                        event.priority, event.node_id, self.effective_priority, self.node_id
                    ):
                        self._move(
                            now,
                            Role.PASSIVE,
                            _Via.YIELD,
                            actions,
                            reasons,
                            f"split brain: {event.node_id} (priority {event.priority}) is active"
                            f" and outranks us ({self.effective_priority})",
                        )
                    else:
                        actions += (Action.ANNOUNCE, Action.SEND_ADVERT)
                        reasons.append(
                            f"split brain: {event.node_id} (priority {event.priority}) is active"
                            " too; we outrank it and keep the VIP"
                        )

            case PeerCrashed():
                # R4: port-unreachable from its host: its process is gone, no need to wait.
                peer = self.peers.get(event.node_id)
                if peer is not None and not peer.crashed:
                    peer.crashed = True
                    waive_listen = peer.role is Role.ACTIVE or peer.handing_over
                    reasons.append(f"{event.node_id} crashed (port unreachable)")

            case HealthChanged():
                # R5: self-fencing by lowering what we advertise; peers react to the number.
                if event.healthy != self.healthy:
                    self.healthy = event.healthy
                    actions.append(Action.SEND_ADVERT)
                    reasons.append(
                        f"local proxy {'healthy' if event.healthy else 'unhealthy'}:"
                        f" effective priority {self.effective_priority}"
                    )

            case ResignRequested():
                # R6: planned shutdown. The caller drains, then removes the VIP.
                if not self.resigned:
                    self.resigned = True
                    self.release_until = None
                    if self.role is Role.ACTIVE:
                        self._move(now, Role.PASSIVE, _Via.RESIGN, actions, reasons, "resigning")
                    else:
                        reasons.append("resigning while passive")

        # After a pause nothing we heard before it counts: always listen afresh.
        self._evaluate(now, waive_listen and not woke, actions, reasons)
        if not self.ready_announced and self.ready(now):
            # Tell a lower active at once that we can take over, not at the next interval.
            self.ready_announced = True
            actions.append(Action.SEND_ADVERT)
        reason = "; ".join(_dedupe(reasons))
        if reason and self.role is not before:
            self.last_reason = reason
        return Outcome(
            role=self.role,
            actions=tuple(_dedupe(actions)),
            reason=reason,
            changed=self.role is not before,
        )

    # -- rules that depend only on the state, checked after every event -------------------------

    def _evaluate(
        self, now: float, waive_listen: bool, actions: list[Action], reasons: list[str]
    ) -> None:
        if self.resigned:
            return
        if self.role is Role.ACTIVE:
            # R7: a better peer is ready and either wants the role or we are fenced.
            successor = self._successor(now)
            if successor is not None:
                why = (
                    "fenced (local proxy unhealthy), handing over to"
                    if not self.healthy
                    else "preempted by"
                )
                self._move(
                    now,
                    Role.PASSIVE,
                    _Via.HANDOVER,
                    actions,
                    reasons,
                    f"{why} {successor.node_id} (priority {successor.priority} over"
                    f" our {self.effective_priority})",
                )
                self.release_until = now + self.dead_after
            return
        if self.release_until is not None:
            return
        # R8: claim when nobody better could still be alive.
        listened = now - self.listen_since >= self.dead_after + self.skew
        if not (listened or waive_listen):
            return
        if self._blockers(now):
            return
        self._move(now, Role.ACTIVE, _Via.CLAIM, actions, reasons, self._claim_reason(now))

    def _successor(self, now: float) -> PeerView | None:
        best: PeerView | None = None
        for peer in self.peers.values():
            if (
                peer.role is Role.PASSIVE
                and not peer.resigning
                and peer.ready
                and self.live(peer, now)
                and (peer.preempt or not self.healthy)
                and outranks(peer.priority, peer.node_id, self.effective_priority, self.node_id)
                and (
                    best is None
                    or outranks(peer.priority, peer.node_id, best.priority, best.node_id)
                )
            ):
                best = peer
        return best

    def _blocking(self, peer: PeerView) -> bool:
        """Whether this peer, if still alive, keeps us from claiming."""
        if peer.crashed or peer.resigning:
            return False
        return peer.role is Role.ACTIVE or outranks(
            peer.priority, peer.node_id, self.effective_priority, self.node_id
        )

    def _blockers(self, now: float) -> list[PeerView]:
        wait = self.dead_after + self.skew
        return [p for p in self.peers.values() if self._blocking(p) and now - p.last_seen < wait]

    def _claim_time(self) -> float:
        wait = self.dead_after + self.skew
        times = [self.listen_since + wait]
        times += [p.last_seen + wait for p in self.peers.values() if self._blocking(p)]
        return max(times)

    def _claim_reason(self, now: float) -> str:
        gone = []
        for peer in self.peers.values():
            if peer.crashed:
                gone.append(f"{peer.node_id} crashed (port unreachable)")
            elif peer.handing_over:
                gone.append(f"{peer.node_id} handed over")
            elif peer.role is Role.ACTIVE or outranks(
                peer.priority, peer.node_id, self.effective_priority, self.node_id
            ):
                gone.append(f"{peer.node_id} silent for {now - peer.last_seen:.2f}s")
        if not gone:
            return f"no better peer heard for {now - self.listen_since:.2f}s"
        return ", ".join(gone)

    # -- helpers --------------------------------------------------------------------------------

    def _remember(self, event: PeerAdvert) -> bool:
        """Store a peer's heartbeat; True when it is the active handing the role over."""
        previous = self.peers.get(event.node_id)
        handing_over = (
            event.resigning
            and previous is not None
            and ((previous.role is Role.ACTIVE and not previous.resigning) or previous.handing_over)
        )
        self.peers[event.node_id] = PeerView(
            node_id=event.node_id,
            priority=event.priority,
            role=event.role,
            last_seen=event.now,
            resigning=event.resigning,
            ready=event.ready,
            preempt=event.preempt,
            handing_over=handing_over,
        )
        return handing_over

    def _move(
        self,
        now: float,
        role: Role,
        via: _Via,
        actions: list[Action],
        reasons: list[str],
        reason: str,
    ) -> None:
        actions += _TRANSITIONS[(self.role, role, via)]
        reasons.append(reason)
        if role is Role.PASSIVE:
            # A node that just lost or gave the role away is not ready to take it back at once,
            # which damps flapping.
            self._listen_afresh(now)
        self.role = role
        self.transitions += 1

    def _listen_afresh(self, now: float) -> None:
        self.listen_since = now
        self.ready_announced = False


def _dedupe(items: Iterable[T]) -> list[T]:
    seen: set[T] = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


__all__ = [
    "FENCE_PENALTY",
    "Action",
    "Advert",
    "Event",
    "FailoverMachine",
    "HealthChanged",
    "Outcome",
    "PeerAdvert",
    "PeerCrashed",
    "PeerView",
    "ResignRequested",
    "Role",
    "Tick",
    "fenced_priority",
    "outranks",
]
