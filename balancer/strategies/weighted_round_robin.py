"""weighted_round_robin: nginx's smooth weighted round robin over the effective weights."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from balancer.backend import Backend
from balancer.strategies.base import RequestContext, Strategy, StrategyOptions


class SmoothWeights(Strategy):
    """Per-backend running scores of smooth weighted round robin, shared by the strategies
    that rotate by weight (here, and least_connections among tied backends). Entries with
    weight <= 0 are left out: they get no new requests."""

    def __init__(
        self,
        backends: Sequence[Backend],
        options: StrategyOptions | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(backends, options, weights)
        self._current = [0.0] * len(self.backends)
        # (index, backend, weight) for weight > 0: unpacked in one step in the hot loop
        self._entries = tuple(
            (i, b, w)
            for i, (b, w) in enumerate(zip(self.backends, self.weights, strict=True))
            if w > 0
        )

    def carry_state(self, previous: Strategy) -> None:
        # scores follow their backend, so a rebuild continues the same interleaving
        if isinstance(previous, SmoothWeights):
            old = dict(zip(previous.backends, previous._current, strict=True))
            self._current = [old.get(b, 0.0) for b in self.backends]


class WeightedRoundRobin(SmoothWeights):
    """Smooth weighted round robin (nginx `ngx_http_upstream_get_peer`).

    Each pick adds every usable backend's weight to its running `current` score, takes the
    highest, and subtracts the total of the weights added from the winner. Weights 5:1:1 give
    a a b a c a a (never five in a row) and exact proportions over each cycle of 7.

    An excluded or full backend is left out of that pick entirely (its score neither grows
    nor shrinks), so the others keep their relative shares and the skipped one does not come
    back owed a burst of catch-up picks. A backend with weight <= 0 gets no new requests
    (HAProxy's meaning of weight 0). Weights may be fractional (slow start).
    """

    name = "weighted_round_robin"

    def select(self, ctx: RequestContext, exclude: Collection[Backend] = ()) -> Backend | None:
        current = self._current
        best = -1
        best_score = 0.0
        total = 0.0
        for i, b, w in self._entries:
            # `b.full` spelled out: the property call would cost more than the rest of the step
            if 0 < b.max_connections <= b.inflight or (exclude and b in exclude):
                continue
            score = current[i] + w
            current[i] = score
            total += w
            if best < 0 or score > best_score:
                best = i
                best_score = score
        if best < 0:
            return None
        current[best] = best_score - total
        return self.backends[best]
