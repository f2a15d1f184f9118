"""Discovery policy, pure: the registries' latest snapshots and the pool's discovered backends
in, the changes to make out. Flap damping lives here too, with the clock passed in.

The registry is the truth for discovered backends, the file for listed ones: a record that
collides with a listed backend (same name or address) is skipped, never allowed to replace
it. A record that disappears is drained (the daemon lets its in-flight requests finish); one
that comes back while still draining is put back in service, keeping its health and counters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from balancer.config.schema import Address
from balancer.discovery.records import Record, Snapshot

# The order in which sources win a name or address claimed by both (etcd is the registry
# instances register in themselves; DNS is usually a coarser view of the same fleet).
SOURCE_ORDER = ("etcd", "dns")


@dataclass(frozen=True, slots=True)
class Wanted:
    """A record some registry holds, with the source it came from."""

    record: Record
    source: str

    @property
    def name(self) -> str:
        return self.record.name


@dataclass(frozen=True, slots=True)
class Current:
    """A discovered backend as the pool has it now."""

    name: str
    address: Address
    weight: int
    draining: bool = False


@dataclass(frozen=True)
class Plan:
    """What to do to the pool, in this order: remove (address changed: the old server goes at
    once, its in-flight requests finish on the object they hold), add, restore, reweight,
    drain."""

    remove: tuple[str, ...] = ()
    add: tuple[Wanted, ...] = ()
    restore: tuple[Wanted, ...] = ()  # draining, and wanted again (weight as wanted)
    reweight: tuple[Wanted, ...] = ()
    drain: tuple[str, ...] = ()
    held: tuple[str, ...] = ()  # wanted, but held back by flap damping
    skipped: tuple[str, ...] = ()  # "source NAME: why", records that cannot be applied
    wake_at: float | None = None  # plan again then: a held record becomes eligible

    @property
    def empty(self) -> bool:
        return not (self.remove or self.add or self.restore or self.reweight or self.drain)


def merge(snapshots: Mapping[str, Snapshot]) -> tuple[list[Wanted], list[str]]:
    """One wanted set from every source's latest snapshot: the first source (SOURCE_ORDER)
    to claim a name or an address keeps it; the rest are reported."""
    wanted: list[Wanted] = []
    skipped: list[str] = []
    names: dict[str, str] = {}
    addresses: dict[Address, str] = {}
    kinds = sorted(snapshots, key=lambda k: SOURCE_ORDER.index(k) if k in SOURCE_ORDER else 99)
    for kind in kinds:
        for rec in snapshots[kind].records:
            if rec.name in names:
                skipped.append(f"{kind} {rec.name}: name already taken by {names[rec.name]}")
                continue
            if rec.address in addresses:
                skipped.append(
                    f"{kind} {rec.name}: address {rec.address} already taken by"
                    f" {addresses[rec.address]}"
                )
                continue
            names[rec.name] = f"{kind} {rec.name}"
            addresses[rec.address] = f"{kind} {rec.name}"
            wanted.append(Wanted(rec, kind))
    return wanted, skipped


@dataclass
class Damping:
    """Route-flap damping for registrations (the BGP scheme, RFC 2439): every time a
    discovered backend goes away its penalty grows by one; the penalty halves every
    `half_life` seconds. A backend whose penalty reached `suppress` is not added back until
    it has decayed below `reuse`: an instance crash-looping through its start script stops
    pulling traffic in and out of the pool, while one that came and went once or twice is
    not delayed at all."""

    half_life: float = 30.0
    suppress: float = 2.5  # three departures in quick succession
    reuse: float = 1.0
    # name -> (penalty, when it was that); entries decay away and are forgotten
    _penalty: dict[str, tuple[float, float]] = field(default_factory=dict)
    _suppressed: set[str] = field(default_factory=set)

    def penalty(self, name: str, now: float) -> float:
        value, at = self._penalty.get(name, (0.0, now))
        return value * math.pow(0.5, max(0.0, now - at) / self.half_life)

    def went_away(self, name: str, now: float) -> None:
        value = self.penalty(name, now) + 1.0
        self._penalty[name] = (value, now)
        if value >= self.suppress:
            self._suppressed.add(name)

    def held(self, name: str, now: float) -> bool:
        """Is `name` suppressed now? (once suppressed, until its penalty is below reuse)"""
        if name not in self._suppressed:
            return False
        if self.penalty(name, now) < self.reuse:
            self._suppressed.discard(name)
            return False
        return True

    def release_at(self, name: str, now: float) -> float:
        """When a suppressed `name` decays to `reuse`."""
        p = self.penalty(name, now)
        if p <= self.reuse:
            return now
        return now + self.half_life * math.log2(p / self.reuse)

    def forget_decayed(self, now: float) -> None:
        for name in [n for n in self._penalty if self.penalty(n, now) < 0.01]:
            del self._penalty[name]
            self._suppressed.discard(name)

    @property
    def suppressed(self) -> frozenset[str]:
        return frozenset(self._suppressed)


@dataclass(frozen=True)
class Listed:
    """The pool's file-listed backends, which discovery must never touch."""

    names: frozenset[str] = frozenset()
    addresses: frozenset[Address] = frozenset()


def plan(
    wanted: Iterable[Wanted],
    current: Mapping[str, Current],
    listed: Listed,
    damping: Damping,
    now: float,
) -> Plan:
    """The changes that make the pool's discovered backends what the registries hold.
    Records its removals in `damping` (the one state it keeps)."""
    remove: list[str] = []
    add: list[Wanted] = []
    restore: list[Wanted] = []
    reweight: list[Wanted] = []
    drain: list[str] = []
    held: list[str] = []
    skipped: list[str] = []
    wake_at: float | None = None
    seen: set[str] = set()
    for w in wanted:
        rec = w.record
        if rec.name in listed.names:
            skipped.append(f"{w.source} {rec.name}: the config file lists a backend of that name")
            continue
        if rec.address in listed.addresses:
            skipped.append(
                f"{w.source} {rec.name}: the config file lists a backend at {rec.address}"
            )
            continue
        have = current.get(rec.name)
        if have is not None and have.address != rec.address:
            # the same name now at a different address is another server
            remove.append(rec.name)
            damping.went_away(rec.name, now)
            have = None
        if have is None:
            if damping.held(rec.name, now):
                held.append(rec.name)
                at = damping.release_at(rec.name, now)
                wake_at = at if wake_at is None else min(wake_at, at)
                continue
            add.append(w)
        elif have.draining:
            restore.append(w)
        elif have.weight != rec.weight:
            reweight.append(w)
        seen.add(rec.name)
    for name, have in current.items():
        if name not in seen and name not in remove and not have.draining:
            drain.append(name)
            damping.went_away(name, now)
    damping.forget_decayed(now)
    return Plan(
        remove=tuple(remove),
        add=tuple(add),
        restore=tuple(restore),
        reweight=tuple(reweight),
        drain=tuple(drain),
        held=tuple(held),
        skipped=tuple(skipped),
        wake_at=wake_at,
    )
