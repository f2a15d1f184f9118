"""Metrics: hot-path counters as plain ints, turned into Prometheus families at scrape time."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from balancer.admin.discovery_metrics import discovery_families
from balancer.backend import Backend, BackendState
from balancer.pool import Pool, PoolEvents
from balancer.proxy.observe import (
    BROKEN,
    BYTES_IN,
    BYTES_OUT,
    C_OTHER,
    DURATION_BOUNDS,
    DURATION_SUM,
    HIST,
    NO_POOL,
    count_request,
    new_row,
)

if TYPE_CHECKING:
    from balancer.admin import surface
    from balancer.proxy.exchange import Exchange

_LE = tuple(f"{b:g}" for b in DURATION_BOUNDS) + ("+Inf",)

CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")  # the row's first six slots
NO_BACKEND = "-"  # requests answered without reaching a backend (503 no healthy backend, 404)

# Rows of backends gone from the config (removed, renamed, pool dropped) are kept while they
# may still be scraped, then dropped: an autoscaler adding a new name per instance must not
# grow the daemon's memory and the scrape for ever.
STALE_ROW_SECONDS = 600.0
RECENT_ERRORS = 50  # kept for the dashboard's "recent errors" panel
STATES = tuple(s.value for s in BackendState)
HA_ROLES = ("active", "passive", "standalone")


class Source(Protocol):
    """What the metrics read of the running daemon at scrape time (and nothing else)."""

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    @property
    def listeners(self) -> Mapping[str, surface.Listener]: ...

    @property
    def checkers(self) -> Mapping[str, surface.Checker]: ...

    @property
    def cluster(self) -> surface.Cluster | None: ...  # with workers: N > 1, in the owner

    @property
    def ha(self) -> surface.Ha | None: ...

    @property
    def discoveries(self) -> Mapping[str, surface.Discovery]: ...  # pool name -> registries

    @property
    def reloads(self) -> int: ...

    @property
    def reload_failures(self) -> int: ...


class Metrics:
    """Counts what the proxy and the pools report and exposes it as Prometheus text.

    The proxy calls `request_done`, `backend_failed` and `retried` (through its Observer);
    pools call the `PoolEvents` from `pool_events()`. Everything else (in-flight, states,
    queue depth, HA) is read from the daemon's live objects at scrape time.
    """

    def __init__(self, daemon: Source) -> None:
        self.daemon = daemon
        # pool name -> backend name -> row (see the slot constants above)
        self.stats: dict[str, dict[str, list]] = {}
        self.retries: dict[str, int] = {}
        self.failures: dict[tuple[str, str, str], int] = {}
        self.ejections: dict[tuple[str, str], int] = {}
        self.transitions: dict[tuple[str, str, str], int] = {}
        self.panics: dict[str, int] = {}
        self.recent: deque[tuple[Any, ...]] = deque(maxlen=RECENT_ERRORS)
        self._idle: dict[tuple[str, str], tuple[int, float]] = {}  # stale row -> (count, since)
        # counters that live on objects a reload replaces, made monotonic per name
        self.pool_totals = _Accumulator()
        self.listener_totals = _Accumulator()
        self.check_totals = _Accumulator()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    # -- the hot path ------------------------------------------------------------------------

    # One finished request (the proxy calls this once per response, or per broken one):
    # request_done(ex, duration, broken). A function of balancer/proxy/observe.py, compiled
    # with the proxy: interpreted here, it cost a third of what the proxy does per request.
    request_done = count_request

    def backend_failed(self, ex: Exchange, backend: Backend, kind: str) -> None:
        """A backend failed a request (connect, reset, timeout, protocol)."""
        pool = ex.pool.name if ex.pool is not None else NO_POOL
        key = (pool, backend.name, kind)
        self.failures[key] = self.failures.get(key, 0) + 1
        self._note(pool, backend.name, "backend " + kind, _request_line(ex))

    def retried(self, ex: Exchange, backend: Backend) -> None:
        """A failed attempt on `backend` is being retried on another one."""
        pool = ex.pool.name if ex.pool is not None else NO_POOL
        self.retries[pool] = self.retries.get(pool, 0) + 1

    # -- pool events ---------------------------------------------------------------------------

    def pool_events(self) -> PoolEvents:
        """The PoolEvents the daemon hands every pool: counts health flips, ejections, panics."""
        return _Events(self)

    def _note(self, pool: str, backend: str, kind: str, detail: str) -> None:
        self.recent.append((time.time(), kind, pool, backend, detail))

    def recent_errors(self) -> list[dict[str, Any]]:
        """The latest errors, newest first, for /status and the dashboard."""
        out = []
        for t, kind, pool, backend, detail in reversed(self.recent):
            if isinstance(detail, tuple):
                status, method, url = detail
                detail = f"{status} {method.decode('latin-1')} {url.decode('latin-1')}"
            out.append(
                {"time": t, "kind": kind, "pool": pool, "backend": backend, "detail": detail}
            )
        return out

    # -- worker processes ---------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """This process's counters as JSON-able totals since it started: what a worker
        process sends its owner, which adds them to its own at scrape time."""
        pools = dict(self.daemon.pools)
        # a worker prunes its rows of removed backends as the owner does at scrape time:
        # otherwise its reports would bring them back into every scrape for ever
        self._drop_stale_rows(pools, time.monotonic())
        self._fold_pools(pools)
        self._fold_listeners(dict(self.daemon.listeners))
        failures: dict[str, dict[str, dict[str, int]]] = {}
        for (pool, backend, kind), n in self.failures.items():
            failures.setdefault(pool, {}).setdefault(backend, {})[kind] = n
        ejections: dict[str, dict[str, int]] = {}
        for (pool, backend), n in self.ejections.items():
            ejections.setdefault(pool, {})[backend] = n
        return {
            "requests": {
                p: {b: list(row) for b, row in rows.items()} for p, rows in self.stats.items()
            },
            "failures": failures,
            "retries": dict(self.retries),
            "ejections": ejections,
            "pool_totals": _nest(self.pool_totals.totals),
            "listener_totals": _nest(self.listener_totals.totals),
        }

    def _remote(self) -> dict[str, Any]:
        """The counters of this owner's worker processes, added up ({} without workers)."""
        cluster = self.daemon.cluster
        return cluster.counters() if cluster is not None else {}

    # -- scraping -----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of everything."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        pools = dict(daemon.pools)
        # current backends get a row even before their first request: their series exist
        # from the start, so rate() and absent() behave
        for pname, pool in pools.items():
            self.retries.setdefault(pname, 0)
            self.panics.setdefault(pname, 0)
            by_backend = self.stats.setdefault(pname, {})
            for b in pool.backends:
                if b.name not in by_backend:
                    by_backend[b.name] = new_row()
        self._drop_stale_rows(pools, time.monotonic())
        remote = self._remote()
        workers = remote.get("metrics", {})
        yield from self._requests(workers)
        yield from self._backends(pools, remote, workers)
        yield from self._pools(pools, remote, workers)
        yield from self._health()
        yield from self._listeners(remote, workers)
        yield from self._ha()
        yield from discovery_families(self.daemon.discoveries)
        reloads = CounterMetricFamily(
            "balancer_config_reloads",
            "Config reloads (SIGHUP or POST /reload) by result.",
            labels=["result"],
        )
        reloads.add_metric(["success"], daemon.reloads)
        reloads.add_metric(["failure"], daemon.reload_failures)
        yield reloads
        yield from self._processes()
        info = GaugeMetricFamily(
            "balancer_build_info", "Always 1; the version as a label.", labels=["version"]
        )
        info.add_metric([__import__("balancer").__version__], 1)
        yield info

    def _drop_stale_rows(self, pools: dict[str, Pool], now: float) -> None:
        for pname, rows in list(self.stats.items()):
            pool = pools.get(pname)
            names = {b.name for b in pool.backends} if pool is not None else set()
            for bname in list(rows):
                key = (pname, bname)
                if bname in names or bname == NO_BACKEND:
                    self._idle.pop(key, None)
                    continue
                count = sum(rows[bname][:BROKEN])
                seen = self._idle.get(key)
                if seen is None or seen[0] != count:
                    self._idle[key] = (count, now)
                elif now - seen[1] > STALE_ROW_SECONDS:
                    del rows[bname]
                    del self._idle[key]
                    self._forget(pname, bname)
            if not rows and pool is None:
                del self.stats[pname]

    def _forget(self, pool: str, backend: str) -> None:
        """Drop the failure and ejection counts of a backend whose request row went stale."""
        for key in [k for k in self.failures if k[0] == pool and k[1] == backend]:
            del self.failures[key]
        self.ejections.pop((pool, backend), None)

    def _requests(self, workers: dict[str, Any]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "balancer_requests",
            "Finished requests by pool, backend and status class. pool/backend '-': answered"
            " before a pool was chosen, or without reaching a backend.",
            labels=["pool", "backend", "code_class"],
        )
        broken = CounterMetricFamily(
            "balancer_responses_broken",
            "Responses cut off mid-way (backend failed mid-body, or the client left).",
            labels=["pool", "backend"],
        )
        sent = CounterMetricFamily(
            "balancer_bytes_sent",
            "Bytes sent to clients (response heads and bodies).",
            labels=["pool", "backend"],
        )
        received = CounterMetricFamily(
            "balancer_bytes_received",
            "Request body bytes received from clients.",
            labels=["pool", "backend"],
        )
        by_pool = HistogramMetricFamily(
            "balancer_request_duration_seconds",
            "Time from a request's parsed head to the end of its response, by pool.",
            labels=["pool"],
        )
        by_backend = HistogramMetricFamily(
            "balancer_backend_response_seconds",
            "Time from a request's parsed head to the end of its response, by backend: the"
            " same measurement as balancer_request_duration_seconds (no separate time to"
            " first byte is taken), for requests a backend answered.",
            labels=["pool", "backend"],
        )
        stats = self.stats
        if workers.get("requests"):
            stats = _add_rows(stats, workers["requests"])
        for pname, rows in stats.items():
            pool_hist = [0] * (len(DURATION_BOUNDS) + 1)
            pool_sum = 0.0
            for bname, row in rows.items():
                labels = [pname, bname]
                for i in range(5):
                    requests.add_metric([pname, bname, CODE_CLASSES[i]], row[i])
                if row[C_OTHER]:
                    requests.add_metric([pname, bname, "other"], row[C_OTHER])
                broken.add_metric(labels, row[BROKEN])
                sent.add_metric(labels, row[BYTES_OUT])
                received.add_metric(labels, row[BYTES_IN])
                hist = row[HIST:]
                for i, n in enumerate(hist):
                    pool_hist[i] += n
                pool_sum += row[DURATION_SUM]
                if bname != NO_BACKEND:
                    by_backend.add_metric(labels, _cumulative(hist), row[DURATION_SUM])
            by_pool.add_metric([pname], _cumulative(pool_hist), pool_sum)
        yield from (requests, broken, sent, received, by_pool, by_backend)
        failures = CounterMetricFamily(
            "balancer_backend_failures",
            "Failed attempts on a backend, by kind (connect, reset, timeout, protocol).",
            labels=["pool", "backend", "kind"],
        )
        all_failures = dict(self.failures)
        for (pool, backend, kind), n in _flatten(workers.get("failures", {}), 3):
            all_failures[(pool, backend, kind)] = all_failures.get((pool, backend, kind), 0) + n
        for key, n in all_failures.items():
            failures.add_metric(list(key), n)
        retries = CounterMetricFamily(
            "balancer_retries", "Attempts retried on another backend.", labels=["pool"]
        )
        remote_retries = workers.get("retries", {})
        for pname in self.retries.keys() | remote_retries.keys():
            retries.add_metric([pname], self.retries.get(pname, 0) + remote_retries.get(pname, 0))
        yield from (failures, retries)

    def _backends(
        self, pools: dict[str, Pool], remote: dict[str, Any], workers: dict[str, Any]
    ) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(
            "balancer_backend_inflight",
            "Requests in flight to a backend.",
            labels=["pool", "backend"],
        )
        up = GaugeMetricFamily(
            "balancer_backend_up",
            "1 if the backend takes new requests (state up), else 0.",
            labels=["pool", "backend"],
        )
        state = GaugeMetricFamily(
            "balancer_backend_state",
            "1 for the backend's current state (up, down, draining, disabled), 0 for the others.",
            labels=["pool", "backend", "state"],
        )
        load = GaugeMetricFamily(
            "balancer_backend_reported_load",
            "Load the backend last reported in its health check answer (0 idle .. 1 saturated);"
            " absent while it reports none.",
            labels=["pool", "backend"],
        )
        weight = GaugeMetricFamily(
            "balancer_backend_weight",
            "The backend's configured weight.",
            labels=["pool", "backend"],
        )
        remote_backends = remote.get("backends", {})
        for pname, pool in pools.items():
            elsewhere = remote_backends.get(pname, {})
            for b in pool.backends:
                labels = [pname, b.name]
                current = b.state.value
                inflight.add_metric(
                    labels, b.inflight + elsewhere.get(b.name, {}).get("inflight", 0)
                )
                up.add_metric(labels, 1 if current == "up" else 0)
                for s in STATES:
                    state.add_metric([pname, b.name, s], 1 if s == current else 0)
                if b.reported_load is not None:
                    load.add_metric(labels, b.reported_load)
                weight.add_metric(labels, b.weight)
        ejections = CounterMetricFamily(
            "balancer_ejections",
            "Backends taken out by passive detection (consecutive failures).",
            labels=["pool", "backend"],
        )
        all_ejections = dict(self.ejections)
        for key, n in _flatten(workers.get("ejections", {}), 2):
            all_ejections[key] = all_ejections.get(key, 0) + n
        for key, n in all_ejections.items():
            ejections.add_metric(list(key), n)
        flips = CounterMetricFamily(
            "balancer_health_transitions",
            "Backend health flips, by the state flipped to (up, down).",
            labels=["pool", "backend", "to"],
        )
        for key, n in self.transitions.items():
            flips.add_metric(list(key), n)
        yield from (inflight, up, state, load, weight, ejections, flips)

    def _fold_pools(self, pools: dict[str, Pool]) -> None:
        self.pool_totals.fold(
            [(p, (name,)) for name, p in pools.items()],
            lambda p: {
                "queue_timeouts": p.queue_timeouts,
                "hit": p.sticky_hits,
                "miss": p.sticky_misses,
                "repin": p.sticky_repins,
            },
        )

    def _pools(
        self, pools: dict[str, Pool], remote: dict[str, Any], workers: dict[str, Any]
    ) -> Iterator[Metric]:
        self._fold_pools(pools)
        totals = _add_totals(self.pool_totals.totals, workers.get("pool_totals", {}))
        remote_depth = remote.get("queue_depth", {})
        depth = GaugeMetricFamily(
            "balancer_queue_depth",
            "Requests waiting for a backend connection slot (all backends at max_connections).",
            labels=["pool"],
        )
        panic = GaugeMetricFamily(
            "balancer_pool_panic",
            "1 while the pool is in panic mode (too few healthy backends: health ignored).",
            labels=["pool"],
        )
        for name, p in pools.items():
            depth.add_metric([name], p.queue_depth + remote_depth.get(name, 0))
            panic.add_metric([name], 1 if p.panic else 0)
        timeouts = CounterMetricFamily(
            "balancer_queue_timeouts",
            "Queued requests that found no free slot in time.",
            labels=["pool"],
        )
        sticky = CounterMetricFamily(
            "balancer_sticky",
            "Sticky cookie outcomes: hit (pinned backend used), miss (no cookie), repin"
            " (pinned backend down, draining or gone: moved).",
            labels=["pool", "result"],
        )
        for (field, (name,)), n in totals.items():
            if field == "queue_timeouts":
                timeouts.add_metric([name], n)
            else:
                sticky.add_metric([name, field], n)
        panics = CounterMetricFamily(
            "balancer_panics", "Times the pool entered panic mode.", labels=["pool"]
        )
        for name, n in self.panics.items():
            panics.add_metric([name], n)
        yield from (depth, panic, timeouts, sticky, panics)

    def _health(self) -> Iterator[Metric]:
        # one entry per (checker, backend): a reload starts new checkers whose results begin
        # at zero, and the totals must not go down
        current = [
            (_Key(checker, b), (name, b.name))
            for name, checker in list(self.daemon.checkers.items())
            for b in list(checker.results)
        ]
        acc = self.check_totals
        acc.fold(current, _check_results)
        checks = CounterMetricFamily(
            "balancer_health_checks",
            "Active health checks by result (pass, fail).",
            labels=["pool", "backend", "result"],
        )
        for (result, (pool, backend)), n in acc.totals.items():
            checks.add_metric([pool, backend, result], n)
        yield checks

    def _fold_listeners(self, listeners: dict[str, Any]) -> None:
        self.listener_totals.fold(
            [(lst, (name,)) for name, lst in listeners.items()],
            lambda lst: {"refused": lst.refused, "rejected": getattr(lst, "rejected", 0)},
        )

    def _listeners(self, remote: dict[str, Any], workers: dict[str, Any]) -> Iterator[Metric]:
        listeners = dict(self.daemon.listeners)
        self._fold_listeners(listeners)
        totals = _add_totals(self.listener_totals.totals, workers.get("listener_totals", {}))
        remote_listeners = remote.get("listeners", {})
        conns = GaugeMetricFamily(
            "balancer_client_connections", "Open client connections.", labels=["listener"]
        )
        for name, lst in listeners.items():
            elsewhere = remote_listeners.get(name, {}).get("connections", 0)
            conns.add_metric([name], len(lst.connections) + elsewhere)  # type: ignore[attr-defined]
        refused = CounterMetricFamily(
            "balancer_connections_refused",
            "Client connections refused at accept (over a connection cap).",
            labels=["listener"],
        )
        rejected = CounterMetricFamily(
            "balancer_requests_rejected",
            "Requests answered locally for bad input (400, 408, 413, 431).",
            labels=["listener"],
        )
        for (field, (name,)), n in totals.items():
            (refused if field == "refused" else rejected).add_metric([name], n)
        yield from (conns, refused, rejected)

    def _processes(self) -> Iterator[Metric]:
        """workers: N: how many processes serve, and how often workers had to be respawned."""
        cluster = self.daemon.cluster
        if cluster is None:
            return
        serving = GaugeMetricFamily(
            "balancer_processes_serving",
            "Processes serving the listeners: the owner plus its workers that are up and in"
            " sync with its config and backend state.",
        )
        procs = cluster.status()
        serving.add_metric([], 1 + sum(1 for w in procs if w["in_sync"]))
        configured = GaugeMetricFamily(
            "balancer_processes", "Processes configured (workers: N), the owner included."
        )
        configured.add_metric([], 1 + len(procs))
        restarts = CounterMetricFamily(
            "balancer_worker_restarts", "Worker processes respawned after they died."
        )
        restarts.add_metric([], cluster.restarts)
        hung = CounterMetricFamily(
            "balancer_worker_hangs",
            "Worker processes killed because they stopped reporting (alive but stuck).",
        )
        hung.add_metric([], cluster.hung)
        yield from (serving, configured, restarts, hung)

    def _ha(self) -> Iterator[Metric]:
        ha = self.daemon.ha
        role = GaugeMetricFamily(
            "balancer_ha_role",
            "1 for this node's HA role (active, passive; standalone without ha:), 0 for others.",
            labels=["role"],
        )
        current = ha.role if ha is not None else "standalone"
        for r in HA_ROLES:
            role.add_metric([r], 1 if r == current else 0)
        transitions = CounterMetricFamily(
            "balancer_ha_transitions", "HA role changes of this node."
        )
        transitions.add_metric([], ha.transitions if ha is not None else 0)
        beats = CounterMetricFamily(
            "balancer_ha_heartbeats",
            "HA heartbeats: sent (result ok), received and accepted (result ok), received and"
            " rejected (result: the reason).",
            labels=["direction", "result"],
        )
        if ha is not None:
            beats.add_metric(["sent", "ok"], ha.heartbeats_sent)
            beats.add_metric(["received", "ok"], ha.heartbeats_received)
            for reason, n in sorted(ha.heartbeats_rejected.items()):
                beats.add_metric(["received", str(reason)], n)
        instances = GaugeMetricFamily(
            "balancer_ha_instance_role",
            "1 for this node's role for each floating IP (active, passive), 0 for the other.",
            labels=["virtual_ip", "role"],
        )
        if ha is not None:
            for virtual_ip, current_role in ha.instance_roles():
                for r in ("active", "passive"):
                    instances.add_metric([virtual_ip, r], 1 if r == current_role else 0)
        yield from (role, transitions, beats, instances)


