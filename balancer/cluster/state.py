"""What crosses the channel, as pure functions: backend state (owner -> workers) and counters
(workers -> owner). No sockets, no event loop: testable with plain Pool objects."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from balancer.backend import Backend, BackendState

if TYPE_CHECKING:
    from balancer.pool import Pool

log = logging.getLogger("balancer.cluster")


class ListenerCounts(Protocol):
    """A listener as a counter report reads it."""

    @property
    def connections(self) -> Collection[Any]: ...  # the open client connections

    @property
    def refused(self) -> int: ...


class MetricsReport(Protocol):
    def report(self) -> dict[str, Any]: ...


class Process(Protocol):
    """What a counter report reads of one serving process (the daemon, owner or worker)."""

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    @property
    def listeners(self) -> Mapping[str, ListenerCounts]: ...

    @property
    def metrics(self) -> MetricsReport | None: ...


Snapshot = dict[str, list[dict[str, Any]]]

# -- backend state: the owner decides, every worker applies ------------------------------------


def snapshot(
    pools: Mapping[str, Pool], load_stamps: Mapping[Backend, float] | None = None
) -> Snapshot:
    """The owner's view of every backend that workers must share: membership, health (from
    the owner's active checks), the operator's state, weight, and the reported load.

    Passive ejection and slow start are not in it: each process judges the traffic it
    carries itself. `load_stamps` (backend -> time of the check that carried its load) lets a
    worker tell a fresh report of the same value from an old one.
    """
    stamps = load_stamps or {}
    return {
        name: [
            {
                "name": b.name,
                "host": b.host,
                "port": b.port,
                "weight": b.weight,
                "max_connections": b.max_connections,
                "source": b.source,
                "healthy": b.healthy,
                "admin_state": b.admin_state.value,
                "load": b.reported_load,
                "load_at": stamps.get(b) if b.reported_load is not None else None,
            }
            for b in pool.backends
        ]
        for name, pool in pools.items()
    }


def apply_state(
    pools: Mapping[str, Pool],
    snap: Snapshot,
    *,
    on_removed: Callable[[Pool, Backend], None] | None = None,
    load_stamps: dict[Backend, float] | None = None,
) -> int:
    """Make `pools` agree with the owner's snapshot, through the Pool methods a reload and
    the admin API use (so strategies are rebuilt and swapped the same way). Returns how many
    backends changed. Pools the snapshot does not name are left alone: the config message
    that changes the set of pools always comes first.

    `load_stamps` is the worker's memory of the stamp of each backend's last applied report.
    """
    from balancer.config import Address, BackendConfig
    from balancer.pool import backend_from_config

    stamps = load_stamps if load_stamps is not None else {}
    changed = 0
    for pname, entries in snap.items():
        pool = pools.get(pname)
        if pool is None:
            continue
        wanted = set()
        for e in entries:
            name = e["name"]
            wanted.add(name)
            b = pool.find(name)
            touched = False
            if b is not None and (b.host, b.port) != (e["host"], e["port"]):
                # same name, new address: a different server (admin removed and re-added it)
                pool.remove_backend(b)
                if on_removed is not None:
                    on_removed(pool, b)
                b = None
            if b is None:
                b = backend_from_config(
                    BackendConfig(
                        name, Address(e["host"], e["port"]), e["weight"], e["max_connections"]
                    )
                )
                b.source = e.get("source", b.source)
                b.healthy = e["healthy"]
                b.admin_state = BackendState(e["admin_state"])
                pool.add_backend(b)
                touched = True
            else:
                if b.weight != e["weight"]:
                    pool.set_weight(b, e["weight"])
                    touched = True
                b.max_connections = e["max_connections"]  # read live by strategies
                state = BackendState(e["admin_state"])
                if b.admin_state is not state:
                    pool.set_admin_state(b, state)
                    touched = True
                if b.healthy != e["healthy"]:
                    pool.set_healthy(b, e["healthy"], "health checks of the owner process")
                    touched = True
            load = e.get("load")
            if load is None:
                if b.reported_load is not None:
                    b.reported_load = None
                    stamps.pop(b, None)
            elif stamps.get(b) != e.get("load_at") or b.reported_load != load:
                # a new report (even of the same value) restarts least_load's correction,
                # exactly as it does in the owner when its check answers
                b.report_load(load)
                stamps[b] = e.get("load_at")
            changed += touched
        for b in [b for b in pool.backends if b.name not in wanted]:
            pool.remove_backend(b)
            stamps.pop(b, None)
            if on_removed is not None:
                on_removed(pool, b)
            changed += 1
    return changed


# -- counters: every worker reports, the owner adds up -----------------------------------------

# Report keys whose leaves are gauges (current values): they count only while the worker
# that reported them lives. Everything else is a counter and survives the worker's death.
GAUGES = {"inflight", "connections", "queue_depth"}


def process_report(daemon: Process, *, with_metrics: bool = True) -> dict[str, Any]:
    """This process's counters, JSON-able: what a worker sends its owner every half second.

    Counters are totals since the process started (the owner adds them up, so a lost
    message costs nothing); `inflight`, `connections` and `queue_depth` are current values.
    """
    backends: dict[str, dict[str, dict[str, int]]] = {}
    queue_depth: dict[str, int] = {}
    for pname, pool in daemon.pools.items():
        backends[pname] = {
            b.name: {"requests": b.requests, "errors": b.errors, "inflight": b.inflight}
            for b in pool.backends
        }
        queue_depth[pname] = pool.queue_depth
    listeners = {
        name: {
            "connections": len(lst.connections),
            "refused": lst.refused,
            "rejected": getattr(lst, "rejected", 0),
        }
        for name, lst in daemon.listeners.items()
    }
    report: dict[str, Any] = {
        "backends": backends,
        "listeners": listeners,
        "queue_depth": queue_depth,
    }
    if with_metrics and daemon.metrics is not None:
        report["metrics"] = daemon.metrics.report()
    return report


def add(total: Any, part: Any) -> Any:
    """`total` + `part`, leaf by leaf: numbers summed, lists (histogram rows) summed element
    by element, mappings merged recursively. Pure: neither argument is changed."""
    if total is None:
        return _copy(part)
    if part is None:
        return _copy(total)
    if isinstance(total, dict) and isinstance(part, dict):
        out = {k: _copy(v) for k, v in total.items()}
        for k, v in part.items():
            out[k] = add(out.get(k), v)
        return out
    if isinstance(total, list) and isinstance(part, list):
        n = max(len(total), len(part))
        return [
            (total[i] if i < len(total) else 0) + (part[i] if i < len(part) else 0)
            for i in range(n)
        ]
    if isinstance(total, int | float) and isinstance(part, int | float):
        return total + part
    return _copy(part)  # mismatched shapes (a newer worker): the newer value wins


def without_gauges(report: Any) -> Any:
    """`report` with every gauge leaf dropped: what is kept of a worker that died."""
    if isinstance(report, dict):
        return {k: without_gauges(v) for k, v in report.items() if k not in GAUGES}
    return _copy(report)


def total(reports: Iterable[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in reports:
        out = add(out, r)
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


def process_totals(report: dict[str, Any]) -> dict[str, int]:
    """One process's line in /status `workers`: open client connections, backend requests."""
    return {
        "connections": sum(v.get("connections", 0) for v in report.get("listeners", {}).values()),
        "requests": sum(
            b.get("requests", 0)
            for backends in report.get("backends", {}).values()
            for b in backends.values()
        ),
    }


def merge_status(status: dict[str, Any], counters: dict[str, Any]) -> dict[str, Any]:
    """Add the workers' `counters` (see total()) into the owner's /status document, so each
    backend's `inflight`, `requests`, `errors` and each listener's `connections`, `refused`,
    `rejected` are totals over every process. Changes and returns `status`."""
    backends = counters.get("backends", {})
    for pname, pool in status.get("pools", {}).items():
        remote = backends.get(pname, {})
        for entry in pool.get("backends", []):
            r = remote.get(entry["name"])
            if r:
                for key in ("inflight", "requests", "errors"):
                    entry[key] = entry.get(key, 0) + r.get(key, 0)
    listeners = counters.get("listeners", {})
    for entry in status.get("listeners", []):
        r = listeners.get(entry["name"])
        if r:
            for key in ("connections", "refused", "rejected"):
                if key in entry:  # tcp listeners have no `rejected`
                    entry[key] += r.get(key, 0)
    return status
