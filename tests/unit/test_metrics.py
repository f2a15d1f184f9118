"""Metrics fed fake exchanges and pool events: the scrape parses and the counters add up."""

from __future__ import annotations

import random
import timeit
from collections import Counter

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from balancer.admin import metrics as metrics_mod
from balancer.admin.metrics import DURATION_BOUNDS, Metrics
from balancer.backend import Backend, BackendState
from balancer.config import Address, BackendConfig, PassiveHealthConfig, PoolConfig
from balancer.pool import Pool


class FakeExchange:
    __slots__ = ("pool", "backend_name", "status", "bytes_out", "body_received", "method", "url")

    def __init__(
        self,
        pool: Pool | None,
        backend: str,
        status: int,
        bytes_out: int = 100,
        body_received: int = 0,
        url: bytes = b"/",
    ) -> None:
        self.pool = pool
        self.backend_name = backend
        self.status = status
        self.bytes_out = bytes_out
        self.body_received = body_received
        self.method = b"GET"
        self.url = url


class FakeListener:
    def __init__(self, name: str) -> None:
        self.name = name
        self.connections: set[object] = set()
        self.refused = 0
        self.rejected = 0


class FakeChecker:
    def __init__(self, results: dict[Backend, tuple[int, int]]) -> None:
        self.results = results


class FakeHa:
    role = "active"
    transitions = 3
    heartbeats_sent = 40
    heartbeats_received = 38
    heartbeats_rejected = {"bad_mac": 2, "unknown_peer": 1}

    def instance_roles(self) -> list[tuple[str, str]]:
        return [("198.18.0.100/24", "active"), ("198.18.0.101/24", "passive")]


class FakeDaemon:
    def __init__(self, pools: dict[str, Pool]) -> None:
        self.pools = pools
        self.checkers: dict[str, object] = {}
        self.listeners: dict[str, object] = {}
        self.ha: object | None = None
        self.cluster: object | None = None
        self.discoveries: dict[str, object] = {}
        self.reloads = 0
        self.reload_failures = 0


def make_pool(name: str = "web", names: tuple[str, ...] = ("a", "b"), **kw: object) -> Pool:
    backends = tuple(
        BackendConfig(n, Address("127.0.0.1", 9000 + i)) for i, n in enumerate(names, 1)
    )
    return Pool(PoolConfig(name, backends, **kw))  # type: ignore[arg-type]