def _cumulative(counts: Iterable[int]) -> list[tuple[str, float]]:
    out = []
    total = 0
    for le, n in zip(_LE, counts, strict=True):
        total += n
        out.append((le, total))
    return out


def _nest(totals: dict[tuple[str, tuple[str, ...]], int]) -> dict[str, dict[str, int]]:
    """An _Accumulator's {(field, (name,)): n} as {name: {field: n}} (JSON has no tuples)."""
    out: dict[str, dict[str, int]] = {}
    for (field, labels), n in totals.items():
        out.setdefault(labels[0], {})[field] = n
    return out


def _add_totals(
    own: dict[tuple[str, tuple[str, ...]], int], remote: dict[str, dict[str, int]]
) -> dict[tuple[str, tuple[str, ...]], int]:
    out = dict(own)
    for name, fields in remote.items():
        for field, n in fields.items():
            out[(field, (name,))] = out.get((field, (name,)), 0) + n
    return out


def _add_rows(
    own: dict[str, dict[str, list]], remote: dict[str, dict[str, list]]
) -> dict[str, dict[str, list]]:
    """Request rows of this process plus those the workers reported, slot by slot."""
    out = {pname: dict(rows) for pname, rows in own.items()}
    for pname, rows in remote.items():
        mine = out.setdefault(pname, {})
        for bname, row in rows.items():
            have = mine.get(bname)
            if have is None or len(have) != len(row):
                mine[bname] = list(row) if have is None else have
            else:
                mine[bname] = [a + b for a, b in zip(have, row, strict=True)]
    return out


