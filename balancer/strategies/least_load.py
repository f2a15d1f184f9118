"""least_load: the backend's own reported load, corrected for what we sent it since."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from balancer.backend import Backend
from balancer.strategies.base import RequestContext, Strategy, StrategyOptions

# The least load one request is assumed to add to a backend (5% of it: saturated at about 20
# concurrent requests) until the backend's own reports say a request costs more. Erring high
# spreads a burst more than strictly needed, which is the safe side: erring low herds it.
REQUEST_LOAD_FLOOR = 0.05

# A backend that reports no load is scored as this much load per in-flight request, the
# same prior the floor above uses, so a pool mixing reporting and silent backends compares
# them on one scale.
UNREPORTED_REQUEST_LOAD = REQUEST_LOAD_FLOOR


class LeastLoad(Strategy):
    """The usable backend with the lowest estimated load per unit of weight.

    A backend's health-check answer carries its load `L` (0 idle .. 1 saturated, may exceed
    1), seen when `I0` requests of ours were in flight there. Between two reports the figure
    is stale, and a burst would all land on whichever backend looked idle, so the estimate
    adds the requests of ours in flight there beyond those the report already saw::

        per_request = max(L / I0, REQUEST_LOAD_FLOOR)  if I0 > 0
                      REQUEST_LOAD_FLOOR                   if I0 == 0
        estimate    = L + per_request * max(inflight - I0, 0)
        score       = estimate / weight

    `per_request` is the share of the load each of our in-flight requests accounted for at
    report time, floored so that a backend that reported 0.0 still gets more expensive with
    each request. When none of ours were in flight the load came from elsewhere (other
    balancers, batch work) and says nothing about what one request costs: the floor is used.
    In-flight growth rather than every request sent since the report: a burst is exactly the
    requests still in flight, while a steady stream of short requests to an idle backend
    finishes as it goes and must not make that backend look busy until the next report.

    A backend whose `reported_load` is None is scored by its in-flight count at
    UNREPORTED_REQUEST_LOAD per request (10 in flight = load 0.5 with the default).

    Ties (typically everyone idle) go to the first in a rotating order, so equal backends
    take turns. A backend with weight <= 0 gets no new requests.
    """

    name = "least_load"

    def __init__(
        self,
        backends: Sequence[Backend],
        options: StrategyOptions | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(backends, options, weights)
        entries = tuple(
            (b, 1.0 / w) for b, w in zip(self.backends, self.weights, strict=True) if w > 0
        )
        self._n = len(entries)
        # doubled so a rotated scan is one index range, with no modulo per step
        self._ring = entries + entries
        self._next = 0

    def select(self, ctx: RequestContext, exclude: Collection[Backend] = ()) -> Backend | None:
        ring = self._ring
        start = self._next
        best: Backend | None = None
        best_pos = 0
        best_score = 0.0
        for pos in range(start, start + self._n):
            b, inv_weight = ring[pos]
            # `b.full` spelled out: the property call would cost more than the rest of the step
            if 0 < b.max_connections <= b.inflight or (exclude and b in exclude):
                continue
            load = b.reported_load
            if load is None:
                score = b.inflight * UNREPORTED_REQUEST_LOAD * inv_weight
            else:
                at_report = b.inflight_at_report
                per_request = load / at_report if at_report > 0 else REQUEST_LOAD_FLOOR
                if per_request < REQUEST_LOAD_FLOOR:
                    per_request = REQUEST_LOAD_FLOOR
                growth = b.inflight - at_report
                score = (load + per_request * growth if growth > 0 else load) * inv_weight
            if best is None or score < best_score:
                best, best_pos, best_score = b, pos, score
        if best is not None:
            self._next = (best_pos + 1) % self._n
        return best

    def carry_state(self, previous: Strategy) -> None:
        if isinstance(previous, LeastLoad) and self._n:
            self._next = previous._next % self._n
