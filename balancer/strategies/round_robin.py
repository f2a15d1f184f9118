"""round_robin: each usable backend in turn, blind to load and weight."""

from __future__ import annotations

from collections.abc import Collection

from balancer.backend import Backend
from balancer.strategies.base import RequestContext, Strategy


class RoundRobin(Strategy):
    """Every eligible backend in turn; an excluded or full one is skipped and the turn
    moves past the backend actually chosen, so a skip does not give anyone a double turn."""

    name = "round_robin"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._next = 0

    def select(self, ctx: RequestContext, exclude: Collection[Backend] = ()) -> Backend | None:
        backends = self.backends
        n = len(backends)
        start = self._next
        for step in range(n):
            pos = start + step
            if pos >= n:  # cheaper than a modulo on every step
                pos -= n
            b = backends[pos]
            # `b.full` spelled out: the property call would cost more than the rest of the step
            if 0 < b.max_connections <= b.inflight or (exclude and b in exclude):
                continue
            self._next = pos + 1 if pos + 1 < n else 0
            return b
        return None

    def carry_state(self, previous: Strategy) -> None:
        if isinstance(previous, RoundRobin) and self.backends:
            self._next = previous._next % len(self.backends)
