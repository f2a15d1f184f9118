"""Discovery policy without sockets: merging sources, planning changes, flap damping."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config.schema import Address
from balancer.discovery.reconcile import Current, Damping, Listed, Wanted, merge, plan
from balancer.discovery.records import Record, Snapshot


def rec(name: str, port: int, weight: int = 1) -> Record:
    return Record(name, Address("127.0.0.1", port), weight)


def wanted(*records: Record, source: str = "etcd") -> list[Wanted]:
    return [Wanted(r, source) for r in records]


def cur(name: str, port: int, weight: int = 1, draining: bool = False) -> Current:
    return Current(name, Address("127.0.0.1", port), weight, draining)


def test_new_records_are_added_and_vanished_ones_drained():
    p = plan(wanted(rec("a", 1), rec("b", 2)), {"c": cur("c", 3)}, Listed(), Damping(), 0.0)
    assert [w.name for w in p.add] == ["a", "b"]
    assert p.drain == ("c",)
    assert not p.remove and not p.restore and not p.reweight


def test_unchanged_records_plan_nothing():
    p = plan(wanted(rec("a", 1, 3)), {"a": cur("a", 1, 3)}, Listed(), Damping(), 0.0)
    assert p.empty


def test_a_weight_change_reweights_in_place():
    p = plan(wanted(rec("a", 1, 5)), {"a": cur("a", 1, 1)}, Listed(), Damping(), 0.0)
    assert [(w.name, w.record.weight) for w in p.reweight] == [("a", 5)]
    assert not p.add and not p.drain


def test_a_record_back_while_draining_is_restored_not_added():
    p = plan(wanted(rec("a", 1)), {"a": cur("a", 1, draining=True)}, Listed(), Damping(), 0.0)
    assert [w.name for w in p.restore] == ["a"]
    assert not p.add


def test_draining_backends_are_not_drained_again():
    p = plan([], {"a": cur("a", 1, draining=True)}, Listed(), Damping(), 0.0)
    assert p.empty


def test_same_name_at_a_new_address_replaces_the_server():
    p = plan(wanted(rec("a", 9)), {"a": cur("a", 1)}, Listed(), Damping(), 0.0)
    assert p.remove == ("a",)
    assert [w.record.address.port for w in p.add] == [9]
    assert not p.drain


def test_records_colliding_with_listed_backends_are_skipped():
    listed = Listed(names=frozenset({"web1"}), addresses=frozenset({Address("127.0.0.1", 2)}))
    p = plan(wanted(rec("web1", 1), rec("x", 2), rec("ok", 3)), {}, listed, Damping(), 0.0)
    assert [w.name for w in p.add] == ["ok"]
    assert len(p.skipped) == 2
    assert "web1" in p.skipped[0] and "127.0.0.1:2" in p.skipped[1]


def test_merge_lets_the_first_source_keep_a_name_or_address():
    snaps = {
        "dns": Snapshot("dns", (rec("a", 1), rec("d", 7), rec("e", 8))),
        "etcd": Snapshot("etcd", (rec("a", 5), rec("b", 7))),
    }
    got, skipped = merge(snaps)
    assert [(w.source, w.name) for w in got] == [("etcd", "a"), ("etcd", "b"), ("dns", "e")]
    assert len(skipped) == 2


def test_one_or_two_departures_are_not_damped():
    d = Damping(half_life=30, suppress=3, reuse=1.5)
    current: dict[str, Current] = {"a": cur("a", 1)}
    for t in (0.0, 1.0):
        plan([], current, Listed(), d, t)  # key deleted
        p = plan(wanted(rec("a", 1)), {}, Listed(), d, t + 0.5)  # and back
        assert [w.name for w in p.add] == ["a"]


def test_a_flapping_registration_is_held_until_its_penalty_decays():
    d = Damping(half_life=10, suppress=2.5, reuse=1.5)
    t = 0.0
    for _ in range(3):
        plan([], {"a": cur("a", 1)}, Listed(), d, t)
        t += 0.1
    p = plan(wanted(rec("a", 1)), {}, Listed(), d, t)
    assert p.held == ("a",) and not p.add
    # penalty ~2.97 decays to 1.5 in one half-life: the plan says when to look again
    assert p.wake_at is not None and 9.0 < p.wake_at - t < 11.0
    assert plan(wanted(rec("a", 1)), {}, Listed(), d, p.wake_at - 1.0).held == ("a",)
    again = plan(wanted(rec("a", 1)), {}, Listed(), d, p.wake_at + 0.01)
    assert [w.name for w in again.add] == ["a"] and not again.held


def test_a_held_backend_still_in_the_pool_is_drained():
    d = Damping(half_life=10, suppress=1, reuse=0.5)
    plan([], {"a": cur("a", 1)}, Listed(), d, 0.0)
    p = plan(wanted(rec("a", 1)), {"b": cur("b", 2)}, Listed(), d, 0.1)
    assert p.held == ("a",) and p.drain == ("b",)


names = st.sampled_from(["a", "b", "c", "d", "e"])
records = st.builds(rec, names, st.integers(1, 4), st.integers(1, 3))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(records, max_size=5), min_size=1, max_size=8))
def test_applying_plans_converges_on_the_wanted_set(rounds):
    """Whatever sequence of snapshots arrives, applying each plan leaves the pool's
    in-service discovered backends exactly the wanted ones (damping off)."""
    d = Damping(suppress=float("inf"))
    pool: dict[str, Current] = {}
    for t, recs in enumerate(rounds):
        snap = Snapshot("etcd", tuple({r.name: r for r in recs}.values()))
        want, _ = merge({"etcd": snap})
        p = plan(want, pool, Listed(), d, float(t))
        for name in p.remove:
            del pool[name]
        for w in (*p.add, *p.restore, *p.reweight):
            pool[w.name] = Current(w.name, w.record.address, w.record.weight)
        for name in p.drain:
            pool[name] = Current(name, pool[name].address, pool[name].weight, draining=True)
        serving = {n: (c.address, c.weight) for n, c in pool.items() if not c.draining}
        assert serving == {w.name: (w.record.address, w.record.weight) for w in want}
        assert plan(want, pool, Listed(), d, float(t)).empty
