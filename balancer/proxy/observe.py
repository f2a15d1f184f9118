"""Observer: what happens once per finished request (access log line, metrics hooks)."""

from __future__ import annotations

import json
import os
import select
import stat
import sys
import time
from typing import TYPE_CHECKING

from balancer.config import AccessLogConfig

# Lines waiting beyond this many characters are written at once, not at the next flush.
FLUSH_AT = 64 * 1024

if TYPE_CHECKING:
    from balancer.backend import Backend
    from balancer.proxy.exchange import Exchange


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
            self._ms_stamp = f"{self._stamp}.{ms % 1000:03d}Z"
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
            line = (
                f'{self._timestamp()} {ex.client_ip} "{ex.method.decode("latin-1")} '
                f'{ex.url.decode("latin-1")} HTTP/{ex.version}" {ex.status} {ex.bytes_out} '
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
        self.metrics = None  # set by the daemon: an object with request_done/backend_failed/retried

    def request_done(self, ex: Exchange, broken: bool = False) -> None:
        duration = time.monotonic() - ex.started_at
        if self.access_log.enabled:
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
