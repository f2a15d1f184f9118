"""Pool: a named set of backends, the eligible subset, and the strategy snapshot over it.

The proxy meets the balancing policy here and only here: `select()` / `sticky_backend()` to
choose, `begin()` / `release()` around each request, `wait_for_capacity()` when every
backend is at its connection cap. Health checks report through `set_healthy()` and
`eject()`; the admin API and reload change backends through `add_backend()`,
`remove_backend()`, `set_weight()` and `set_admin_state()`. Each change rebuilds the strategy
from the new eligible set and swaps it in one assignment (requests already routed keep the
backend they were given).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence

from balancer import strategies
from balancer.backend import Backend, BackendState
from balancer.config import BackendConfig, PoolConfig
from balancer.strategies import RequestContext, Strategy, StrategyOptions

log = logging.getLogger("balancer.pool")

# Slow start never gives a returning backend less than this share of its weight, so that it
# is actually probed by live traffic from the first moment it is back.
SLOW_START_FLOOR = 0.05


class PoolEvents:
    """Hooks a pool calls on changes (metrics, logs). Defaults do nothing."""

    def health_changed(self, pool: Pool, backend: Backend, healthy: bool, reason: str) -> None:
        """A backend flipped up or down."""

    def ejected(self, pool: Pool, backend: Backend, duration: float) -> None:
        """Passive detection took a backend out for `duration` seconds."""

    def panic(self, pool: Pool, active: bool) -> None:
        """The pool entered (True) or left (False) panic mode."""


class Pool:
    """Backends of one pool, their eligibility and the current strategy snapshot."""

    def __init__(
        self,
        config: PoolConfig,
        backends: Sequence[Backend] | None = None,
        *,
        events: PoolEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
        sticky_codec: object | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.events = events or PoolEvents()
        self.clock = clock
        self.strategy_class: type[Strategy] = strategies.get(config.strategy)
        self.options = StrategyOptions(hash_key=config.hash_key)
        self.backends: list[Backend] = (
            list(backends)
            if backends is not None
            else [backend_from_config(b) for b in config.backends]
        )
        # sticky: a codec from balancer.sticky (or None) and the tag -> backend map it uses
        self.sticky = sticky_codec
        # the proxy speaks HTTP/2 (h2c) to this pool's backends: gRPC
        self.h2_backends = config.protocol == "h2"
        # the PROXY header version sent first on each backend connection ("v1" | "v2"), or ""
        # for none. Never on HTTP/2 backends: their connections carry the streams of many
        # clients, so no one address is true of them (the pair is a config error).
        send = config.send_proxy_protocol
        self.send_proxy = "" if send == "none" or self.h2_backends else send
        self.sticky_cookie_name = (config.sticky.cookie if config.sticky else "").encode()
        self.sticky_cookie_prefix = self.sticky_cookie_name + b"="
        self._by_tag: dict[bytes, Backend] = {}
        # sticky outcomes, counted by the proxy for metrics
        self.sticky_hits = 0
        self.sticky_misses = 0
        self.sticky_repins = 0
        self.panic = False
        self.ramping = False  # some backend is in slow start: maintain() must keep refreshing
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.queue_timeouts = 0
        self.strategy: Strategy = self.strategy_class((), self.options)
        self.refresh()

    # -- choosing -------------------------------------------------------------------------

    def select(self, ctx: RequestContext, exclude: Collection[Backend] = ()) -> Backend | None:
        """The backend for a new request, or None when none is usable."""
        return self.strategy.select(ctx, exclude)

    def sticky_backend(self, tag: bytes, exclude: Collection[Backend] = ()) -> Backend | None:
        """The backend a valid sticky cookie pins to, if it can take this request now."""
        b = self._by_tag.get(tag)
        # eligible() and `full` spelled out: this runs for every request carrying the cookie
        if (
            b is None
            or (exclude and b in exclude)
            or 0 < b.max_connections <= b.inflight
            or b.admin_state is not BackendState.UP
            or not (self.panic or (b.healthy and b.ejected_until == 0.0))
        ):
            return None
        return b

    def sticky_cookie_header(self, backend: Backend, secure: bool) -> bytes:
        """The Set-Cookie value pinning a client to `backend`."""
        codec = self.sticky
        value = codec.encode(self.sticky_tag(backend), time.time())  # type: ignore[attr-defined]
        return codec.set_cookie_header(self.config.sticky.cookie, value, secure)  # type: ignore[attr-defined, union-attr]

    def sticky_tag(self, backend: Backend) -> bytes:
        return self.sticky.tag(backend.address)  # type: ignore[attr-defined]

    def eligible(self, b: Backend) -> bool:
        """May get new requests: up by health, not ejected, not drained or disabled by an
        operator (in panic mode health is ignored, the operator's choice is not)."""
        if b.admin_state is not BackendState.UP:
            return False
        return self.panic or (b.healthy and b.ejected_until == 0.0)

    @property
    def has_capacity_waiters(self) -> bool:
        return bool(self._waiters)

    def all_full(self) -> bool:
        """Every eligible backend is at its connection cap (so a request should queue)."""
        bs = self.strategy.backends
        return bool(bs) and all(b.full for b in bs)

    # -- per request ----------------------------------------------------------------------

    @staticmethod
    def begin(backend: Backend) -> None:
        backend.begin()

    def release(self, backend: Backend, failed: bool = False) -> None:
        """A request to `backend` finished: free its slot and wake one queued request.

        `failed` means a failure that says something about the backend (connect refused or
        timed out, reset, 5xx, response timeout): passive detection counts those in a row.
        """
        backend.end(failed)
        if failed:
            backend.consecutive_failures += 1
            threshold = self.config.passive_health.consecutive_failures
            if threshold and backend.consecutive_failures >= threshold:
                self._eject_for_failures(backend)
        elif backend.consecutive_failures:
            backend.consecutive_failures = 0
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    async def wait_for_capacity(self, timeout: float) -> bool:
        """Wait until some backend has a free slot; False on timeout or a full queue."""
        if len(self._waiters) >= self.config.queue.size:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            self.queue_timeouts += 1
            return False
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    # -- health (called by balancer.health) -------------------------------------------------

    def set_healthy(self, backend: Backend, healthy: bool, reason: str = "") -> None:
        """The one place a backend's health flips (active checks report here)."""
        if backend.healthy == healthy:
            return
        backend.healthy = healthy
        if healthy:
            self._start_slow_start(backend)
        log.warning(
            "pool %s: backend %s (%s) is %s%s",
            self.name,
            backend.name,
            backend.address,
            "UP" if healthy else "DOWN",
            f": {reason}" if reason else "",
        )
        self.events.health_changed(self, backend, healthy, reason)
        self.refresh()

    def eject(self, backend: Backend, duration: float) -> bool:
        """Passive detection: take `backend` out for `duration` seconds, unless that would
        eject more than max_ejected_percent of the pool. Returns whether it was ejected."""
        if backend.ejected_until:
            return False
        limit = self.config.passive_health.max_ejected_percent
        # backends already down by active checks count against the cap too: passive
        # detection must not be what takes a pool's last eligible backends away
        out = sum(1 for b in self.backends if b.ejected_until or not b.healthy)
        if (out + 1) * 100 > limit * len(self.backends):
            return False
        backend.ejected_until = self.clock() + duration
        log.warning(
            "pool %s: backend %s (%s) ejected for %.1fs after consecutive failures",
            self.name,
            backend.name,
            backend.address,
            duration,
        )
        self.events.ejected(self, backend, duration)
        self.refresh()
        return True

    def _eject_for_failures(self, backend: Backend) -> None:
        ph = self.config.passive_health
        duration = min(ph.ejection_time * (2**backend.ejections), ph.max_ejection_time)
        if self.eject(backend, duration):
            backend.ejections += 1
            backend.consecutive_failures = 0

    def maintain(self) -> None:
        """Periodic: end expired ejections and advance slow-start ramps."""
        now = self.clock()
        changed = self.ramping
        decay_after = self.config.passive_health.max_ejection_time
        for b in self.backends:
            if b.ejected_until and b.ejected_until <= now:
                b.ejected_until = 0.0
                b.ejection_ended = now
                log.warning("pool %s: backend %s back from ejection", self.name, b.name)
                self._start_slow_start(b)
                changed = True
            elif b.ejections and not b.ejected_until and now - b.ejection_ended > decay_after:
                # a long good spell earns back one doubling step (as Envoy decays its
                # ejection multiplier), so an old incident doesn't lengthen ejections forever
                b.ejections -= 1
                b.ejection_ended = now
        if changed:
            self.refresh()

    def _start_slow_start(self, b: Backend) -> None:
        window = self.config.slow_start
        if window > 0:
            b.slow_start_began = self.clock()
            b.slow_start_until = b.slow_start_began + window

    # -- runtime changes (admin API and reload) ---------------------------------------------

    def find(self, name: str) -> Backend | None:
        for b in self.backends:
            if b.name == name:
                return b
        return None

    def add_backend(self, backend: Backend) -> None:
        self.backends.append(backend)
        self.refresh()

    def remove_backend(self, backend: Backend) -> None:
        """Remove from the pool at once; in-flight requests on it still finish (they hold
        the object)."""
        if backend in self.backends:
            self.backends.remove(backend)
            self.refresh()

    def set_weight(self, backend: Backend, weight: int) -> None:
        backend.weight = weight
        self.refresh()

    def set_admin_state(self, backend: Backend, state: BackendState) -> None:
        backend.admin_state = state
        self.refresh()

    # -- the snapshot -----------------------------------------------------------------------

    def refresh(self) -> None:
        """Rebuild the strategy over the eligible backends and swap it in."""
        now = self.clock()
        threshold = self.config.panic_threshold
        # only backends the operator left in service count: draining a few must not
        # push the pool into panic and send traffic to the ones that are down
        in_service = [b for b in self.backends if b.admin_state is BackendState.UP]
        total = len(in_service)
        if threshold and total:
            healthy = sum(1 for b in in_service if b.healthy and not b.ejected_until)
            panic = healthy * 100 < threshold * total
            if panic != self.panic:
                self.panic = panic
                if panic:
                    log.error(
                        "pool %s: PANIC: only %d of %d backends healthy (threshold %d%%); "
                        "ignoring health and spreading over all of them",
                        self.name,
                        healthy,
                        total,
                        threshold,
                    )
                else:
                    log.warning("pool %s: left panic mode", self.name)
                self.events.panic(self, panic)
        elif self.panic:
            self.panic = False
            self.events.panic(self, False)
        eligible = [b for b in self.backends if self.eligible(b)]
        weights = []
        ramping = False
        for i, b in enumerate(eligible):
            b.index = i
            w = float(b.weight)
            if b.slow_start_until > now:
                span = b.slow_start_until - b.slow_start_began
                w *= max(SLOW_START_FLOOR, (now - b.slow_start_began) / span)
                ramping = True
            weights.append(w)
        self.ramping = ramping
        strategy = self.strategy_class(eligible, self.options, weights)
        # keep the rotation where it was: a rebuild on every slow-start tick or health flip
        # must not restart round robin at the first backend each time
        strategy.carry_state(self.strategy)
        self.strategy = strategy
        if self.sticky is not None:
            self._by_tag = {self.sticky_tag(b): b for b in self.backends}

    def status(self) -> dict:
        return {
            "strategy": self.config.strategy,
            "panic": self.panic,
            "queue_depth": self.queue_depth,
            "queue_timeouts": self.queue_timeouts,
            "backends": [backend_status(b) for b in self.backends],
        }


def backend_from_config(cfg: BackendConfig) -> Backend:
    return Backend(cfg.name, cfg.address.host, cfg.address.port, cfg.weight, cfg.max_connections)


def backend_status(b: Backend) -> dict:
    return {
        "name": b.name,
        "address": b.address,
        "source": b.source,
        "state": b.state.value,
        "healthy": b.healthy,
        "ejected": bool(b.ejected_until),
        "inflight": b.inflight,
        "reported_load": b.reported_load,
        "weight": b.weight,
        "max_connections": b.max_connections,
        "requests": b.requests,
        "errors": b.errors,
    }


class NotifyingEvents(PoolEvents):
    """The pools' event hooks, passed on, plus a call to `changed` on every health flip."""

    def __init__(self, inner: PoolEvents, changed: Callable[[], None]) -> None:
        self.inner = inner
        self.changed = changed

    def health_changed(self, pool: Pool, backend: Backend, healthy: bool, reason: str) -> None:
        self.inner.health_changed(pool, backend, healthy, reason)
        self.changed()

    def ejected(self, pool: Pool, backend: Backend, duration: float) -> None:
        self.inner.ejected(pool, backend, duration)

    def panic(self, pool: Pool, active: bool) -> None:
        self.inner.panic(pool, active)
