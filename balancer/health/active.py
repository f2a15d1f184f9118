"""ActiveChecker: periodic HTTP/TCP health checks of one pool's backends, with load feedback."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import deque
from typing import Any

import h2.exceptions

from balancer.backend import Backend, parse_load
from balancer.config import HealthCheckConfig
from balancer.health.counter import RiseFall
from balancer.health.grpc_probe import ProbeFailed
from balancer.health.grpc_probe import check as grpc_check
from balancer.pool import Pool
from balancer.proxy.proxy_protocol import local_header

log = logging.getLogger("balancer.health")

HISTORY_LENGTH = 10  # results kept per backend for /status and the dashboard
MAX_BODY = 64 * 1024  # body bytes read for the load report; the rest is ignored
MAX_HEAD = 64 * 1024  # status line plus headers; beyond this the answer is malformed
# The first check of each backend waits a random share of the interval (at most this
# fraction, and never more than FIRST_CHECK_MAX_DELAY) so that the checks of a large pool do
# not all fire in the same tick; the cap keeps a runtime-added backend, which is down until
# checked, from waiting minutes when the interval is long (6 min at `interval: 1h`).
FIRST_CHECK_JITTER = 0.1
FIRST_CHECK_MAX_DELAY = 1.0


class CheckFailed(Exception):
    """A check that got an answer it cannot accept (malformed, cut short, wrong status)."""


class _Target:
    """Per-backend state of the checker."""

    __slots__ = ("backend", "counter", "request", "history", "task")

    def __init__(self, backend: Backend, counter: RiseFall, request: bytes) -> None:
        self.backend = backend
        self.counter = counter
        self.request = request  # encoded once: the same bytes go out on every check
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LENGTH)
        self.task: asyncio.Task[None] | None = None


class ActiveChecker:
    """Checks every backend of one pool on its own asyncio loop and reports health flips.

    Each backend runs its own task: a check every `config.interval` (the first one after a
    small random jitter), bounded by `config.timeout` in total, so a backend that hangs
    delays only its own next check. Results feed the backend's `RiseFall` counter; a flip
    calls `pool.set_healthy()`, the one callback through which health changes (the pool logs
    the flip). HTTP checks also carry the backend's load report (`X-Backend-Load` header,
    else a JSON body `{"load": x}`), passed on with `backend.report_load()`.

    The pool's backends at construction are added as verified (present at start); later
    ones are added with `add()`. For metrics: `results[backend]` is `(passes, failures)`
    since the backend was added, `last_check[backend]` the wall-clock time of its latest
    completed check.
    """

    def __init__(
        self,
        pool: Pool,
        config: HealthCheckConfig,
        *,
        connect_timeout: float | None = None,
    ) -> None:
        if config.type not in ("http", "tcp", "grpc"):
            raise ValueError(f"health check type must be http, tcp or grpc, not {config.type!r}")
        if config.type == "http" and (
            not config.path.startswith("/") or any(c.isspace() or ord(c) < 32 for c in config.path)
        ):
            # the path goes verbatim into the request line
            raise ValueError(
                f"health check path must start with / and have no spaces: {config.path!r}"
            )
        if config.interval <= 0 or config.timeout <= 0:
            raise ValueError("health check interval and timeout must be > 0")
        self.pool = pool
        self.config = config
        # connecting gets the smaller of the daemon's connect timeout and the check timeout
        self.connect_timeout = (
            connect_timeout
            if connect_timeout is not None and connect_timeout < config.timeout
            else None
        )
        self.results: dict[Backend, tuple[int, int]] = {}
        self.last_check: dict[Backend, float] = {}
        self._targets: dict[Backend, _Target] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._running = False
        for backend in pool.backends:
            self.add(backend, verified=True)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start one check loop per backend. Call from the running event loop."""
        asyncio.get_running_loop()  # raises here, not later in a task, when there is none
        if self._running:
            return
        self._running = True
        for target in self._targets.values():
            self._spawn(target)

    async def stop(self) -> None:
        """Cancel every check loop and wait for them to end."""
        self._running = False
        tasks = [t.task for t in self._targets.values() if t.task is not None]
        tasks.extend(self._stopping)
        for target in self._targets.values():
            target.task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def running(self) -> bool:
        return self._running

    # -- backends ---------------------------------------------------------------------------

    def add(self, backend: Backend, *, verified: bool) -> None:
        """Start checking `backend`; adding one already checked does nothing.

        verified=True (present at daemon start): its current health stands until checked,
        and if it is up, its first failed check takes it down at once. verified=False
        (added at runtime): it is marked down now and comes up on its first passing check.
        """
        if backend in self._targets:
            return
        cfg = self.config
        if verified:
            counter = RiseFall(cfg.rise, cfg.fall, backend.healthy, fresh=backend.healthy)
        else:
            self.pool.set_healthy(backend, False, "new backend, waiting for first check")
            counter = RiseFall(cfg.rise, cfg.fall, False, fresh=True)
        target = _Target(backend, counter, self._request_for(backend))
        self._targets[backend] = target
        self.results[backend] = (0, 0)
        if self._running:
            self._spawn(target)

    def remove(self, backend: Backend) -> None:
        """Stop checking `backend` and forget its counters; unknown backends are ignored."""
        target = self._targets.pop(backend, None)
        self.results.pop(backend, None)
        self.last_check.pop(backend, None)
        if target is not None and target.task is not None:
            # cancelled at its next await, before it can report on a removed backend;
            # stop() awaits it so no task outlives the checker
            task = target.task
            target.task = None
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def __contains__(self, backend: object) -> bool:
        return backend in self._targets

    def history(self, backend: Backend) -> list[dict[str, Any]]:
        """The last results for `backend`, oldest first: dicts with `time` (wall clock),
        `ok`, `status` (HTTP status or None), `error` (why it failed, or None),
        `duration_ms` and `load` (the load reported, or None)."""
        target = self._targets.get(backend)
        return [dict(h) for h in target.history] if target is not None else []

    # -- the loop ---------------------------------------------------------------------------

    def _spawn(self, target: _Target) -> None:
        target.task = asyncio.get_running_loop().create_task(
            self._run(target), name=f"health:{self.pool.name}:{target.backend.name}"
        )

    async def _run(self, target: _Target) -> None:
        interval = self.config.interval
        loop = asyncio.get_running_loop()
        await asyncio.sleep(first_check_delay(interval))
        while True:
            started = loop.time()
            try:
                await self.check_once(target.backend)
            except Exception:
                # a bug must not end this backend's checks for good
                log.exception(
                    "pool %s: health check of %s crashed", self.pool.name, target.backend.name
                )
            # the interval runs from the start of a check, so a slow check does not stretch
            # the cadence; one slower than the interval is followed at once
            await asyncio.sleep(max(0.0, started + interval - loop.time()))

    async def check_once(self, backend: Backend) -> dict[str, Any]:
        """Run one check of `backend` now, record it and return its history entry."""
        target = self._targets[backend]
        loop = asyncio.get_running_loop()
        started = loop.time()
        status: int | None = None
        load: float | None = None
        error: str | None = None
        try:
            if self.config.type == "tcp":
                await self._probe_tcp(backend)
            elif self.config.type == "grpc":
                await self._probe_grpc(backend)
            else:
                status, load = await self._probe_http(backend, target.request)
                lo, hi = self.config.expect_status
                if not lo <= status <= hi:
                    error = f"status {status} not in {lo}-{hi}"
        except TimeoutError:
            error = f"timed out after {self.config.timeout:g}s"
        except (CheckFailed, ProbeFailed) as e:
            error = str(e)
        except ConnectionRefusedError:
            error = "connection refused"
        except ConnectionResetError:
            error = "connection reset"
        except asyncio.IncompleteReadError:
            error = "connection closed before the answer was complete"
        except OSError as e:
            error = e.strerror or str(e) or type(e).__name__
        duration = loop.time() - started
        if backend not in self._targets:
            return {}  # removed while this check ran
        return self._record(target, error is None, status, error, duration, load)

    def _record(
        self,
        target: _Target,
        ok: bool,
        status: int | None,
        error: str | None,
        duration: float,
        load: float | None,
    ) -> dict[str, Any]:
        backend = target.backend
        now = time.time()
        passes, failures = self.results[backend]
        self.results[backend] = (passes + 1, failures) if ok else (passes, failures + 1)
        self.last_check[backend] = now
        entry = {
            "time": now,
            "ok": ok,
            "status": status,
            "error": error,
            "duration_ms": round(duration * 1000.0, 3),
            "load": load,
        }
        target.history.append(entry)
        if load is not None:
            backend.report_load(load)
        elif status is not None and backend.reported_load is not None:
            # an answer without a load report: the old report is stale, and least_load would
            # keep adding to it until the backend starved; fall back to in-flight counting
            backend.reported_load = None
        if not ok:
            log.debug(
                "pool %s: health check of %s (%s) failed: %s",
                self.pool.name,
                backend.name,
                backend.address,
                error,
            )
        counter = target.counter
        first = counter.fresh
        flipped = counter.observe(ok)
        if flipped is not None:
            if first:
                reason = "first check passed" if flipped else f"first check failed: {error}"
            elif flipped:
                reason = f"{counter.passes} consecutive passes"
            else:
                reason = f"{counter.failures} consecutive failures: {error}"
            self.pool.set_healthy(backend, flipped, reason)
        return dict(entry)

    # -- probes -----------------------------------------------------------------------------

    def _request_for(self, backend: Backend) -> bytes:
        host = self.config.host or backend.address
        return (
            f"GET {self.config.path} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "User-Agent: balancer-health\r\n"
            "Connection: close\r\n"
            "\r\n"
        ).encode("latin-1")

    async def _connect(self, backend: Backend) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        connect = asyncio.open_connection(backend.host, backend.port, limit=MAX_HEAD)
        if self.connect_timeout is None:
            reader, writer = await connect
        else:
            try:
                reader, writer = await asyncio.wait_for(connect, self.connect_timeout)
            except TimeoutError:
                raise CheckFailed(f"connect timed out after {self.connect_timeout:g}s") from None
        if self.pool.send_proxy:
            # a backend behind send_proxy_protocol requires the header on every connection:
            # this one is the balancer's own, so it says so (v2 LOCAL, v1 UNKNOWN)
            writer.write(local_header(self.pool.send_proxy))
        return reader, writer

    async def _probe_tcp(self, backend: Backend) -> None:
        async with asyncio.timeout(self.config.timeout):
            _, writer = await self._connect(backend)
        writer.close()

    async def _probe_grpc(self, backend: Backend) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.config.timeout):
                reader, writer = await self._connect(backend)
                host = self.config.host or backend.address
                await grpc_check(reader, writer, host, self.config.service)
        except h2.exceptions.ProtocolError as e:
            raise CheckFailed(f"not HTTP/2: {e}") from None
        finally:
            if writer is not None:
                writer.close()

    async def _probe_http(self, backend: Backend, request: bytes) -> tuple[int, float | None]:
        """Send the check request; return the status and the load reported (if any)."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.config.timeout):
                reader, writer = await self._connect(backend)
                writer.write(request)
                status, headers = await read_head(reader)
                body = await read_body(reader, status, headers)
        finally:
            if writer is not None:
                writer.close()
        load = parse_load(headers.get("x-backend-load"))
        if load is None and body:
            load = load_from_body(body)
        return status, load


# -- response parsing (module level so the unit tests can reach it) ----------------------------


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Read the status line and headers; header names lower-cased, repeats joined by ", "."""
    try:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise CheckFailed("connection closed before the status line")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise CheckFailed(f"malformed status line {line[:80]!r}")
        status = int(parts[1])
        if not 100 <= status <= 999:
            raise CheckFailed(f"malformed status line {line[:80]!r}")
        headers: dict[str, str] = {}
        size = len(line)
        while True:
            line = await reader.readline()
            size += len(line)
            if size > MAX_HEAD:
                raise CheckFailed("response head too large")
            if not line.endswith(b"\n"):
                raise CheckFailed("connection closed in the response headers")
            if line in (b"\r\n", b"\n"):
                return status, headers
            name, sep, value = line.partition(b":")
            if not sep:
                raise CheckFailed(f"malformed header line {line[:80]!r}")
            key = name.strip().lower().decode("latin-1")
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
    except ValueError as e:
        # StreamReader.readline raises ValueError for a line beyond its limit
        raise CheckFailed(f"response head too large ({e})") from None