def _flatten(nested: dict[str, Any], depth: int) -> Iterator[tuple[tuple[str, ...], int]]:
    """({a: {b: n}}, 2) -> ((a, b), n) ...: report mappings back to label tuples."""
    for key, value in nested.items():
        if depth == 1:
            yield (key,), value
        else:
            for rest, n in _flatten(value, depth - 1):
                yield (key, *rest), n


def _request_line(ex: Exchange) -> str:
    return f"{ex.method.decode('latin-1')} {ex.url[:200].decode('latin-1')}"


class _Events(PoolEvents):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def health_changed(self, pool: Pool, backend: Backend, healthy: bool, reason: str) -> None:
        key = (pool.name, backend.name, "up" if healthy else "down")
        m = self.m
        m.transitions[key] = m.transitions.get(key, 0) + 1
        if not healthy:
            m._note(pool.name, backend.name, "health down", reason)

    def ejected(self, pool: Pool, backend: Backend, duration: float) -> None:
        key = (pool.name, backend.name)
        m = self.m
        m.ejections[key] = m.ejections.get(key, 0) + 1
        m._note(pool.name, backend.name, "ejected", f"for {duration:g}s after failures")

    def panic(self, pool: Pool, active: bool) -> None:
        if active:
            m = self.m
            m.panics[pool.name] = m.panics.get(pool.name, 0) + 1
            m._note(pool.name, NO_BACKEND, "panic", "too few healthy backends: health ignored")


