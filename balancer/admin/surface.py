"""The parts of a running daemon the admin API and the metrics read, as Protocols (no daemon import)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from balancer.backend import Backend


class Cluster(Protocol):
    """The owner's supervisor of worker processes (balancer.cluster.supervisor), read-only."""

    @property
    def restarts(self) -> int: ...

    @property
    def hung(self) -> int: ...

    def counters(self) -> dict[str, Any]:
        """The workers' counters, added up (balancer.cluster.state reports)."""
        ...

    def status(self) -> list[dict[str, Any]]:
        """One entry per worker process (`in_sync`, pid, ...)."""
        ...


class Checker(Protocol):
    """One pool's active health checker (balancer.health.ActiveChecker), read-only."""

    @property
    def results(self) -> Mapping[Backend, Any]: ...

    def history(self, b: Backend) -> list[dict[str, Any]]: ...


class Ha(Protocol):
    """This node's HA state (balancer.ha.node.HaNode), read-only."""

    @property
    def role(self) -> str: ...

    @property
    def transitions(self) -> int: ...

    @property
    def heartbeats_sent(self) -> int: ...

    @property
    def heartbeats_received(self) -> int: ...

    @property
    def heartbeats_rejected(self) -> Mapping[Any, int]: ...


class Listener(Protocol):
    """A listener's counters (`rejected` too, on HTTP listeners)."""

    @property
    def connections(self) -> Collection[Any]: ...

    @property
    def refused(self) -> int: ...


class Discovery(Protocol):
    """One pool's registries (balancer.discovery.runner.PoolDiscovery)."""

    def status(self) -> dict[str, Any]: ...  # {"state", "since", "sources": {kind: {...}}, "held"}
