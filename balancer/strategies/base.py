"""The strategy interface: pick one backend for a request, with no I/O and no clock."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from balancer.backend import Backend


class RequestContext(Protocol):
    """What a strategy may know of a request. TCP connections only have `client_ip`."""

    client_ip: str

    @property
    def path(self) -> str: ...

    def header(self, name: str) -> str | None:
        """First value of a request header (name compared case-insensitively), or None."""
        ...

    def cookie(self, name: str) -> str | None:
        """Value of a request cookie, or None."""
        ...


@dataclass(frozen=True)
class StrategyOptions:
    """Pool-level settings a strategy may use."""

    hash_key: str | None = None  # consistent_hash: header:NAME | cookie:NAME | path | client_ip
    rng: random.Random = field(default_factory=random.Random, compare=False)


class Strategy(ABC):
    """Base class of every balancing strategy.

    A strategy is built from an immutable tuple of eligible backends (the pool rebuilds and
    swaps it when that set or a weight changes) and answers `select()` from those backends
    and their live counters (`inflight`, `reported_load`, ...), which it reads but never
    writes. `select()` must skip backends in `exclude` (already tried for this request) and
    backends that are `full`, and return None when nothing is left.

    `effective_weight(b)` is the weight to use: the pool passes slow-start scaled weights
    through `weights` when a backend is ramping up.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        backends: Sequence[Backend],
        options: StrategyOptions | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.backends: tuple[Backend, ...] = tuple(backends)
        self.options = options or StrategyOptions()
        self.weights: tuple[float, ...] = (
            tuple(weights) if weights is not None else tuple(float(b.weight) for b in backends)
        )

    @abstractmethod
    def select(self, ctx: RequestContext, exclude: Collection[Backend] = ()) -> Backend | None:
        """The backend for this request, or None when every usable one is excluded or full."""

    def carry_state(self, previous: Strategy) -> None:
        """Take over the rotation state of `previous`, the snapshot this one replaces.

        The pool rebuilds its strategy on every health flip, weight change and slow-start
        tick; a stateful strategy (a round-robin position, smooth-weight scores) overrides
        this so that a rebuild doesn't restart its rotation. Stateless ones keep the default.
        """
        return None

    @staticmethod
    def usable(backend: Backend, exclude: Collection[Backend]) -> bool:
        return not backend.full and backend not in exclude