class _Key:
    """A (checker, backend) pair usable as a dict key (compared by identity)."""

    __slots__ = ("checker", "backend")

    def __init__(self, checker: Any, backend: Backend) -> None:
        self.checker = checker
        self.backend = backend

    def __hash__(self) -> int:
        return hash((id(self.checker), id(self.backend)))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Key)
            and other.checker is self.checker
            and other.backend is self.backend
        )


def _check_results(k: _Key) -> dict[str, int]:
    passes, failures = k.checker.results.get(k.backend, (0, 0))
    return {"pass": passes, "fail": failures}


class _Accumulator:
    """Monotonic totals of counters kept on objects that a reload replaces.

    `fold()` adds what each object's counters grew by since it was last read to the total of
    its labels. An object no longer among the current ones is read a last time, then
    forgotten, so a replaced pool's counts are neither lost nor kept alive for ever.
    """

    def __init__(self) -> None:
        self.totals: dict[tuple[str, tuple[str, ...]], int] = {}
        self._last: dict[Any, tuple[tuple[str, ...], dict[str, int]]] = {}

    def fold(
        self,
        current: list[tuple[Any, tuple[str, ...]]],
        read: Callable[[Any], dict[str, int]],
    ) -> None:
        """Fold in the `current` (object, labels) pairs, and the last values of the rest."""
        live = set()
        for obj, labels in current:
            self._add(obj, labels, read(obj))
            live.add(obj)
        for obj in [o for o in self._last if o not in live]:
            labels, _ = self._last[obj]
            self._add(obj, labels, read(obj))
            del self._last[obj]

    def _add(self, obj: Any, labels: tuple[str, ...], values: dict[str, int]) -> None:
        last = self._last.get(obj)
        before = last[1] if last is not None else {}
        for field, v in values.items():
            key = (field, labels)
            grew = v - before.get(field, 0)
            # a zero total is still exported: the series exists before its first event
            self.totals[key] = self.totals.get(key, 0) + (grew if grew > 0 else 0)
        self._last[obj] = (labels, values)


class _Collector:
    """The registry's view of a Metrics object: families built at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.collect()
