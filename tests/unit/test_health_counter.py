"""RiseFall: every result sequence up to length 8 against an independent reference model."""

from __future__ import annotations

import itertools

import pytest

from balancer.health.counter import RiseFall


def reference(
    rise: int, fall: int, healthy: bool, fresh: bool, results: tuple[bool, ...]
) -> list[bool | None]:
    """What observe() must return after each result, computed from the whole prefix:
    the state flips when the trailing run of equal results reaches rise/fall (or, with no
    history, on the first result that disagrees with the state)."""
    out: list[bool | None] = []
    state = healthy
    for i, ok in enumerate(results):
        run = 0
        for previous in reversed(results[: i + 1]):
            if previous != ok:
                break
            run += 1
        needed = rise if ok else fall
        if ok != state and ((fresh and i == 0) or run >= needed):
            state = ok
            out.append(ok)
        else:
            out.append(None)
    return out


@pytest.mark.parametrize("rise", [1, 2, 3, 4])
@pytest.mark.parametrize("fall", [1, 2, 3, 4])
@pytest.mark.parametrize("healthy", [True, False])
@pytest.mark.parametrize("fresh", [True, False])
def test_every_sequence_matches_reference(rise: int, fall: int, healthy: bool, fresh: bool) -> None:
    for length in range(1, 9):
        for results in itertools.product((True, False), repeat=length):
            counter = RiseFall(rise, fall, healthy, fresh=fresh)
            got = [counter.observe(ok) for ok in results]
            assert got == reference(rise, fall, healthy, fresh, results), (
                rise,
                fall,
                healthy,
                fresh,
                results,
            )
            # the state always equals the last flip, or the start if none
            flips = [g for g in got if g is not None]
            assert counter.healthy == (flips[-1] if flips else healthy)
            assert not counter.fresh


def test_fall_needs_consecutive_failures() -> None:
    c = RiseFall(rise=2, fall=3, healthy=True)
    assert c.observe(False) is None
    assert c.observe(False) is None
    assert c.observe(True) is None  # a pass breaks the streak
    assert c.observe(False) is None
    assert c.observe(False) is None
    assert c.observe(False) is False
    assert c.healthy is False
    assert c.failures == 3 and c.passes == 0
    assert c.observe(False) is None  # already down: no second flip


def test_rise_needs_consecutive_passes() -> None:
    c = RiseFall(rise=3, fall=1, healthy=False)
    assert [c.observe(ok) for ok in (True, True, False, True, True)] == [None] * 5
    assert c.observe(True) is True
    assert c.passes == 3 and c.failures == 0
    assert c.observe(True) is None


def test_fresh_settles_on_first_result_only() -> None:
    up = RiseFall(rise=3, fall=3, healthy=True, fresh=True)
    assert up.observe(False) is False  # present at start, first check failed: down at once
    assert up.observe(True) is None  # now it has history: needs 3 passes
    assert up.observe(True) is None
    assert up.observe(True) is True

    new = RiseFall(rise=3, fall=3, healthy=False, fresh=True)
    assert new.observe(True) is True  # added at runtime: one pass is enough

    new_failing = RiseFall(rise=2, fall=3, healthy=False, fresh=True)
    assert new_failing.observe(False) is None
    assert new_failing.observe(True) is None  # history now: the normal rise applies
    assert new_failing.observe(True) is True


def test_first_agreeing_result_does_not_flip() -> None:
    c = RiseFall(rise=2, fall=2, healthy=True, fresh=True)
    assert c.observe(True) is None
    assert c.observe(False) is None  # fresh is spent: one failure is not enough
    assert c.observe(False) is False


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 2), (2, -3)])
def test_rise_and_fall_must_be_positive(rise: int, fall: int) -> None:
    with pytest.raises(ValueError):
        RiseFall(rise, fall, True)
