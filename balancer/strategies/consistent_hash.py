"""consistent_hash: a request key mapped onto a weighted hash ring of backend addresses."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Collection, Sequence
from hashlib import blake2b
from operator import attrgetter, methodcaller

from balancer.backend import Backend
from balancer.strategies.base import RequestContext, Strategy, StrategyOptions

# Virtual nodes per unit of weight: enough that each backend's share of the ring is within a
# few percent of its weight's share, few enough that a rebuild costs well under a millisecond
# for a dozen backends.
POINTS_PER_WEIGHT = 160

# Ceiling on the ring's size. Pools with large weights (HAProxy-style 1..256) get fewer points
# per unit of weight, halved as often as needed: a power of two, so that the ratio, and with it
# every backend's points, changes only when the total weight crosses a power of two rather
# than with every backend added or removed.
MAX_RING_POINTS = 40960

# Every backend's points come from one deterministic sequence per address; a rebuild (each
# health flip, each slow-start step) reuses it instead of hashing again. Bounded: cleared when
# it outgrows any plausible set of configured addresses.
_POINTS: dict[str, list[int]] = {}
_POINTS_CACHE_LIMIT = 4096


def hash64(data: bytes) -> int:
    """A stable 64-bit hash (BLAKE2b), equal in every process, unlike the salted hash()."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def ring_points(address: str, count: int) -> list[int]:
    """The first `count` ring positions of `address`; a longer count extends a shorter one,
    so a backend whose weight grows only gains points and keeps the ones it had."""
    points = _POINTS.get(address)
    if points is None:
        if len(_POINTS) >= _POINTS_CACHE_LIMIT:
            _POINTS.clear()
        points = _POINTS[address] = []
    prefix = address.encode() + b"#"
    while len(points) < count:
        # one 32-byte digest gives four 64-bit points (as ketama gets four from one MD5)
        digest = blake2b(prefix + str(len(points) // 4).encode(), digest_size=32).digest()
        points.extend(int.from_bytes(digest[k : k + 8], "big") for k in (0, 8, 16, 24))
    return points[:count]


def key_function(hash_key: str | None) -> Callable[[RequestContext], str | None]:
    """The extractor for a `hash_key` setting: header:NAME | cookie:NAME | path | client_ip
    (the default when unset). ValueError for anything else."""
    spec = hash_key or "client_ip"
    if spec == "path":
        return attrgetter("path")
    if spec == "client_ip":
        return attrgetter("client_ip")
    kind, sep, name = spec.partition(":")
    if sep and name and kind in ("header", "cookie"):
        return methodcaller(kind, name)
    raise ValueError(f"hash_key {hash_key!r}: expected header:NAME, cookie:NAME, path or client_ip")


class ConsistentHash(Strategy):
    """The backend owning the request key's position on a hash ring.

    The key comes from `options.hash_key`. Each backend with weight > 0 gets
    POINTS_PER_WEIGHT ring points per unit of weight (at least one), hashed from its address
    with BLAKE2b, so two balancers with the same backends and weights build the same ring
    whatever the order of their configs, and removing one of N backends moves only the
    ~1/N of keys it owned. A key lands on the first point clockwise from its hash; if that
    backend is excluded or full, the walk goes on clockwise to the next usable one (the key's
    usual fallback, so retries stay consistent too). A request with no key value (header or
    cookie absent, empty) is spread round robin over the usable backends.
    """

    name = "consistent_hash"

    def __init__(
        self,
        backends: Sequence[Backend],
        options: StrategyOptions | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(backends, options, weights)
        self._key = key_function(self.options.hash_key)
        live = [(b, w) for b, w in zip(self.backends, self.weights, strict=True) if w > 0]
        self._live = tuple(b for b, _ in live)
        self._next = 0
        scale = float(POINTS_PER_WEIGHT)
        total_weight = sum(w for _, w in live)
        while scale > 1 and total_weight * scale > MAX_RING_POINTS:
            scale /= 2
        positions: list[int] = []
        owners: list[Backend] = []
        # by address, so that equal positions (a 2**-64 chance) resolve the same everywhere:
        # the sort below is stable
        for b, w in sorted(live, key=lambda bw: bw[0].address):
            points = ring_points(b.address, max(1, round(w * scale)))
            positions.extend(points)
            owners.extend([b] * len(points))
        order = sorted(range(len(positions)), key=positions.__getitem__)
        self._positions = [positions[k] for k in order]
        self._owners = [owners[k] for k in order]

    def select(self, ctx: RequestContext, exclude: Collection[Backend] = ()) -> Backend | None:
        key = self._key(ctx)
        if not key:
            return self._round_robin(exclude)
        positions = self._positions
        if not positions:
            return None
        pos = bisect_right(positions, hash64(key.encode("utf-8", "surrogateescape")))
        if pos == len(positions):
            pos = 0
        b = self._owners[pos]
        # `b.full` spelled out: the property call would cost more than the rest of the step
        if not (0 < b.max_connections <= b.inflight or (exclude and b in exclude)):
            return b
        return self._walk(pos, exclude)

    def _walk(self, pos: int, exclude: Collection[Backend]) -> Backend | None:
        # a full lap would be wasted when nothing is usable, so check that first
        if all(b.full or b in exclude for b in self._live):
            return None
        owners = self._owners
        n = len(owners)
        while True:
            pos += 1
            if pos == n:
                pos = 0
            b = owners[pos]
            if not (b.full or b in exclude):
                return b

    def _round_robin(self, exclude: Collection[Backend]) -> Backend | None:
        live = self._live
        n = len(live)
        for step in range(n):
            pos = (self._next + step) % n
            b = live[pos]
            if not (b.full or (exclude and b in exclude)):
                self._next = pos + 1
                return b
        return None