async def read_body(reader: asyncio.StreamReader, status: int, headers: dict[str, str]) -> bytes:
    """Read up to MAX_BODY bytes of the body (Content-Length, chunked, or until close)."""
    if status < 200 or status in (204, 304):
        return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    length = headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise CheckFailed(f"bad Content-Length {length[:40]!r}") from None
        if n < 0:
            raise CheckFailed(f"bad Content-Length {length[:40]!r}")
        return await reader.readexactly(min(n, MAX_BODY))
    # no length: the body runs until the backend closes (we asked for Connection: close)
    chunks: list[bytes] = []
    size = 0
    while size < MAX_BODY:
        data = await reader.read(MAX_BODY - size)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while len(body) < MAX_BODY:
        try:
            line = await reader.readline()
        except ValueError:
            raise CheckFailed("chunk size line too long") from None
        if not line.endswith(b"\n"):
            raise CheckFailed("connection closed in a chunked body")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise CheckFailed(f"bad chunk size {line[:40]!r}") from None
        if size < 0:
            raise CheckFailed(f"bad chunk size {line[:40]!r}")
        if size == 0:
            break  # trailers, if any, are not needed
        take = min(size, MAX_BODY - len(body))
        body += await reader.readexactly(take)
        if take < size:
            break  # enough read; the rest is cut off
        await reader.readline()  # the CRLF closing the chunk
    return bytes(body)


def first_check_delay(interval: float) -> float:
    """How long a backend's first check waits: a random spread, short whatever the interval."""
    return random.uniform(0.0, min(interval * FIRST_CHECK_JITTER, FIRST_CHECK_MAX_DELAY))


def load_from_body(body: bytes) -> float | None:
    """The numeric "load" of a JSON object body, or None if there is none."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    value = data.get("load")
    if isinstance(value, str):
        return None  # the JSON report must be a number, not a string that looks like one
    return parse_load(value)
