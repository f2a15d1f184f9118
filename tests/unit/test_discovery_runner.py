"""PoolDiscovery over a real Pool, its backend calls done in memory (the daemon's own are
exercised by tests/integration/test_discovery_etcd.py): what snapshots and outages do to
the pool, /status and the metrics."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from balancer.admin.metrics import Metrics
from balancer.backend import Backend, BackendState
from balancer.config import Address, BackendConfig, PoolConfig
from balancer.config.schema import DiscoveryConfig, EtcdDiscoveryConfig
from balancer.discovery.reconcile import Damping
from balancer.discovery.records import Record, Snapshot
from balancer.discovery.runner import FRESH, STALE, STARTING, PoolDiscovery
from balancer.pool import Pool

ETCD = DiscoveryConfig(etcd=EtcdDiscoveryConfig((Address("127.0.0.1", 2379),), "/p/"))


class Source:
    kind = "etcd"

    async def run(self, publish, unavailable):  # type: ignore[no-untyped-def]
        raise AssertionError("not started in these tests")


class InMemory:
    """The daemon's backend calls, minus health checks and the drain wait."""

    def __init__(self, pool: Pool) -> None:
        self.pools = {pool.name: pool}
        self.calls: list[tuple[str, str]] = []

    def add_backend(self, pool_name, name, address, weight=1, *, source="api") -> Backend:  # type: ignore[no-untyped-def]
        host, port = address.rsplit(":", 1)
        b = Backend(name, host, int(port), weight, source=source)
        self.pools[pool_name].add_backend(b)
        self.calls.append(("add", name))
        return b

    def update_backend(self, pool_name, name, *, state=None, weight=None) -> Backend:  # type: ignore[no-untyped-def]
        pool = self.pools[pool_name]
        b = pool.find(name)
        assert b is not None
        if weight is not None:
            pool.set_weight(b, weight)
        if state is not None:
            pool.set_admin_state(b, BackendState(state))
        self.calls.append(("update", name))
        return b

    def remove_backend(self, pool_name, name, *, drain=True) -> Backend:  # type: ignore[no-untyped-def]
        pool = self.pools[pool_name]
        b = pool.find(name)
        assert b is not None
        if drain:
            pool.set_admin_state(b, BackendState.DRAINING)
        else:
            pool.remove_backend(b)
        self.calls.append(("drain" if drain else "remove", name))
        return b


def setup(listed: tuple[str, ...] = ("web1",)) -> tuple[PoolDiscovery, InMemory, Pool]:
    backends = tuple(
        BackendConfig(n, Address("127.0.0.1", 8000 + i)) for i, n in enumerate(listed, 1)
    )
    pool = Pool(PoolConfig("web", backends, discovery=ETCD))
    mem = InMemory(pool)
    clock = iter(range(1000, 100000))
    d = PoolDiscovery(
        "web", ETCD, mem, sources=[Source()], damping=Damping(), wall=lambda: next(clock)
    )
    return d, mem, pool


def snap(*records: tuple[str, int, int], skipped: tuple[str, ...] = ()) -> Snapshot:
    return Snapshot(
        "etcd", tuple(Record(n, Address("127.0.0.1", p), w) for n, p, w in records), skipped
    )


def serving(pool: Pool) -> dict[str, tuple[str, int, str]]:
    return {b.name: (b.source, b.weight, b.state.value) for b in pool.backends}


def test_snapshots_become_backends_beside_the_listed_ones() -> None:
    d, mem, pool = setup()
    assert d.state == STARTING
    d.publish("etcd", snap(("a", 9001, 1), ("b", 9002, 3)))
    assert serving(pool) == {
        "web1": ("config", 1, "up"),
        "a": ("etcd", 1, "up"),
        "b": ("etcd", 3, "up"),
    }
    assert d.state == FRESH
    d.publish("etcd", snap(("b", 9002, 5)))
    assert serving(pool)["a"] == ("etcd", 1, "draining")
    assert serving(pool)["b"] == ("etcd", 5, "up")
    # back while still draining: in service again, the same object
    a = pool.find("a")
    d.publish("etcd", snap(("a", 9001, 1), ("b", 9002, 5)))
    assert pool.find("a") is a and a.state is BackendState.UP


def test_a_record_never_replaces_a_listed_backend() -> None:
    d, mem, pool = setup()
    d.publish("etcd", snap(("web1", 9009, 1), ("x", 8001, 1)))
    assert serving(pool) == {"web1": ("config", 1, "up")}
    assert len(d.status()["skipped"]) == 2


def test_an_operators_drain_is_left_alone_and_api_backends_are_not_drained() -> None:
    d, mem, pool = setup()
    d.publish("etcd", snap(("a", 9001, 1)))
    mem.add_backend("web", "manual", "127.0.0.1:9500")
    mem.update_backend("web", "a", state="draining")
    mem.calls.clear()
    d.publish("etcd", snap(("a", 9001, 1)))
    assert mem.calls == []
    assert serving(pool)["manual"] == ("api", 1, "up")


def test_an_outage_keeps_the_backends_and_says_stale_until_the_next_answer() -> None:
    d, mem, pool = setup()
    d.publish("etcd", snap(("a", 9001, 1)))
    d.unavailable("etcd", "etcd unreachable: 127.0.0.1:2379: refused")
    d.unavailable("etcd", "etcd unreachable: again")
    st = d.status()
    assert st["state"] == STALE and st["sources"]["etcd"]["failures"] == 2
    assert "again" in st["sources"]["etcd"]["error"]
    first_since = st["since"]
    assert "a" in serving(pool)
    m = Metrics(FakeDaemon(d))  # type: ignore[arg-type]
    assert metric(m, "balancer_discovery_stale", pool="web", source="etcd") == 1
    assert metric(m, "balancer_discovery_failures_total", pool="web", source="etcd") == 2
    assert metric(m, "balancer_discovery_backends", pool="web", source="etcd") == 1
    d.publish("etcd", snap(("a", 9001, 1)))
    st = d.status()
    assert (
        st["state"] == FRESH and st["since"] > first_since and "error" not in st["sources"]["etcd"]
    )
    assert metric(m, "balancer_discovery_stale", pool="web", source="etcd") == 0


def test_malformed_entries_are_reported_and_the_rest_applied() -> None:
    d, mem, pool = setup()
    d.publish("etcd", snap(("a", 9001, 1), skipped=("/p/bad: not JSON",)))
    assert "a" in serving(pool)
    assert d.status()["skipped"] == ["/p/bad: not JSON"]


class FakeDaemon:
    def __init__(self, d: PoolDiscovery) -> None:
        self.pools = d.backends.pools
        self.discoveries = {"web": d}
        self.checkers: dict = {}
        self.listeners: dict = {}
        self.ha = None
        self.cluster = None
        self.reloads = self.reload_failures = 0


def metric(m: Metrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def test_the_balancers_summary_is_stale_while_any_pool_is() -> None:
    from balancer.discovery.runner import discovery_summary

    fresh = {"state": FRESH, "since": 5.0}
    stale = {"state": STALE, "since": 7.0}
    assert discovery_summary({"a": fresh})["state"] == FRESH
    both = discovery_summary({"a": fresh, "b": stale, "c": {"state": STALE, "since": 9.0}})
    assert (both["state"], both["since"]) == (STALE, 7.0) and set(both["pools"]) == {"a", "b", "c"}
    assert (
        discovery_summary({"a": fresh, "d": {"state": STARTING, "since": 1.0}})["state"] == STARTING
    )
