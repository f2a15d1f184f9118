"""What a registry says a pool's backends are: complete snapshots of records, and the one
interface every registry source (etcd, DNS) implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from balancer.config.schema import Address


@dataclass(frozen=True, slots=True)
class Record:
    """One backend as the registry describes it."""

    name: str  # its name in the pool: the etcd key's NAME, or "IP-port" from DNS
    address: Address
    weight: int = 1


@dataclass(frozen=True)
class Snapshot:
    """Everything the registry holds for a pool at one moment (never a delta)."""

    source: str  # "etcd" | "dns": shown as each discovered backend's `source`
    records: tuple[Record, ...]
    skipped: tuple[str, ...] = ()  # malformed entries left out, each "KEY: why"
    ttl: float | None = None  # DNS: the answer holds for at most this many seconds


class RegistryUnavailable(Exception):
    """The registry could not be asked (refused, timed out, SERVFAIL): the pool keeps the
    last backends it knew and says it is stale."""


class Source(Protocol):
    """A registry feeding one pool."""

    kind: str  # "etcd" | "dns"

    async def run(
        self, publish: Callable[[Snapshot], None], unavailable: Callable[[str], None]
    ) -> None:
        """Run until cancelled: call `publish` with every new complete snapshot, and
        `unavailable(reason)` each time the registry cannot be reached (then retry with
        backoff). Never raises for the registry's failures."""
        ...
