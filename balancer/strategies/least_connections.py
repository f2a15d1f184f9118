"""least_connections: fewest in-flight requests relative to weight."""

from __future__ import annotations

from collections.abc import Collection

from balancer.backend import Backend
from balancer.strategies.base import RequestContext
from balancer.strategies.weighted_round_robin import SmoothWeights


class LeastConnections(SmoothWeights):
    """The usable backend with the lowest `inflight / weight`.

    Backends tied on that ratio share by smooth weighted round robin among themselves (as
    nginx's least_conn does): equal backends take turns, and at low concurrency, where every
    backend sits at 0 in flight and all tie, the weights still decide the shares instead of
    the first backend taking everything. A backend with weight <= 0 gets no new requests.
    """

    name = "least_connections"

    def select(self, ctx: RequestContext, exclude: Collection[Backend] = ()) -> Backend | None:
        entries = self._entries
        best: Backend | None = None
        best_pos = 0
        best_inflight = 0
        best_weight = 1.0
        tied = False
        for pos, (_, b, w) in enumerate(entries):
            inflight = b.inflight
            # `b.full` spelled out: the property call would cost more than the rest of the step
            if 0 < b.max_connections <= inflight or (exclude and b in exclude):
                continue
            if best is None:
                best, best_pos, best_inflight, best_weight = b, pos, inflight, w
                continue
            # inflight/w < best_inflight/best_weight, cross-multiplied: no division, and
            # exact for integer weights, so equal ratios really compare equal
            lhs = inflight * best_weight
            rhs = best_inflight * w
            if lhs < rhs:
                best, best_pos, best_inflight, best_weight = b, pos, inflight, w
                tied = False
            elif lhs == rhs:
                tied = True
        if not tied:
            return best
        # smooth weighted round robin among the backends tied with the best ratio; they all
        # come at or after best_pos, so the scan starts there
        current = self._current
        chosen = -1
        chosen_score = 0.0
        total = 0.0
        for k in range(best_pos, len(entries)):
            i, b, w = entries[k]
            if 0 < b.max_connections <= b.inflight or (exclude and b in exclude):
                continue
            if b.inflight * best_weight != best_inflight * w:
                continue
            score = current[i] + w
            current[i] = score
            total += w
            if chosen < 0 or score > chosen_score:
                chosen = i
                chosen_score = score
        current[chosen] = chosen_score - total
        return self.backends[chosen]
