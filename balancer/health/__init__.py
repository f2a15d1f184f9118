"""Health: active checks (ActiveChecker), the rise/fall counter, and the pools' upkeep loop.

Wiring, as the daemon does it:

    checker = ActiveChecker(pool, pool.config.health_check, connect_timeout=cfg.timeouts.connect)
    checker.start()                      # one check loop per backend of the pool
    ...
    pool.add_backend(b); checker.add(b, verified=False)   # admin API: down until checked
    checker.remove(b); pool.remove_backend(b)
    ...
    await checker.stop()

and, once for the whole daemon (not per pool, not per checker):

    upkeep = asyncio.create_task(maintain_forever(lambda: daemon.pools.values()))

which calls `pool.maintain()` on every pool every `period` seconds: that ends expired
passive ejections and advances slow-start ramps, whether or not a pool has active checks.
Passive ejection itself lives in `Pool.release()`; health flips go through
`Pool.set_healthy()` only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from balancer.health.active import ActiveChecker
from balancer.health.counter import RiseFall

if TYPE_CHECKING:
    from balancer.pool import Pool

__all__ = ["ActiveChecker", "RiseFall", "maintain_forever"]

log = logging.getLogger("balancer.health")


async def maintain_forever(
    pools: Iterable[Pool] | Callable[[], Iterable[Pool]], period: float = 0.5
) -> None:
    """Call `maintain()` on every pool every `period` seconds until cancelled.

    `pools` is either a collection read afresh on each round (a live `dict.values()` view
    follows additions and removals) or a function returning the current pools, which also
    follows a reload that replaces the whole dict. One pool raising does not stop the others
    or the loop: the error is logged and the next round runs as usual.
    """
    if period <= 0:
        raise ValueError(f"period must be > 0, got {period}")
    while True:
        current = pools() if callable(pools) else pools
        for pool in list(current):
            try:
                pool.maintain()
            except Exception:
                log.exception("pool %s: maintain() failed", getattr(pool, "name", "?"))
        await asyncio.sleep(period)
