"""random_two: power of two random choices, weighted, on in-flight requests per weight."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Collection, Sequence

from balancer.backend import Backend
from balancer.strategies.base import RequestContext, Strategy, StrategyOptions


class RandomTwo(Strategy):
    """Draw two distinct backends at random, each with probability proportional to its
    weight, and take the one with the lower `inflight / weight` (the first drawn on a tie).

    Two random choices get most of the benefit of least-connections while a crowd of
    balancers, or one with stale counters, does not herd onto the single least loaded
    backend. Draws come from `options.rng`, so a seeded `random.Random` makes a run
    reproducible. When a candidate is excluded or full, the pick falls back to a scan for
    the lowest `inflight / weight` among the usable ones (from a random start, so ties
    spread). A backend with weight <= 0 gets no new requests.
    """

    name = "random_two"

    def __init__(
        self,
        backends: Sequence[Backend],
        options: StrategyOptions | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(backends, options, weights)
        entries = tuple((b, w) for b, w in zip(self.backends, self.weights, strict=True) if w > 0)
        self._entries = entries
        self._n = len(entries)
        self._ring = entries + entries  # a rotated scan without modulo
        cumulative: list[float] = []
        total = 0.0
        for _, w in entries:
            total += w
            cumulative.append(total)
        # _starts[i] is where entry i's slice of [0, total) begins
        self._starts = tuple([0.0, *cumulative[:-1]])
        self._cumulative = cumulative
        self._total = total

    def select(self, ctx: RequestContext, exclude: Collection[Backend] = ()) -> Backend | None:
        n = self._n
        if n < 2:
            if n == 1:
                b = self._entries[0][0]
                if not (b.full or (exclude and b in exclude)):
                    return b
            return None
        rng = self.options.rng
        cumulative = self._cumulative
        entries = self._entries
        i = bisect_right(cumulative, rng.random() * self._total)
        if i >= n:  # float rounding at the very top of the range
            i = n - 1
        a, wa = entries[i]
        # the second draw is over the total without entry i, mapped around i's slice, so
        # the two candidates are distinct and still drawn in proportion to weight
        r = rng.random() * (self._total - wa)
        if r >= self._starts[i]:
            r += wa
        j = bisect_right(cumulative, r)
        if j >= n:
            j = n - 1
        if j == i:  # only reachable through float rounding at a slice boundary
            j = i + 1 if i + 1 < n else i - 1
        b, wb = entries[j]
        ia = a.inflight
        ib = b.inflight
        # `b.full` spelled out: the property call would cost more than the rest of the step
        if not (
            0 < a.max_connections <= ia
            or 0 < b.max_connections <= ib
            or (exclude and (a in exclude or b in exclude))
        ):
            # ia/wa <= ib/wb, cross-multiplied
            return a if ia * wb <= ib * wa else b
        return self._scan(exclude, rng.randrange(n))

    def _scan(self, exclude: Collection[Backend], start: int) -> Backend | None:
        best: Backend | None = None
        best_inflight = 0
        best_weight = 1.0
        ring = self._ring
        for pos in range(start, start + self._n):
            b, w = ring[pos]
            if 0 < b.max_connections <= b.inflight or (exclude and b in exclude):
                continue
            if best is None or b.inflight * best_weight < best_inflight * w:
                best, best_inflight, best_weight = b, b.inflight, w
        return best
