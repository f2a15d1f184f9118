"""RiseFall: the one rise/fall counter that turns check results into health flips."""

from __future__ import annotations


class RiseFall:
    """Consecutive-result counter: health flips only after `rise` passes or `fall` failures
    in a row, so one lost packet does not take a backend out and one lucky answer does not
    bring a broken one back.

    `fresh=True` means "no history yet": the first observation settles the state at once in
    either direction (a backend present at start that fails its first check goes down
    without waiting for `fall`; a backend added at runtime comes up on its first pass). From
    the second observation on the normal rule applies.

    Pure: no clock, no I/O. `passes` / `failures` are the current streak (one of them is 0).
    """

    __slots__ = ("rise", "fall", "healthy", "fresh", "passes", "failures")

    def __init__(self, rise: int, fall: int, healthy: bool, *, fresh: bool = False) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be >= 1 (got rise={rise}, fall={fall})")
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self.fresh = fresh
        self.passes = 0
        self.failures = 0

    def observe(self, ok: bool) -> bool | None:
        """Count one check result; return the new health if it flipped, else None."""
        first = self.fresh
        self.fresh = False
        if ok:
            self.failures = 0
            self.passes += 1
            if not self.healthy and (first or self.passes >= self.rise):
                self.healthy = True
                return True
        else:
            self.passes = 0
            self.failures += 1
            if self.healthy and (first or self.failures >= self.fall):
                self.healthy = False
                return False
        return None

    def __repr__(self) -> str:
        state = "up" if self.healthy else "down"
        return (
            f"RiseFall({state}, rise={self.rise}, fall={self.fall}, "
            f"passes={self.passes}, failures={self.failures}{', fresh' if self.fresh else ''})"
        )
