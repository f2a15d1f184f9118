"""Tests of the balancing strategies and their registry, with a fake request context."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from balancer import strategies
from balancer.backend import Backend
from balancer.strategies import Strategy, StrategyOptions
from balancer.strategies.consistent_hash import ConsistentHash
from balancer.strategies.least_connections import LeastConnections
from balancer.strategies.least_load import REQUEST_LOAD_FLOOR, LeastLoad
from balancer.strategies.random_two import RandomTwo
from balancer.strategies.round_robin import RoundRobin
from balancer.strategies.weighted_round_robin import WeightedRoundRobin

# the strategy names INTERFACE.md documents for `pools.*.strategy`
DOCUMENTED = [
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "least_load",
    "random_two",
    "consistent_hash",
]
ALL_CLASSES = [
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    LeastLoad,
    RandomTwo,
    ConsistentHash,
]


class Ctx:
    """A request as a strategy sees it."""

    def __init__(
        self,
        path: str = "/",
        client_ip: str = "192.0.2.1",
        headers: dict[str, str] | None = None,
        cookies: dict[str, str] | None = None,
    ) -> None:
        self._path = path
        self.client_ip = client_ip
        self._headers = {k.lower(): v for k, v in (headers or {}).items()}
        self._cookies = cookies or {}

    @property
    def path(self) -> str:
        return self._path

    def header(self, name: str) -> str | None:
        return self._headers.get(name.lower())

    def cookie(self, name: str) -> str | None:
        return self._cookies.get(name)


CTX = Ctx()


def make(n: int, weights: list[int] | None = None, base: int = 1) -> list[Backend]:
    ws = weights or [1] * n
    return [Backend(f"app{i}", f"10.0.0.{base + i}", 8000 + i, ws[i]) for i in range(n)]


def picks(strategy: Strategy, count: int, ctx: Ctx = CTX, exclude=()) -> list[str]:
    out = []
    for _ in range(count):
        b = strategy.select(ctx, exclude)
        assert b is not None
        out.append(b.name)
    return out


def options(**kw) -> StrategyOptions:
    return StrategyOptions(rng=random.Random(7), **kw)


# ---------------------------------------------------------------------------------------------
# round_robin
# ---------------------------------------------------------------------------------------------


def test_round_robin_shares_evenly():
    counts = Counter(picks(RoundRobin(make(3)), 300))
    assert set(counts) == {"app0", "app1", "app2"}
    for c in counts.values():
        assert abs(c / 300 - 1 / 3) <= 0.05


def test_round_robin_takes_turns_and_skips_excluded():
    bs = make(3)
    rr = RoundRobin(bs)
    assert picks(rr, 4) == ["app0", "app1", "app2", "app0"]
    assert picks(rr, 4, exclude={bs[2]}) == ["app1", "app0", "app1", "app0"]


# ---------------------------------------------------------------------------------------------
# weighted_round_robin
# ---------------------------------------------------------------------------------------------


def test_weighted_3_to_1():
    counts = Counter(picks(WeightedRoundRobin(make(2, [3, 1])), 400))
    assert abs(counts["app0"] / 400 - 0.75) <= 0.05
    assert abs(counts["app1"] / 400 - 0.25) <= 0.05


def test_weighted_5_1_1_is_smooth_and_exact():
    seq = picks(WeightedRoundRobin(make(3, [5, 1, 1])), 700)
    assert Counter(seq) == {"app0": 500, "app1": 100, "app2": 100}
    run = longest = 0
    for name in seq:
        run = run + 1 if name == "app0" else 0
        longest = max(longest, run)
    assert longest < 5
    # nginx's documented order for 5:1:1
    assert seq[:7] == ["app0", "app0", "app1", "app0", "app2", "app0", "app0"]


def test_weighted_uses_effective_weights_not_configured_ones():
    bs = make(2, [1, 1])
    # slow start: the second is ramping at a quarter of its weight
    counts = Counter(picks(WeightedRoundRobin(bs, weights=[1.0, 0.25]), 1000))
    assert counts == {"app0": 800, "app1": 200}


def test_weighted_skip_keeps_distribution_and_no_catch_up_burst():
    bs = make(3, [2, 1, 1])
    wrr = WeightedRoundRobin(bs)
    # while app0 is excluded the others still share 1:1
    counts = Counter(picks(wrr, 100, exclude={bs[0]}))
    assert counts == {"app1": 50, "app2": 50}
    # back: app0 is not owed the picks it missed
    seq = picks(wrr, 8)
    assert Counter(seq) == {"app0": 4, "app1": 2, "app2": 2}
    assert "app0app0app0" not in "".join(seq)


def test_weighted_full_backend_is_skipped():
    bs = make(2, [5, 1])
    bs[0].max_connections = 1
    bs[0].begin()
    assert picks(WeightedRoundRobin(bs), 5) == ["app1"] * 5


# ---------------------------------------------------------------------------------------------
# least_connections
# ---------------------------------------------------------------------------------------------


def test_least_connections_picks_fewest_inflight():
    bs = make(3)
    for _ in range(3):
        bs[0].begin()
    bs[1].begin()
    for _ in range(2):
        bs[2].begin()
    assert LeastConnections(bs).select(CTX) is bs[1]


def test_least_connections_relative_to_weight():
    bs = make(2, [2, 1])
    for _ in range(3):
        bs[0].begin()  # 3/2 = 1.5
    bs[1].begin()  # 1/1 = 1
    assert LeastConnections(bs).select(CTX) is bs[1]
    bs[0].end()  # 2/2 = 1 ties with 1/1; one more on each:
    bs[0].begin()
    bs[0].end()
    bs[0].end()  # 1/2 = 0.5 < 1
    assert LeastConnections(bs).select(CTX) is bs[0]


def test_least_connections_ties_rotate():
    # requests that finish before the next arrives: every backend is at 0, all tie
    counts = Counter(picks(LeastConnections(make(3)), 300))
    assert counts == {"app0": 100, "app1": 100, "app2": 100}


def test_least_connections_ties_follow_weights_at_low_concurrency():
    counts = Counter(picks(LeastConnections(make(2, [3, 1])), 400))
    assert counts == {"app0": 300, "app1": 100}


def test_least_connections_concurrency_follows_weights():
    bs = make(2, [3, 1])
    lc = LeastConnections(bs)
    for _ in range(400):
        lc.select(CTX).begin()  # nothing finishes: in-flight counts build up
    assert (bs[0].inflight, bs[1].inflight) == (300, 100)


# ---------------------------------------------------------------------------------------------
# least_load
# ---------------------------------------------------------------------------------------------


def test_least_load_prefers_low_reported_load():
    bs = make(3)
    for b, load in zip(bs, [0.7, 0.2, 0.9], strict=True):
        b.report_load(load)
    assert LeastLoad(bs).select(CTX) is bs[1]


def test_least_load_divides_by_weight():
    bs = make(2, [4, 1])
    bs[0].report_load(0.6)  # 0.15 per unit of weight
    bs[1].report_load(0.3)
    assert LeastLoad(bs).select(CTX) is bs[0]


def test_least_load_burst_spreads_but_favours_the_idle_looking_backend():
    bs = make(3)
    bs[0].report_load(0.0)
    bs[1].report_load(0.5)
    bs[2].report_load(0.5)
    ll = LeastLoad(bs)
    counts = Counter()
    for _ in range(100):  # a burst between two health checks: all still in flight
        b = ll.select(CTX)
        b.begin()
        counts[b.name] += 1
    # each request costs the floor (0.05): app0 takes 10 alone, then shares the rest
    assert counts == Counter({"app0": 40, "app1": 30, "app2": 30})


def test_least_load_short_requests_do_not_pile_up_a_correction():
    a, b = make(2)
    a.report_load(0.1)
    b.report_load(0.3)
    ll = LeastLoad([a, b])
    for _ in range(50):  # a sequential stream: each request finishes before the next
        chosen = ll.select(CTX)
        assert chosen is a
        chosen.begin()
        chosen.end()


def test_least_load_correction_uses_load_per_request_at_report():
    a, b = make(2)
    # a: 0.4 with 4 of ours in flight (0.1 each); b: 0.3 with none of ours (floor 0.05 each)
    for _ in range(4):
        a.begin()
    a.report_load(0.4)
    b.report_load(0.3)
    ll = LeastLoad([a, b])
    assert ll.select(CTX) is b
    for _ in range(3):
        b.begin()  # b is now estimated at 0.3 + 3 x 0.05 = 0.45
    assert ll.select(CTX) is a
    a.begin()  # a at 0.4 + 0.1 = 0.5
    assert ll.select(CTX) is b
    # a new report restarts the correction
    b.report_load(0.1)
    assert ll.select(CTX) is b


def test_least_load_floor_for_a_backend_reporting_zero():
    a, b = make(2)
    a.report_load(0.0)
    b.report_load(REQUEST_LOAD_FLOOR * 2.5)
    ll = LeastLoad([a, b])
    seq = []
    for _ in range(4):
        chosen = ll.select(CTX)
        chosen.begin()
        seq.append(chosen.name)
    # a costs the floor per request: after 3 it is above b's 2.5 floors
    assert seq == ["app0", "app0", "app0", "app1"]


def test_least_load_unreported_backend_counts_inflight():
    a, b = make(2)
    a.report_load(0.5)  # the same as 10 in-flight requests of a silent backend
    ll = LeastLoad([a, b])
    for _ in range(9):
        b.begin()
    assert ll.select(CTX) is b
    b.begin()
    b.begin()
    assert ll.select(CTX) is a


def test_least_load_ties_rotate():
    counts = Counter(picks(LeastLoad(make(3)), 300))  # nobody reports, nothing in flight
    assert counts == {"app0": 100, "app1": 100, "app2": 100}


# ---------------------------------------------------------------------------------------------
# random_two
# ---------------------------------------------------------------------------------------------


def test_random_two_avoids_the_loaded_backend():
    bs = make(4)
    for _ in range(10):
        bs[0].begin()
    counts = Counter(picks(RandomTwo(bs, options()), 2000))
    # two distinct candidates: app0 always meets an idle one and loses
    assert "app0" not in counts
    for name in ("app1", "app2", "app3"):
        assert abs(counts[name] / 2000 - 1 / 3) <= 0.05


def test_random_two_favours_less_loaded_in_a_build_up():
    bs = make(5)
    r2 = RandomTwo(bs, options())
    for _ in range(500):
        r2.select(CTX).begin()
    inflight = [b.inflight for b in bs]
    # plain random would spread around 100 +- 20; two choices keeps them within a few
    assert max(inflight) - min(inflight) <= 4


def test_random_two_is_reproducible_with_a_seed():
    first = picks(RandomTwo(make(5), StrategyOptions(rng=random.Random(42))), 200)
    second = picks(RandomTwo(make(5), StrategyOptions(rng=random.Random(42))), 200)
    third = picks(RandomTwo(make(5), StrategyOptions(rng=random.Random(43))), 200)
    assert first == second
    assert first != third


def test_random_two_samples_by_weight():
    counts = Counter(picks(RandomTwo(make(2, [3, 1]), options()), 4000))
    assert abs(counts["app0"] / 4000 - 0.75) <= 0.05


def test_random_two_scans_when_candidates_are_unusable():
    bs = make(6)
    r2 = RandomTwo(bs, options())
    assert set(picks(r2, 50, exclude=set(bs[1:]))) == {"app0"}
    bs[3].begin()
    # two usable left, app3 busier: the scan finds app2
    assert set(picks(r2, 50, exclude={bs[0], bs[1], bs[4], bs[5]})) == {"app2"}


# ---------------------------------------------------------------------------------------------
# consistent_hash
# ---------------------------------------------------------------------------------------------

KEYS = [f"user-{i}" for i in range(10_000)]


def user(key: str) -> Ctx:
    return Ctx(headers={"X-User": key})


def mapping(backends: list[Backend], weights=None) -> dict[str, str]:
    ch = ConsistentHash(backends, StrategyOptions(hash_key="header:X-User"), weights)
    return {k: ch.select(user(k)).address for k in KEYS}


def test_consistent_hash_same_key_same_backend():
    ch = ConsistentHash(make(5), StrategyOptions(hash_key="header:X-User"))
    for k in KEYS[:200]:
        first = ch.select(user(k))
        assert all(ch.select(user(k)) is first for _ in range(3))


def test_consistent_hash_independent_rings_agree():
    bs = make(5)
    # different objects, a different order, as a second balancer process would have
    other = list(reversed(make(5)))
    assert mapping(bs) == mapping(other)


def test_consistent_hash_stable_across_processes():
    # the ring must not use Python's per-process salted hash()
    code = textwrap.dedent(
        """
        from balancer.backend import Backend
        from balancer.strategies import StrategyOptions
        from balancer.strategies.consistent_hash import ConsistentHash
        bs = [Backend(f"app{i}", f"10.0.0.{1 + i}", 8000 + i) for i in range(5)]
        ch = ConsistentHash(bs, StrategyOptions(hash_key="client_ip"))
        class C:
            def __init__(self, ip): self.client_ip = ip
        print(",".join(ch.select(C(f"198.51.100.{i}")).address for i in range(200)))
        """
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(out.stdout)
    ch = ConsistentHash(make(5), StrategyOptions(hash_key="client_ip"))
    here = ",".join(ch.select(Ctx(client_ip=f"198.51.100.{i}")).address for i in range(200))
    assert outputs == {here + "\n"}


@pytest.mark.parametrize("n", [5, 10])
def test_consistent_hash_removing_one_moves_only_its_keys(n):
    bs = make(n)
    before = mapping(bs)
    removed = bs[n // 2]
    after = mapping([b for b in bs if b is not removed])
    moved = [k for k in KEYS if before[k] != after[k]]
    assert len(moved) <= 1.5 / n * len(KEYS)
    assert all(before[k] == removed.address for k in moved)
    # and every key the removed backend had did move
    assert len(moved) == sum(1 for k in KEYS if before[k] == removed.address)


@pytest.mark.parametrize("n", [5, 10])
def test_consistent_hash_adding_one_moves_about_its_share(n):
    bs = make(n)
    before = mapping(bs)
    added = make(1, base=200)[0]
    after = mapping([*bs, added])
    moved = [k for k in KEYS if before[k] != after[k]]
    assert 0.5 / (n + 1) * len(KEYS) <= len(moved) <= 1.5 / (n + 1) * len(KEYS)
    assert all(after[k] == added.address for k in moved)


def test_consistent_hash_weights_2_to_1():
    bs = make(2, [2, 1])
    counts = Counter(mapping(bs).values())
    assert abs(counts[bs[0].address] / len(KEYS) - 2 / 3) <= 0.05


def test_consistent_hash_slow_start_only_adds_keys_to_the_ramping_backend():
    bs = make(4)
    ramping = mapping(bs, weights=[1.0, 1.0, 1.0, 0.1])
    full = mapping(bs)
    for k in KEYS:
        if ramping[k] != full[k]:
            assert full[k] == bs[3].address
    share = sum(1 for v in ramping.values() if v == bs[3].address) / len(KEYS)
    assert share < 0.1


def test_consistent_hash_exclude_walks_to_the_same_backend_as_removal():
    bs = make(5)
    ch = ConsistentHash(bs, StrategyOptions(hash_key="header:X-User"))
    without = mapping(bs[1:])
    for k in KEYS[:2000]:
        assert ch.select(user(k), {bs[0]}).address == without[k]


def test_consistent_hash_full_backend_walks_on():
    bs = make(3)
    ch = ConsistentHash(bs, StrategyOptions(hash_key="path"))
    owner = ch.select(Ctx(path="/a"))
    owner.max_connections = 1
    owner.begin()
    other = ch.select(Ctx(path="/a"))
    assert other is not None and other is not owner


def test_consistent_hash_no_key_falls_back_to_round_robin():
    bs = make(3)
    ch = ConsistentHash(bs, StrategyOptions(hash_key="cookie:session"))
    assert Counter(picks(ch, 300)) == {"app0": 100, "app1": 100, "app2": 100}
    assert set(picks(ch, 10, exclude={bs[1]})) == {"app0", "app2"}
    keyed = Ctx(cookies={"session": "abc"})
    assert len({ch.select(keyed).name for _ in range(20)}) == 1


@pytest.mark.parametrize(
    ("hash_key", "a", "b"),
    [
        ("header:X-User", Ctx(headers={"x-user": "u1"}), Ctx(headers={"X-User": "u1"}, path="/z")),
        ("cookie:sid", Ctx(cookies={"sid": "s"}), Ctx(cookies={"sid": "s"}, client_ip="1.2.3.4")),
        ("path", Ctx(path="/p/1"), Ctx(path="/p/1", client_ip="203.0.113.9")),
        ("client_ip", Ctx(client_ip="203.0.113.5"), Ctx(client_ip="203.0.113.5", path="/x")),
    ],
)
def test_consistent_hash_key_sources(hash_key, a, b):
    ch = ConsistentHash(make(10), StrategyOptions(hash_key=hash_key))
    assert ch.select(a) is ch.select(b)


def test_consistent_hash_key_spreads_over_backends():
    ch = ConsistentHash(make(4), StrategyOptions(hash_key="path"))
    counts = Counter(ch.select(Ctx(path=f"/item/{i}")).name for i in range(4000))
    assert len(counts) == 4
    assert all(abs(c / 4000 - 0.25) <= 0.05 for c in counts.values())


def test_consistent_hash_rejects_a_bad_hash_key():
    with pytest.raises(ValueError, match="hash_key"):
        ConsistentHash(make(2), StrategyOptions(hash_key="query:x"))
    with pytest.raises(ValueError, match="hash_key"):
        ConsistentHash(make(2), StrategyOptions(hash_key="header:"))


def test_consistent_hash_large_weights_keep_the_ring_bounded():
    bs = make(10, [256] * 10)
    ch = ConsistentHash(bs, StrategyOptions(hash_key="path"))
    assert len(ch._positions) <= 40960
    counts = Counter(ch.select(Ctx(path=f"/{i}")).name for i in range(5000))
    assert len(counts) == 10


# ---------------------------------------------------------------------------------------------
# every strategy
# ---------------------------------------------------------------------------------------------


def build(cls: type[Strategy], backends, weights=None) -> Strategy:
    return cls(backends, options(hash_key="path"), weights)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_exclude_is_respected(cls):
    bs = make(4)
    s = build(cls, bs)
    for i in range(200):
        b = s.select(Ctx(path=f"/{i}"), {bs[0], bs[2]})
        assert b in (bs[1], bs[3])


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_full_is_respected(cls):
    bs = make(4)
    for b in (bs[1], bs[2]):
        b.max_connections = 2
        b.begin()
        b.begin()
    s = build(cls, bs)
    for i in range(200):
        assert s.select(Ctx(path=f"/{i}")) in (bs[0], bs[3])


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_none_when_nothing_is_usable(cls):
    bs = make(3)
    s = build(cls, bs)
    assert s.select(CTX, set(bs)) is None
    assert s.select(CTX, tuple(bs)) is None
    for b in bs:
        b.max_connections = 1
        b.begin()
    assert s.select(CTX) is None
    assert build(cls, []).select(CTX) is None


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_single_backend(cls):
    bs = make(1)
    s = build(cls, bs)
    assert all(s.select(Ctx(path=f"/{i}")) is bs[0] for i in range(20))


@pytest.mark.parametrize("cls", [c for c in ALL_CLASSES if c is not RoundRobin])
def test_weight_zero_gets_no_new_requests(cls):
    bs = make(3, [1, 0, 1])
    s = build(cls, bs)
    assert all(s.select(Ctx(path=f"/{i}")) is not bs[1] for i in range(300))
    assert s.select(CTX, {bs[0], bs[2]}) is None


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_strategies_never_write_counters(cls):
    bs = make(3)
    for i, b in enumerate(bs):
        b.report_load(0.1 * i)
    before = [(b.inflight, b.sent_since_report, b.inflight_at_report, b.requests) for b in bs]
    s = build(cls, bs)
    for i in range(100):
        s.select(Ctx(path=f"/{i}"))
    assert before == [
        (b.inflight, b.sent_since_report, b.inflight_at_report, b.requests) for b in bs
    ]


# ---------------------------------------------------------------------------------------------
# registry and plugins
# ---------------------------------------------------------------------------------------------


def test_every_documented_name_resolves():
    names = strategies.registered_names()
    for name in DOCUMENTED:
        assert name in names
        cls = strategies.get(name)
        assert issubclass(cls, Strategy) and cls.name == name


def test_unknown_name_is_a_key_error():
    with pytest.raises(KeyError):
        strategies.get("no_such_strategy")


def _fake_distribution(tmp_path, module: str, body: str, entry: str) -> None:
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(body))
    info = tmp_path / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[balancer.strategies]\n{entry}\n")


def test_plugin_strategy_from_an_entry_point(tmp_path, monkeypatch):
    _fake_distribution(
        tmp_path,
        "myplugin",
        """
        from balancer.strategies import Strategy

        class FirstUsable(Strategy):
            name = "first_usable"

            def select(self, ctx, exclude=()):
                for b in self.backends:
                    if self.usable(b, exclude):
                        return b
                return None
        """,
        "first_usable = myplugin:FirstUsable",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "myplugin", raising=False)
    names = strategies.registered_names()
    assert "first_usable" in names
    assert names[: len(DOCUMENTED)] == sorted(DOCUMENTED)  # built-ins first
    cls = strategies.get("first_usable")
    assert cls.__name__ == "FirstUsable" and issubclass(cls, Strategy)
    bs = make(2)
    assert cls(bs).select(CTX, {bs[0]}) is bs[1]


def test_the_documented_plugin_example_works(tmp_path, monkeypatch):
    doc = (Path(__file__).parents[2] / "docs" / "strategy-plugin.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    entry = doc.split('[project.entry-points."balancer.strategies"]\n', 1)[1].split("\n", 1)[0]
    name, _, target = (part.strip().strip('"') for part in entry.partition("="))
    _fake_distribution(tmp_path, target.split(":")[0], code, f"{name} = {target}")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert name in strategies.registered_names()
    cls = strategies.get(name)
    bs = make(3, [1, 1, 2])
    for b, (requests, errors) in zip(bs, [(100, 10), (100, 1), (100, 2)], strict=True):
        b.requests, b.errors = requests, errors
    s = cls(bs)
    assert s.select(CTX) is bs[2]  # 3/102/2 beats 2/102/1
    assert s.select(CTX, {bs[2]}) is bs[1]
    assert s.select(CTX, set(bs)) is None
    even = make(2)
    s = cls(even)
    assert Counter(s.select(CTX).name for _ in range(10)) == {"app0": 5, "app1": 5}


def test_plugin_that_is_not_a_strategy_is_refused(tmp_path, monkeypatch):
    _fake_distribution(
        tmp_path, "badplugin", "NotAStrategy = 42\n", "bogus = badplugin:NotAStrategy"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "bogus" in strategies.registered_names()
    with pytest.raises(KeyError, match="not name a Strategy"):
        strategies.get("bogus")
