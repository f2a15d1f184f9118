"""Backend: one app server as a value (name, address, weight) plus its live counters."""

from __future__ import annotations

import math
from enum import StrEnum


class BackendState(StrEnum):
    """Administrative and health state, as shown in /status."""

    UP = "up"
    DOWN = "down"  # failed health checks or ejected by passive detection
    DRAINING = "draining"  # no new requests; in-flight ones finish
    DISABLED = "disabled"  # taken out by an operator


class Backend:
    """A backend server and the counters the strategies and the operator read.

    One object lives as long as its address is configured in its pool: a reload that keeps
    the address keeps the object, so health state and counters survive. Strategies read the
    counters but never change them; the proxy changes `inflight` and `sent_since_report`
    through `begin()`/`end()` only.
    """

    __slots__ = (
        "name",
        "host",
        "port",
        "weight",
        "max_connections",
        "source",  # where it came from: "config", "api", "etcd" or "dns"
        # health (written by balancer.health through the pool)
        "healthy",
        "admin_state",
        "ejected_until",
        "consecutive_failures",
        "ejections",
        "ejection_ended",
        "slow_start_until",
        "slow_start_began",
        # live load
        "inflight",
        "reported_load",
        "inflight_at_report",
        "sent_since_report",
        # totals for /status and metrics
        "requests",
        "errors",
        "index",
    )

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        weight: int = 1,
        max_connections: int = 0,
        source: str = "config",
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.weight = weight
        self.max_connections = max_connections
        self.source = source
        self.healthy = True
        self.admin_state = BackendState.UP  # UP, DRAINING or DISABLED: what the operator set
        self.ejected_until = 0.0
        self.consecutive_failures = 0  # live-traffic failures in a row (passive detection)
        self.ejections = 0  # how often ejected; the ejection time doubles with each
        self.ejection_ended = 0.0  # pool clock time of the last ejection's end (for decay)
        self.slow_start_until = 0.0
        self.slow_start_began = 0.0
        self.inflight = 0
        self.reported_load: float | None = None
        self.inflight_at_report = 0
        self.sent_since_report = 0
        self.requests = 0
        self.errors = 0
        # position in its pool, fixed at construction of the pool's snapshot; lets strategies
        # keep per-backend arrays without hashing objects
        self.index = 0

    @property
    def address(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def state(self) -> BackendState:
        """The one state an operator sees: an admin choice wins over health."""
        if self.admin_state is not BackendState.UP:
            return self.admin_state
        return BackendState.UP if self.healthy and not self.ejected_until else BackendState.DOWN

    @property
    def full(self) -> bool:
        """True when max_connections is set and reached: strategies skip a full backend."""
        return 0 < self.max_connections <= self.inflight

    def begin(self) -> None:
        """A request was sent to this backend."""
        self.inflight += 1
        self.sent_since_report += 1
        self.requests += 1

    def end(self, failed: bool = False) -> None:
        """A request to this backend finished (or failed)."""
        self.inflight -= 1
        if failed:
            self.errors += 1

    def report_load(self, load: float) -> None:
        """The backend said how loaded it is (health-check answer): restart the correction."""
        self.reported_load = load
        self.inflight_at_report = self.inflight
        self.sent_since_report = 0

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, {self.address}, w={self.weight}, {self.state.value})"


def parse_load(value: object) -> float | None:
    """A load report (`X-Backend-Load` header, or the "load" of a JSON health answer) as a
    float, or None unless it is a finite number >= 0.

    Strings and bytes (the header) are parsed; from JSON only real numbers count (not bools)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, str | bytes):
            load = float(value.strip())
        elif isinstance(value, int | float):
            load = float(value)
        else:
            return None
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(load) or load < 0.0:
        return None
    return load
