"""Several floating IPs per pair (VRRP-style instances): one FailoverMachine per address; pure.

Each instance is a floating IP with this node's priority for it, decided by its own copy of the
state.py table: the pair elects, fails over and preempts every address independently, so each
node can be preferred for one address and back up the other (active-active). What the instances
share is everything about the node: its node_id, timers, preempt setting, local health (a
fenced proxy lowers its priority for every address) and a planned shutdown (every address is
handed over).

Instances are matched across the pair by address (its IP without the prefix length), the way
VRRP matches by virtual router id: the two nodes may list them in any order. A heartbeat record
without an address (the single-instance wire format) speaks for the sender's only instance and
counts only when this node has exactly one too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from balancer.ha.state import (
    Advert,
    Event,
    FailoverMachine,
    Outcome,
    PeerAdvert,
    PeerView,
    Role,
)


class InstanceSpec(Protocol):
    """What an instance needs from the config (HaInstanceConfig has these)."""

    @property
    def virtual_ip(self) -> str: ...  # "198.18.0.100/24"

    @property
    def priority(self) -> int: ...


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """One instance's part of a peer's heartbeat."""

    address: str | None  # the floating IP without prefix; None: the sender's only instance
    priority: int
    role: Role
    resigning: bool = False
    ready: bool = False
    preempt: bool = False


def address_of(virtual_ip: str) -> str:
    """The key an instance is matched by: "198.18.0.100/24" -> "198.18.0.100"."""
    return str(ipaddress.ip_interface(virtual_ip).ip)


class InstanceGroup:
    """Every instance of one node: events fanned out or routed to the right machine."""

    def __init__(
        self,
        node_id: str,
        instances: Sequence[InstanceSpec],
        *,
        advert_interval: float,
        dead_after: float,
        preempt: bool = True,
        now: float,
    ) -> None:
        if not instances:
            raise ValueError("at least one instance (floating IP) is needed")
        self.node_id = node_id
        self.specs: dict[str, InstanceSpec] = {}
        self.machines: dict[str, FailoverMachine] = {}  # address -> machine, in config order
        for spec in instances:
            address = address_of(spec.virtual_ip)
            if address in self.machines:
                raise ValueError(f"{address} is given twice")
            self.specs[address] = spec
            self.machines[address] = FailoverMachine(
                node_id,
                spec.priority,
                advert_interval=advert_interval,
                dead_after=dead_after,
                preempt=preempt,
                now=now,
            )
        self.addresses = tuple(self.machines)

    @property
    def single(self) -> bool:
        return len(self.machines) == 1

    @property
    def role(self) -> Role:
        """ACTIVE while any instance is: the node serves at least one address."""
        if any(m.role is Role.ACTIVE for m in self.machines.values()):
            return Role.ACTIVE
        return Role.PASSIVE

    @property
    def healthy(self) -> bool:
        return next(iter(self.machines.values())).healthy

    @property
    def transitions(self) -> int:
        return sum(m.transitions for m in self.machines.values())

    def handle(self, event: Event) -> list[tuple[str, Outcome]]:
        """An event about the node (tick, crash of a peer, health, resign): every instance."""
        if isinstance(event, PeerAdvert):
            raise TypeError("a peer's heartbeat goes through heard(), per instance")
        return [(address, m.handle(event)) for address, m in self.machines.items()]

    def heard(
        self, now: float, node_id: str, records: Iterable[PeerRecord]
    ) -> tuple[list[tuple[str, Outcome]], list[str]]:
        """A peer's heartbeat: each record to its instance. Returns the outcomes, and the
        addresses in the heartbeat this node has no instance for (a config mismatch)."""
        outcomes: list[tuple[str, Outcome]] = []
        unmatched: list[str] = []
        for record in records:
            address = record.address
            if address is None:
                # the single-instance format names no address: it is the sender's only one
                if not self.single:
                    unmatched.append("(a single-instance heartbeat)")
                    continue
                address = self.addresses[0]
            machine = self.machines.get(address)
            if machine is None:
                unmatched.append(address)
                continue
            event = PeerAdvert(
                now,
                node_id,
                record.priority,
                record.role,
                record.resigning,
                record.ready,
                record.preempt,
            )
            outcomes.append((address, machine.handle(event)))
        return outcomes, unmatched

    def adverts(self, now: float) -> list[tuple[str, Advert]]:
        return [(address, m.advert(now)) for address, m in self.machines.items()]

    def next_deadline(self) -> float | None:
        deadlines = [d for m in self.machines.values() if (d := m.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    def any_live_peer(self, now: float) -> bool:
        return any(m.any_live_peer(now) for m in self.machines.values())

    def active_peer(self, address: str, now: float) -> PeerView | None:
        return self.machines[address].active_peer(now)


__all__ = ["InstanceGroup", "InstanceSpec", "PeerRecord", "address_of"]
