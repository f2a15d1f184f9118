"""Observer: what happens once per finished request (access log line, metrics counting).

Compiled with the proxy (observe.pxd): the access log line and the metrics row of every
request are built here, reading the exchange's fields as C struct members. admin/metrics.py
owns the metrics and reads these rows at scrape time.
"""

from __future__ import annotations

import json
import os
import select
import stat
import sys
import time
from time import monotonic  # a global, not a module attribute per request
from typing import TYPE_CHECKING, Any

from balancer.config import AccessLogConfig

# Lines waiting beyond this many characters are written at once, not at the next flush.
FLUSH_AT = 64 * 1024

if TYPE_CHECKING:
    from balancer.backend import Backend
    from balancer.proxy.exchange import Exchange

# -- the metrics row of a (pool, backend) ----------------------------------------------------

# Request duration buckets in seconds: fine below 100 ms where a proxy's answers mostly are,
# coarse up to the default 30 s backend timeout.
DURATION_BOUNDS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# Slots of the flat list kept per (pool, backend). A list of ints indexed by constants is the
# cheapest thing to bump from the hot path: no attribute lookups, no allocation per request.
C1XX, C2XX, C3XX, C4XX, C5XX, C_OTHER = range(6)
BROKEN = 6  # responses cut off mid-way (backend died, client left)
BYTES_OUT = 7
BYTES_IN = 8
DURATION_SUM = 9
HIST = 10  # HIST + i: requests with duration <= DURATION_BOUNDS[i]; the last is +Inf
ROW_LENGTH = HIST + len(DURATION_BOUNDS) + 1
_BUCKETS = len(DURATION_BOUNDS)

NO_POOL = "-"  # label value of requests answered before any pool was chosen (no route, 400s)


def new_row() -> list:
    row: list = [0] * ROW_LENGTH
    row[DURATION_SUM] = 0.0
    return row


def count_request(metrics: Any, ex: Any, duration: float, broken: bool) -> None:
    """One finished request counted into its (pool, backend) row of `metrics` (a
    balancer.admin.metrics.Metrics, whose `request_done` method this is)."""
    count_row(
        metrics, ex, ex.pool, ex.backend_name, ex.status, ex.bytes_out, ex.body_received,
        duration, broken,
    )  # fmt: skip


def count_row(
    metrics: Any,
    ex: Any,
    pool: Any,
    backend_name: str,
    status: int,
    bytes_out: int,
    body_received: int,
    duration: float,
    broken: bool,
) -> None:
    """count_request with the exchange's fields read: the Observer reads them as C struct
    members (this runs once per request; compiled, the row is a C-indexed list)."""
    pool_name = pool.name if pool is not None else NO_POOL
    stats = metrics.stats
    by_backend = stats.get(pool_name)
    if by_backend is None:
        by_backend = stats[pool_name] = {}
    row = by_backend.get(backend_name)
    if row is None:
        row = by_backend[backend_name] = new_row()
    cls = status // 100 - 1
    if not 0 <= cls < 5:
        cls = C_OTHER
    row[cls] += 1
    row[BYTES_OUT] += bytes_out
    row[BYTES_IN] += body_received
    row[DURATION_SUM] += duration
    # bisect_left(DURATION_BOUNDS, duration), without a call: most requests stop at once
    at = 0
    while at < _BUCKETS and DURATION_BOUNDS[at] < duration:
        at += 1
    row[HIST + at] += 1
    if broken or cls == C5XX:
        row[BROKEN] += broken
        # kept raw: decoding and formatting wait until someone looks at /status
        metrics.recent.append(
            (
                time.time(),
                "broken response" if broken else "error response",
                pool_name,
                backend_name,
                (status, ex.method, ex.url[:200]),
            )
        )


# -- the access log ------------------------------------------------------------------------

# f".{ms:03d}Z" for every millisecond: a lookup, not a format, per new millisecond
_MS_SUFFIX = tuple(f".{ms:03d}Z" for ms in range(1000))


