"""Observer: what happens once per finished request (access log line, metrics hooks)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import IO, TYPE_CHECKING

from balancer.config import AccessLogConfig

if TYPE_CHECKING:
    from balancer.backend import Backend
    from balancer.proxy.client import Exchange


class AccessLog:
    """One line per request, plain or JSON, written unformatted when off.

    Writes go to a buffered stream flushed by `flush()` (the daemon calls it a few times a
    second) rather than once per request: a write syscall per request would cost more than
    the rest of the logging.
    """

    def __init__(self, config: AccessLogConfig) -> None:
        self.format = config.format
        self._own = False
        self.stream: IO[str] | None
        if config.format == "off":
            self.stream = None
        elif config.path:
            self.stream = open(config.path, "a", buffering=1 << 16, encoding="utf-8")  # noqa: SIM115
            self._own = True
        else:
            self.stream = sys.stderr
        self._sec = -1
        self._stamp = ""

    def _timestamp(self) -> str:
        now = time.time()
        sec = int(now)
        if sec != self._sec:  # formatting a date per request is wasted work
            self._sec = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._stamp}.{int((now - sec) * 1000):03d}Z"

    def write(self, ex: Exchange, duration: float, broken: bool) -> None:
        stream = self.stream
        if stream is None:
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
            stream.write(json.dumps(rec, separators=(",", ":")) + "\n")
        else:
            stream.write(
                f'{self._timestamp()} {ex.client_ip} "{ex.method.decode("latin-1")} '
                f'{ex.url.decode("latin-1")} HTTP/{ex.version}" {ex.status} {ex.bytes_out} '
                f"{ex.listener.name} {pool}/{b} {duration * 1000:.1f}ms"
                f"{' broken' if broken else ''}\n"
            )

    def flush(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(OSError, ValueError):
                self.stream.flush()

    def close(self) -> None:
        self.flush()
        if self._own and self.stream is not None:
            self.stream.close()


class Observer:
    """Receives every finished request. Metrics subclass or wrap it (balancer.admin.metrics)."""

    def __init__(self, access_log: AccessLog) -> None:
        self.access_log = access_log
        self.metrics = None  # set by the daemon: an object with request_done/backend_failed/retried

    def request_done(self, ex: Exchange, broken: bool = False) -> None:
        duration = time.monotonic() - ex.started_at
        if self.access_log.stream is not None:
            self.access_log.write(ex, duration, broken)
        m = self.metrics
        if m is not None:
            m.request_done(ex, duration, broken)

    def backend_failed(self, ex: Exchange, backend: Backend, kind: str) -> None:
        m = self.metrics
        if m is not None:
            m.backend_failed(ex, backend, kind)

    def retried(self, ex: Exchange, backend: Backend) -> None:
        m = self.metrics
        if m is not None:
            m.retried(ex, backend)