def scrape(m: Metrics) -> dict[str, list]:
    """Sample name -> [(labels, value)], parsed the way Prometheus parses it."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    found = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


def test_requests_by_class_bytes_and_histograms_add_up() -> None:
    pool = make_pool()
    m = Metrics(FakeDaemon({"web": pool}))  # type: ignore[arg-type]
    rng = random.Random(7)
    sent: Counter[tuple[str, str]] = Counter()
    bytes_by_backend: Counter[str] = Counter()
    durations: list[float] = []
    n = 1000
    for _ in range(n):
        backend = rng.choice(["a", "b"])
        status = rng.choice([200, 200, 200, 204, 301, 404, 499, 502, 503, 101])
        size = rng.randrange(0, 5000)
        body = rng.randrange(0, 300)
        d = rng.choice([0.0004, 0.003, 0.04, 0.3, 2.0, 45.0]) * rng.uniform(0.5, 1.0)
        m.request_done(FakeExchange(pool, backend, status, size, body), d, False)
        sent[(backend, f"{status // 100}xx")] += 1
        bytes_by_backend[backend] += size
        durations.append(d)
    s = scrape(m)
    assert total(s, "balancer_requests_total") == n
    for (backend, cls), count in sent.items():
        assert value(s, "balancer_requests_total", backend=backend, code_class=cls) == count
    # every class is exported for every backend, even at zero
    assert len([x for x in s["balancer_requests_total"] if x[0]["backend"] == "a"]) == 5
    for backend, size in bytes_by_backend.items():
        assert value(s, "balancer_bytes_sent_total", backend=backend) == size
    # the per-pool histogram: cumulative buckets, +Inf == count == n, sum of durations
    assert value(s, "balancer_request_duration_seconds_count", pool="web") == n
    assert (
        abs(value(s, "balancer_request_duration_seconds_sum", pool="web") - sum(durations)) < 1e-6
    )
    for bound in DURATION_BOUNDS:
        le = f"{bound:g}"
        want = sum(1 for d in durations if d <= bound)
        assert value(s, "balancer_request_duration_seconds_bucket", pool="web", le=le) == want
    assert value(s, "balancer_request_duration_seconds_bucket", pool="web", le="+Inf") == n
    # by backend: the same measurement split
    assert (
        value(s, "balancer_backend_response_seconds_count", backend="a")
        + value(s, "balancer_backend_response_seconds_count", backend="b")
        == n
    )


def test_bucket_bounds_are_inclusive() -> None:
    pool = make_pool()
    m = Metrics(FakeDaemon({"web": pool}))  # type: ignore[arg-type]
    m.request_done(FakeExchange(pool, "a", 200), 0.005, False)  # exactly on a bound
    s = scrape(m)
    assert value(s, "balancer_request_duration_seconds_bucket", le="0.0025") == 0
    assert value(s, "balancer_request_duration_seconds_bucket", le="0.005") == 1


def test_requests_without_pool_or_backend_and_odd_statuses() -> None:
    pool = make_pool()
    m = Metrics(FakeDaemon({"web": pool}))  # type: ignore[arg-type]
    m.request_done(FakeExchange(None, "-", 404), 0.001, False)  # no route
    m.request_done(FakeExchange(None, "-", 431), 0.001, False)  # rejected head
    m.request_done(FakeExchange(pool, "-", 503), 0.001, False)  # no healthy backend
    m.request_done(FakeExchange(pool, "a", 799), 0.001, False)  # a backend's odd status
    s = scrape(m)
    assert value(s, "balancer_requests_total", pool="-", backend="-", code_class="4xx") == 2
    assert value(s, "balancer_requests_total", pool="web", backend="-", code_class="5xx") == 1
    assert value(s, "balancer_requests_total", pool="web", backend="a", code_class="other") == 1
    assert total(s, "balancer_requests_total") == 4
    # "-" is not a backend: no backend histogram for it, but the pool histogram counts it
    assert not [x for x in s["balancer_backend_response_seconds_count"] if x[0]["backend"] == "-"]
    assert value(s, "balancer_request_duration_seconds_count", pool="web") == 2


def test_broken_responses_failures_retries_and_recent_errors() -> None:
    pool = make_pool()
    a, b = pool.backends
    m = Metrics(FakeDaemon({"web": pool}))  # type: ignore[arg-type]
    ex = FakeExchange(pool, "a", 200, url=b"/cart")
    m.backend_failed(ex, a, "connect")
    m.retried(ex, a)
    m.backend_failed(ex, a, "connect")
    m.backend_failed(ex, b, "reset")
    m.request_done(FakeExchange(pool, "b", 200), 0.01, True)  # cut off mid-body
    m.request_done(FakeExchange(pool, "b", 502, url=b"/pay"), 0.01, False)
    s = scrape(m)
    assert value(s, "balancer_backend_failures_total", backend="a", kind="connect") == 2
    assert value(s, "balancer_backend_failures_total", backend="b", kind="reset") == 1
    assert value(s, "balancer_retries_total", pool="web") == 1
    assert value(s, "balancer_responses_broken_total", backend="b") == 1
    assert value(s, "balancer_responses_broken_total", backend="a") == 0
    recent = m.recent_errors()
    assert [e["kind"] for e in recent] == [
        "error response",
        "broken response",
        "backend reset",
        "backend connect",
        "backend connect",
    ]
    assert recent[0]["detail"] == "502 GET /pay" and recent[0]["backend"] == "b"
    assert recent[2]["detail"] == "GET /cart"


def test_pool_events_count_flips_ejections_and_panics() -> None:
    m = Metrics(FakeDaemon({}))  # type: ignore[arg-type]
    pool = Pool(
        PoolConfig(
            "web",
            tuple(BackendConfig(n, Address("127.0.0.1", 9000 + i)) for i, n in enumerate("abcd")),
            panic_threshold=50,
            passive_health=PassiveHealthConfig(max_ejected_percent=100),
        ),
        events=m.pool_events(),
    )
    m.daemon.pools["web"] = pool  # type: ignore[attr-defined]
    a, b, c, d = pool.backends
    pool.set_healthy(a, False, "3 consecutive failures: connection refused")
    pool.set_healthy(a, True)
    pool.set_healthy(a, False, "timed out")
    pool.eject(b, 10.0)
    pool.set_healthy(c, False, "refused")  # 1 of 4 healthy: panic
    s = scrape(m)
    assert value(s, "balancer_health_transitions_total", backend="a", to="down") == 2
    assert value(s, "balancer_health_transitions_total", backend="a", to="up") == 1
    assert value(s, "balancer_ejections_total", backend="b") == 1
    assert value(s, "balancer_panics_total", pool="web") == 1
    assert value(s, "balancer_pool_panic", pool="web") == 1
    kinds = [e["kind"] for e in m.recent_errors()]
    assert kinds.count("health down") == 3 and "ejected" in kinds and "panic" in kinds


def test_backend_gauges_follow_live_state() -> None:
    pool = make_pool(names=("a", "b", "c", "d"))
    a, b, c, d = pool.backends
    a.inflight = 3
    a.report_load(0.25)
    pool.set_weight(b, 7)
    pool.set_admin_state(b, BackendState.DRAINING)
    pool.set_admin_state(c, BackendState.DISABLED)
    pool.set_healthy(d, False)
    m = Metrics(FakeDaemon({"web": pool}))  # type: ignore[arg-type]
    s = scrape(m)
    assert value(s, "balancer_backend_inflight", backend="a") == 3
    assert value(s, "balancer_backend_reported_load", backend="a") == 0.25
    # no report, no sample (rather than a made-up 0)
    assert len(s["balancer_backend_reported_load"]) == 1
    assert value(s, "balancer_backend_weight", backend="b") == 7
    ups = {lab["backend"]: v for lab, v in s["balancer_backend_up"]}
    assert ups == {"a": 1, "b": 0, "c": 0, "d": 0}
    for name, state in (("a", "up"), ("b", "draining"), ("c", "disabled"), ("d", "down")):
        states = {
            lab["state"]: v for lab, v in s["balancer_backend_state"] if lab["backend"] == name
        }
        assert states == {st: (1 if st == state else 0) for st in states}, name
        assert len(states) == 4
    # backends without traffic yet have their request series, at zero
    assert value(s, "balancer_requests_total", backend="c", code_class="2xx") == 0
    assert value(s, "balancer_queue_depth", pool="web") == 0


def test_counters_on_replaced_objects_stay_monotonic() -> None:
    """A reload replaces pools, listeners and health checkers (whose own counters restart
    at zero): the exported totals keep growing."""
    old = make_pool()
    daemon = FakeDaemon({"web": old})
    lst = FakeListener("http")
    daemon.listeners["http"] = lst
    checker = FakeChecker({old.backends[0]: (5, 1)})
    daemon.checkers["web"] = checker
    m = Metrics(daemon)  # type: ignore[arg-type]
    old.sticky_hits, old.sticky_misses, old.queue_timeouts = 10, 2, 1
    lst.refused, lst.rejected = 4, 3
    s = scrape(m)
    assert value(s, "balancer_sticky_total", result="hit") == 10
    assert value(s, "balancer_sticky_total", result="repin") == 0
    assert value(s, "balancer_queue_timeouts_total", pool="web") == 1
    assert value(s, "balancer_connections_refused_total", listener="http") == 4
    assert value(s, "balancer_requests_rejected_total", listener="http") == 3
    assert value(s, "balancer_health_checks_total", backend="a", result="pass") == 5
    # counting goes on after the scrape, then the reload swaps everything
    old.sticky_hits = 12
    checker.results[old.backends[0]] = (6, 1)
    new = make_pool()
    new.sticky_hits = 1
    daemon.pools = {"web": new}
    daemon.checkers = {"web": FakeChecker({new.backends[0]: (1, 2)})}
    lst2 = FakeListener("http")
    lst2.refused = 1
    daemon.listeners = {"http": lst2}
    s = scrape(m)
    assert value(s, "balancer_sticky_total", result="hit") == 10 + 2 + 1
    assert value(s, "balancer_connections_refused_total", listener="http") == 5
    assert value(s, "balancer_health_checks_total", backend="a", result="pass") == 6 + 1
    assert value(s, "balancer_health_checks_total", backend="a", result="fail") == 1 + 2
    # the replaced objects were read a last time and are no longer held
    assert old not in m.pool_totals._last and lst not in m.listener_totals._last
    s = scrape(m)
    assert value(s, "balancer_sticky_total", result="hit") == 13


def test_ha_reloads_build_info_and_process_metrics() -> None:
    daemon = FakeDaemon({})
    m = Metrics(daemon)  # type: ignore[arg-type]
    s = scrape(m)
    assert value(s, "balancer_ha_role", role="standalone") == 1
    assert value(s, "balancer_ha_role", role="active") == 0
    assert value(s, "balancer_ha_transitions_total") == 0
    daemon.ha = FakeHa()
    daemon.reloads, daemon.reload_failures = 4, 1
    s = scrape(m)
    assert value(s, "balancer_ha_role", role="active") == 1
    assert value(s, "balancer_ha_role", role="standalone") == 0
    assert value(s, "balancer_ha_transitions_total") == 3
    assert value(s, "balancer_ha_heartbeats_total", direction="sent") == 40
    assert value(s, "balancer_ha_heartbeats_total", direction="received", result="ok") == 38
    assert value(s, "balancer_ha_heartbeats_total", result="bad_mac") == 2
    for vip, role, n in (
        ("198.18.0.100/24", "active", 1),
        ("198.18.0.100/24", "passive", 0),
        ("198.18.0.101/24", "active", 0),
        ("198.18.0.101/24", "passive", 1),
    ):
        assert value(s, "balancer_ha_instance_role", virtual_ip=vip, role=role) == n
    assert value(s, "balancer_config_reloads_total", result="success") == 4
    assert value(s, "balancer_config_reloads_total", result="failure") == 1
    assert value(s, "balancer_build_info", version=__import__("balancer").__version__) == 1
    assert "process_cpu_seconds_total" in s and "python_info" in s


def test_uses_a_private_registry() -> None:
    pool = make_pool()
    m = Metrics(FakeDaemon({"web": pool}))  # type: ignore[arg-type]
    m.request_done(FakeExchange(pool, "a", 200), 0.01, False)
    assert b"balancer_requests_total" not in prometheus_client.generate_latest()
    assert b"balancer_requests_total" in m.render()


def test_rows_of_removed_backends_are_dropped_once_stale() -> None:
    pool = make_pool()
    daemon = FakeDaemon({"web": pool})
    m = Metrics(daemon)  # type: ignore[arg-type]
    m.request_done(FakeExchange(pool, "b", 200), 0.01, False)
    pool.remove_backend(pool.backends[1])
    list(m.collect())
    assert "b" in m.stats["web"]  # still scraped for a while after removal
    m._drop_stale_rows(daemon.pools, 1e12)
    assert "b" not in m.stats["web"] and "a" in m.stats["web"]


def test_worker_reports_drop_stale_rows_of_removed_backends(monkeypatch) -> None:
    # a worker's report is added to the owner's scrape: if the worker kept its rows of a
    # removed backend, they would come back in every scrape however long ago it went
    pool = make_pool()
    m = Metrics(FakeDaemon({"web": pool}))  # type: ignore[arg-type]
    ex = FakeExchange(pool, "b", 502)
    m.request_done(ex, 0.01, False)
    m.backend_failed(ex, pool.backends[1], "connect")  # type: ignore[arg-type]
    m.request_done(FakeExchange(pool, "a", 200), 0.01, False)
    pool.remove_backend(pool.backends[1])
    report = m.report()
    assert "b" in report["requests"]["web"] and report["failures"]["web"]["b"] == {"connect": 1}
    monkeypatch.setattr(metrics_mod, "STALE_ROW_SECONDS", -1.0)
    report = m.report()
    assert "b" not in report["requests"]["web"] and "a" in report["requests"]["web"]
    assert report["failures"] == {}


def test_request_done_is_cheap() -> None:
    pool = make_pool()
    m = Metrics(FakeDaemon({"web": pool}))  # type: ignore[arg-type]
    ex = FakeExchange(pool, "a", 200, 1234)
    n = 20000
    per_call = min(timeit.repeat(lambda: m.request_done(ex, 0.004, False), number=n, repeat=3)) / n
    # about 0.5 µs on a 2-core CI box; the bound only catches an accidental slow path
    # (formatting, allocation per request, a scan over backends) on a loaded machine
    assert per_call < 10e-6, f"{per_call * 1e6:.2f} µs per request_done"
    assert value(scrape(m), "balancer_requests_total", backend="a", code_class="2xx") == 3 * n


def test_duration_buckets_match_exported_le() -> None:
    assert metrics_mod._LE[-1] == "+Inf" and len(metrics_mod._LE) == len(DURATION_BOUNDS) + 1
    assert list(DURATION_BOUNDS) == sorted(DURATION_BOUNDS)


def test_grafana_dashboard_uses_only_exported_metric_names() -> None:
    import json
    import re
    from pathlib import Path

    pool = make_pool()
    daemon = FakeDaemon({"web": pool})
    daemon.ha = FakeHa()
    m = Metrics(daemon)  # type: ignore[arg-type]
    exported: set[str] = set()
    for family in m.registry.collect():
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_count", "_sum"),
        }.get(family.type, ("",))
        exported.update(family.name + s for s in suffixes)
    path = Path(__file__).resolve().parents[2] / "config" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"\b((?:balancer|process)_[a-z_]+)\b", e)}
    assert used, exprs
    assert used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "error rate", "p50", "p99", "in-flight", "backend up", "ha role"):
        assert topic in titles, topic