class AccessLog:
    """One line per request, plain or JSON, written unformatted when off.

    Lines are collected in memory and written by `flush()` (the daemon calls it a few times
    a second, and it runs early when 64 KiB are waiting) rather than once per request: a
    write syscall per request would cost more than the rest of the logging. Each write
    holds whole lines only, so that with `workers: N` several processes appending to the
    same file or stderr never cut into each other's lines (a file is opened O_APPEND; a
    pipe gets writes of at most PIPE_BUF bytes, which the kernel keeps whole).
    """

    def __init__(self, config: AccessLogConfig) -> None:
        self.format = config.format
        self.enabled = config.format != "off"
        self._fd = -1
        self._own = False
        if self.enabled:
            if config.path:
                self._fd = os.open(config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._own = True
            else:
                self._fd = sys.stderr.fileno()
        # a pipe or terminal keeps a write whole up to PIPE_BUF; an O_APPEND file any size
        self._chunk = (
            1 << 20 if self._own and stat.S_ISREG(os.fstat(self._fd).st_mode) else select.PIPE_BUF
        )
        self._lines: list[str] = []
        self._pending = 0
        self._sec = -1
        self._stamp = ""
        self._ms = -1
        self._ms_stamp = ""

    def _timestamp(self) -> str:
        now = time.time()
        ms = int(now * 1000)
        if ms != self._ms:  # many requests end within one millisecond under load
            self._ms = ms
            sec = ms // 1000
            if sec != self._sec:  # formatting a date per request is wasted work
                self._sec = sec
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self._ms_stamp = self._stamp + _MS_SUFFIX[ms % 1000]
        return self._ms_stamp

    def write(self, ex: Exchange, duration: float, broken: bool) -> None:
        if not self.enabled:
            return
        b = ex.backend_name
        pool = ex.pool.name if ex.pool is not None else "-"
        if self.format == "json":
            rec = {
                "time": self._timestamp(),
                "client": ex.client_ip,
                "listener": ex.listener.name,
                "method": ex.method.decode("latin-1"),
                "path": ex.url.decode("latin-1"),
                "version": ex.version,
                "status": ex.status,
                "bytes": ex.bytes_out,
                "pool": pool,
                "backend": b,
                "duration_ms": round(duration * 1000, 3),
                "attempts": ex.attempts,
            }
            if broken:
                rec["broken"] = True
            line = json.dumps(rec, separators=(",", ":")) + "\n"
        else:
            method = ex.method  # typed bytes when compiled: decoded without a method call
            url = ex.url
            line = (
                f'{self._timestamp()} {ex.client_ip} "{method.decode("latin-1")} '
                f'{url.decode("latin-1")} HTTP/{ex.version}" {ex.status} {ex.bytes_out} '
                f"{ex.listener.name} {pool}/{b} {duration * 1000:.1f}ms"
                f"{' broken' if broken else ''}\n"
            )
        self._lines.append(line)
        self._pending += len(line)
        if self._pending >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        lines = self._lines
        if not lines:
            return
        self._lines = []
        self._pending = 0
        data = "".join(lines).encode("utf-8", "replace")
        limit = self._chunk
        try:
            while data:
                if len(data) <= limit:
                    cut = len(data)
                else:
                    # the last line end within the limit (a longer single line goes whole)
                    cut = data.rfind(b"\n", 0, limit) + 1 or data.find(b"\n") + 1 or len(data)
                written = os.write(self._fd, data[:cut])
                data = data[written:]
        except OSError:
            pass  # a full disk or a closed stderr must not take the proxy down with it

    def close(self) -> None:
        self.flush()
        if self._own and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self.enabled = False


class Observer:
    """Receives every finished request. Metrics subclass or wrap it (balancer.admin.metrics)."""

    def __init__(self, access_log: AccessLog) -> None:
        self.access_log = access_log
        # set by the daemon: a balancer.admin.metrics.Metrics (request_done is count_request)
        self.metrics = None

    def request_done(self, ex: Exchange, broken: bool = False) -> None:
        duration = monotonic() - ex.started_at
        if self.access_log.enabled:
            self.access_log.write(ex, duration, broken)
        m = self.metrics
        if m is not None:
            # m.request_done(ex, duration, broken), as a C call with the fields read here
            count_row(
                m, ex, ex.pool, ex.backend_name, ex.status, ex.bytes_out, ex.body_received,
                duration, broken,
            )  # fmt: skip

    def backend_failed(self, ex: Exchange, backend: Backend, kind: str) -> None:
        m = self.metrics
        if m is not None:
            m.backend_failed(ex, backend, kind)

    def retried(self, ex: Exchange, backend: Backend) -> None:
        m = self.metrics
        if m is not None:
            m.retried(ex, backend)
