"""One pool's discovery at run time: its sources run as tasks, each snapshot they publish is
reconciled (balancer.discovery.reconcile) into the pool through the same backend calls the
admin API makes, and the registry's freshness is kept for /status and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from balancer.backend import Backend, BackendState
from balancer.config.schema import Address, DiscoveryConfig
from balancer.discovery.reconcile import Current, Damping, Listed, Plan, merge, plan
from balancer.discovery.records import Snapshot, Source
from balancer.pool import Pool

log = logging.getLogger("balancer.discovery")

CONFIG = "config"  # the source of a backend the file lists
FRESH = "fresh"  # the registry answers; the pool is what it holds
STALE = "stale"  # the registry cannot be reached: the pool keeps what it last held
STARTING = "starting"  # no answer yet, no failure yet


class PoolBackends(Protocol):
    """The calls discovery changes pools through (the admin API's own, on the daemon)."""

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    def add_backend(
        self, pool_name: str, name: str, address: str, weight: int = 1, *, source: str = ...
    ) -> Backend: ...

    def update_backend(
        self, pool_name: str, name: str, *, state: str | None = None, weight: int | None = None
    ) -> Backend: ...

    def remove_backend(self, pool_name: str, name: str, *, drain: bool = True) -> Backend: ...


def build_sources(config: DiscoveryConfig) -> list[Source]:
    """The sources a pool's `discovery:` names."""
    sources: list[Source] = []
    if config.etcd is not None:
        from balancer.discovery.etcd import EtcdSource

        sources.append(EtcdSource(config.etcd))
    if config.dns is not None:
        from balancer.discovery.dns import DnsSource

        sources.append(DnsSource(config.dns))
    return sources


@dataclass
class SourceState:
    """What /status and the metrics say about one source of one pool."""

    state: str = STARTING
    since: float = 0.0  # wall time the state began
    error: str = ""  # the latest failure, while stale
    records: int = 0  # in the latest snapshot
    skipped: int = 0  # malformed entries in the latest snapshot
    updates: int = 0  # snapshots received
    failures: int = 0  # times the registry could not be reached

    def status(self) -> dict:
        st: dict = {
            "state": self.state,
            "since": self.since,
            "backends": self.records,
            "skipped": self.skipped,
            "updates": self.updates,
            "failures": self.failures,
        }
        if self.state == STALE:
            st["error"] = self.error
        return st


class PoolDiscovery:
    """Keeps pool `pool_name`'s discovered backends what its registries hold."""

    def __init__(
        self,
        pool_name: str,
        config: DiscoveryConfig,
        backends: PoolBackends,
        *,
        sources: list[Source] | None = None,
        damping: Damping | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.pool_name = pool_name
        self.config = config
        self.backends = backends
        self.sources = sources if sources is not None else build_sources(config)
        self.damping = damping or Damping()
        self.wall = wall
        self.snapshots: dict[str, Snapshot] = {}
        self.states = {s.kind: SourceState(since=wall()) for s in self.sources}
        self.held: tuple[str, ...] = ()
        self.skipped: tuple[str, ...] = ()
        # names this discovery drained: an operator's own drain (PATCH) is theirs to undo
        self._drained: set[str] = set()
        self._logged: set[str] = set()  # skipped entries already logged (once each)
        self._tasks: list[asyncio.Task] = []
        self._wake: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._answered = asyncio.Event()  # every source answered or failed once

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for source in self.sources:
            kind = source.kind
            self._tasks.append(
                loop.create_task(
                    source.run(
                        lambda snap, kind=kind: self.publish(kind, snap),
                        lambda reason, kind=kind: self.unavailable(kind, reason),
                    )
                )
            )

    async def first_answers(self, timeout: float) -> None:
        """Wait (up to `timeout`) until every source has answered or failed once: a daemon
        starting up then serves its registered backends from the first request on."""
        try:
            await asyncio.wait_for(self._answered.wait(), timeout)
        except TimeoutError:
            log.warning("pool %s: no answer from its registries yet; serving on", self.pool_name)

    def _check_answered(self) -> None:
        if all(st.state != STARTING for st in self.states.values()):
            self._answered.set()

    async def stop(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # -- what the sources report ------------------------------------------------------------

    def publish(self, kind: str, snapshot: Snapshot) -> None:
        st = self.states[kind]
        if st.state != FRESH:
            if st.state == STALE:
                log.warning("pool %s: %s registry reachable again", self.pool_name, kind)
            st.state, st.since, st.error = FRESH, self.wall(), ""
        st.updates += 1
        st.records = len(snapshot.records)
        st.skipped = len(snapshot.skipped)
        self.snapshots[kind] = snapshot
        self.reconcile()
        self._check_answered()

    def unavailable(self, kind: str, reason: str) -> None:
        st = self.states[kind]
        st.failures += 1
        st.error = reason
        if st.state != STALE:
            st.state, st.since = STALE, self.wall()
            log.error(
                "pool %s: %s registry unreachable (%s): keeping the %d backend(s) it last"
                " listed until it answers again",
                self.pool_name,
                kind,
                reason,
                st.records,
            )
        self._check_answered()

    # -- reconciliation ---------------------------------------------------------------------

    def reconcile(self) -> Plan | None:
        pool = self.backends.pools.get(self.pool_name)
        if pool is None:
            return None  # the pool is gone (a reload in progress): nothing to change
        wanted, clashes = merge(self.snapshots)
        current, listed = self._current(pool)
        loop = self._loop
        now = loop.time() if loop is not None else time.monotonic()
        p = plan(wanted, current, listed, self.damping, now)
        self._execute(p)
        self.held = p.held
        self.skipped = tuple(clashes) + p.skipped + self._malformed()
        self._log_skipped()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if p.wake_at is not None and loop is not None:
            self._wake = loop.call_at(p.wake_at + 0.01, self.reconcile)
        return p

    def _current(self, pool: Pool) -> tuple[dict[str, Current], Listed]:
        current: dict[str, Current] = {}
        names, addresses = set(), set()
        for b in pool.backends:
            if b.source not in self.states:  # listed in the file, or added by an operator
                names.add(b.name)
                addresses.add(Address(b.host, b.port))
                continue
            draining = b.name in self._drained and b.admin_state is BackendState.DRAINING
            current[b.name] = Current(b.name, Address(b.host, b.port), b.weight, draining)
        self._drained &= set(current)
        return current, Listed(frozenset(names), frozenset(addresses))

    def _execute(self, p: Plan) -> None:
        name = self.pool_name
        for backend in p.remove:
            self.backends.remove_backend(name, backend, drain=False)
            self._drained.discard(backend)
        for w in p.add:
            rec = w.record
            self.backends.add_backend(name, rec.name, str(rec.address), rec.weight, source=w.source)
        for w in p.restore:
            self.backends.update_backend(name, w.name, state="up", weight=w.record.weight)
            self._drained.discard(w.name)
            log.warning("pool %s: %s is back in %s: in service again", name, w.name, w.source)
        for w in p.reweight:
            self.backends.update_backend(name, w.name, weight=w.record.weight)
        for backend in p.drain:
            self.backends.remove_backend(name, backend)
            self._drained.add(backend)
        if p.held:
            log.warning(
                "pool %s: held back by flap damping (registered and gone too often): %s",
                name,
                ", ".join(p.held),
            )

    def _malformed(self) -> tuple[str, ...]:
        return tuple(entry for snap in self.snapshots.values() for entry in snap.skipped)

    def _log_skipped(self) -> None:
        for entry in self.skipped:
            if entry not in self._logged:
                log.error("pool %s: discovery skipped %s", self.pool_name, entry)
        self._logged = set(self.skipped)

    # -- reading ----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        states = [st.state for st in self.states.values()]
        if STALE in states:
            return STALE
        return STARTING if STARTING in states else FRESH

    def status(self) -> dict:
        """For /status: `state` and `since` of the pool's registries as a whole (stale if any
        is), each source's own, and what is held back or skipped."""
        stale = [st.since for st in self.states.values() if st.state == STALE]
        since = min(stale) if stale else max((st.since for st in self.states.values()), default=0)
        return {
            "state": self.state,
            "since": since,
            "sources": {kind: st.status() for kind, st in self.states.items()},
            "held": list(self.held),
            "skipped": list(self.skipped),
        }


def discovery_summary(pools: Mapping[str, dict]) -> dict:
    """/status's top-level `discovery`: stale while any pool's registry is (since the
    earliest), with each pool's own status under `pools`."""
    stale = [d["since"] for d in pools.values() if d["state"] == STALE]
    starting = any(d["state"] == STARTING for d in pools.values())
    if stale:
        state, since = STALE, min(stale)
    else:
        state = STARTING if starting else FRESH
        since = max((d["since"] for d in pools.values()), default=0.0)
    return {"state": state, "since": since, "pools": dict(pools)}
