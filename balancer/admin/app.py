"""Admin API (aiohttp): status, health, metrics, the dashboard, runtime backend changes, reload."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from balancer import config as config_mod
from balancer.backend import Backend
from balancer.pool import Pool, backend_status

if TYPE_CHECKING:
    from balancer.admin import surface
    from balancer.admin.metrics import Metrics
    from balancer.config import Config

log = logging.getLogger("balancer.admin")

# Said in every answer to a runtime change: the config file stays the truth.
RUNTIME_NOTE = (
    "runtime change: applied now, but lost on the next reload or restart unless also written"
    " to the config file"
)
# The rule the config file applies to names (balancer.config): they end up in URLs and labels.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
ADMIN_STATES = ("up", "draining", "disabled")
WEIGHT_RANGE = (1, 1000)
MAX_BODY = 64 * 1024  # admin bodies are a few fields; anything bigger is a mistake
# Answered without a token: the liveness probe, and the dashboard page itself (static HTML
# with no data in it; a browser cannot send a header when navigating, so the page takes the
# token from its URL fragment and sends it with each of its own requests).
OPEN_PATHS = frozenset({"/healthz", "/"})
JSON = Callable[[web.Request], Awaitable[web.StreamResponse]]


class DaemonSurface(Protocol):
    """All the admin API may touch of the running daemon. It reads; it changes things only
    through the calls below, which are the ones a reload makes."""

    # -- read ---------------------------------------------------------------------------------
    @property
    def config(self) -> Config: ...

    @property
    def stopping(self) -> bool: ...  # draining: /healthz answers 503

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    @property
    def checkers(self) -> Mapping[str, surface.Checker]: ...  # health check history

    @property
    def cluster(self) -> surface.Cluster | None: ...  # the workers' counters (workers: N)

    @property
    def metrics(self) -> Metrics | None: ...  # None with admin.metrics: false

    def status(self) -> dict[str, Any]: ...

    async def refresh_counters(self) -> None: ...  # fresh counters from every worker

    # -- change -------------------------------------------------------------------------------
    async def reload(self) -> list[str]: ...  # the problems; [] when reloaded

    def add_backend(
        self, pool_name: str, name: str, address: str, weight: int = 1, max_connections: int = 0
    ) -> Backend: ...

    def update_backend(
        self, pool_name: str, name: str, *, state: str | None = None, weight: int | None = None
    ) -> Backend: ...

    def remove_backend(self, pool_name: str, name: str) -> Backend: ...  # drains, then removes

    async def propagate(self) -> None: ...  # until every worker process applied the change


class BadRequest(Exception):
    """A request the admin API refuses; becomes `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AdminToken:
    """The bearer token from `admin.token` or `admin.token_file`.

    Read when the app is built (an unusable token file stops the daemon from starting) and
    again whenever the daemon's config object changes, that is after a reload (SIGHUP or
    POST /reload). If a reload brings a token file that can't be used, every call is refused
    until it is fixed: failing closed is the only safe choice for an API that can remove
    backends.
    """

    def __init__(self, daemon: DaemonSurface) -> None:
        self.daemon = daemon
        self._config: object = None
        self.required = False
        self.token: bytes | None = None
        self.problem: str | None = None
        self.refresh(strict=True)

    def refresh(self, *, strict: bool = False) -> None:
        cfg = self.daemon.config
        admin = cfg.admin
        self._config = cfg
        self.problem = None
        token: str | None = admin.token
        if admin.token_file:
            try:
                with open(admin.token_file, encoding="utf-8") as f:
                    token = f.read().strip()
                if not token:
                    raise OSError(f"{admin.token_file} is empty")
            except (OSError, UnicodeDecodeError) as e:
                if strict:
                    raise OSError(f"cannot use admin.token_file: {e}") from e
                self.problem = f"admin.token_file unusable after reload: {e}"
                log.error("%s; refusing every admin call but /healthz until fixed", self.problem)
                token = None
        self.token = token.encode() if token else None
        # config validation refuses a non-loopback bind without a token; should one get
        # here anyway, the answer is still "token required" (and none can match)
        self.required = bool(admin.token or admin.token_file) or not _is_loopback(admin.bind.host)

    def current(self) -> AdminToken:
        if self.daemon.config is not self._config:
            self.refresh()
        return self

    def check(self, header: str) -> str | None:
        """Why `header` (an Authorization value) is refused, or None if it is accepted."""
        if self.problem is not None:
            return self.problem
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return "this admin API requires Authorization: Bearer <token>"
        offered = credentials.strip().encode("utf-8", "replace")  # no 500 on odd bytes
        if self.token is None or not hmac.compare_digest(offered, self.token):
            return "invalid token"
        return None


TOKEN_KEY = web.AppKey("tokens", AdminToken)


def build_app(daemon: DaemonSurface) -> web.Application:
    """The admin application for `daemon` (raises OSError if its token file is unusable)."""
    tokens = AdminToken(daemon)
    app = web.Application(
        middlewares=[_json_errors, _guard],
        client_max_size=MAX_BODY,
    )
    app[TOKEN_KEY] = tokens
    api = _Api(daemon)
    r = app.router
    r.add_get("/", api.dashboard)
    r.add_get("/healthz", api.healthz)
    r.add_get("/status", api.status)
    r.add_get("/metrics", api.metrics)
    r.add_post("/reload", api.reload)
    r.add_post("/pools/{pool}/backends", api.add_backend)
    r.add_get("/pools/{pool}/backends/{name}", api.get_backend)
    r.add_patch("/pools/{pool}/backends/{name}", api.update_backend)
    r.add_delete("/pools/{pool}/backends/{name}", api.remove_backend)
    return app


# -- middlewares ---------------------------------------------------------------------------------


@web.middleware
async def _json_errors(request: web.Request, handler: JSON) -> web.StreamResponse:
    """Every refusal as JSON `{"error": ...}`, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except BadRequest as e:
        return _error(e.status, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        message = e.reason
        if e.status == 404:
            message = f"no such admin endpoint: {request.method} {request.path}"
        elif e.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        elif e.status == 413:
            message = f"request body too large (limit {MAX_BODY} bytes)"
        return _error(e.status, message, headers)
    except Exception:
        log.exception("admin %s %s failed", request.method, request.path)
        return _error(500, "internal error (logged by the balancer)")


@web.middleware
async def _guard(request: web.Request, handler: JSON) -> web.StreamResponse:
    """Bearer token, DNS-rebinding and cross-origin checks, before any handler runs."""
    tokens = request.app[TOKEN_KEY].current()
    if request.method in ("GET", "HEAD") and request.path in OPEN_PATHS:
        return await handler(request)
    if tokens.required:
        why = tokens.check(request.headers.get("Authorization", ""))
        if why is not None:
            challenge = 'Bearer realm="balancer admin"'
            if request.headers.get("Authorization"):
                challenge += ', error="invalid_token"'
            return _error(401, why, {"WWW-Authenticate": challenge})
    elif not _loopback_host(request.host):
        # no token (loopback bind): a web page the operator visits could still reach this
        # port through a DNS name rebound to 127.0.0.1; such requests name that other host
        return _error(403, f"refused: Host {request.host!r} is not a loopback address")
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
            # a browser page from another origin posting here (CSRF): only same-origin pages,
            # i.e. the dashboard, and non-browser clients (no Origin header) may change things
            return _error(403, f"refused: cross-origin request from {origin}")
    return await handler(request)


# -- handlers ------------------------------------------------------------------------------------


class _Api:
    def __init__(self, daemon: DaemonSurface) -> None:
        self.daemon = daemon
        self.reload_lock = asyncio.Lock()
        self.removing: set[tuple[str, Backend]] = set()  # DELETEd, still draining
        page = resources.files("balancer.admin").joinpath("static/dashboard.html").read_bytes()
        self.page = page
        self.page_headers = _page_headers(page)

    # -- reading -------------------------------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(body=self.page, headers=self.page_headers)

    async def healthz(self, request: web.Request) -> web.Response:
        if self.daemon.stopping:
            return _json({"status": "draining"}, 503)
        return _json({"status": "ok"})

    async def status(self, request: web.Request) -> web.Response:
        await self.daemon.refresh_counters()  # workers' latest counts (no-op with one process)
        st = self.daemon.status()
        metrics = self.daemon.metrics
        st["recent_errors"] = metrics.recent_errors() if metrics is not None else []
        return _json(st)

    async def metrics(self, request: web.Request) -> web.Response:
        metrics = self.daemon.metrics
        if metrics is None:
            return web.Response(
                text="# metrics are off (admin.metrics: false)\n",
                content_type="text/plain",
                headers={"Cache-Control": "no-store"},
            )
        await self.daemon.refresh_counters()
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        resp = web.Response(
            body=encoder(metrics.registry),
            headers={"Content-Type": content_type, "Cache-Control": "no-store"},
        )
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            resp.enable_compression()  # Prometheus asks for it; many backends make big scrapes
        return resp

    async def get_backend(self, request: web.Request) -> web.Response:
        pool, b = self._backend(request)
        return _json(self._entry(pool, b))

    # -- changing ------------------------------------------------------------------------------

    async def reload(self, request: web.Request) -> web.Response:
        async with self.reload_lock:
            problems = await self.daemon.reload()
        if problems:
            return _json({"reloaded": False, "errors": problems}, 400)
        request.app[TOKEN_KEY].current()  # a changed token file counts from this answer on
        return _json(
            {
                "reloaded": True,
                "config": self.daemon.config.source,
                "note": "the file is the truth again: runtime changes not written to it are gone",
            }
        )

    async def add_backend(self, request: web.Request) -> web.Response:
        pool = self._pool(request)
        body = await _body(request, ("name", "address", "weight", "max_connections"))
        for key in ("name", "address"):
            if key not in body:
                raise BadRequest(400, f"missing field {key!r} (the body needs name and address)")
        name = _name(body["name"])
        try:
            addr = config_mod.parse_address(body["address"])
        except ValueError as e:
            raise BadRequest(400, f"address: {e}") from None
        weight = _weight(body.get("weight", 1))
        max_conn = _int_field(body, "max_connections", 0, None, default=0)
        self._prune_removing()
        existing = pool.find(name)
        if existing is not None:
            gone = (
                " (being removed: retry once it is gone)"
                if self._is_removing(pool, existing)
                else ""
            )
            raise BadRequest(409, f"pool {pool.name!r} already has a backend named {name!r}{gone}")
        for b in pool.backends:
            if (b.host, b.port) == (addr.host, addr.port):
                raise BadRequest(
                    409, f"pool {pool.name!r} already has a backend at {addr} ({b.name!r})"
                )
        try:
            b = self.daemon.add_backend(pool.name, name, body["address"], weight, max_conn)
        except KeyError as e:
            raise BadRequest(404, str(e.args[0])) from None
        except ValueError as e:
            raise BadRequest(409, str(e)) from None
        await self.daemon.propagate()  # in effect in every worker process when we answer
        entry = self._entry(pool, b)
        if pool.config.health_check is None:
            # nothing would ever check it: it is up, and takes traffic, from now
            added = "added; the pool has no health_check, so it takes traffic now. "
        else:
            added = "added; down until its first health check passes, then it takes traffic. "
        entry["note"] = added + RUNTIME_NOTE
        return _json(entry, 201)

    async def update_backend(self, request: web.Request) -> web.Response:
        pool, b = self._backend(request)
        body = await _body(request, ("state", "weight"))
        if not body:
            raise BadRequest(400, 'nothing to change: give "state" and/or "weight"')
        state = body.get("state")
        if state is not None or "state" in body:
            state = _state(state)
        weight = _weight(body["weight"]) if "weight" in body else None
        self._prune_removing()
        if self._is_removing(pool, b):
            raise BadRequest(409, f"backend {b.name!r} is being removed (DELETE in progress)")
        self.daemon.update_backend(pool.name, b.name, state=state, weight=weight)
        await self.daemon.propagate()
        entry = self._entry(pool, b)
        entry["note"] = RUNTIME_NOTE
        return _json(entry)

    async def remove_backend(self, request: web.Request) -> web.Response:
        pool, b = self._backend(request)
        self._prune_removing()
        if not self._is_removing(pool, b):
            self.daemon.remove_backend(pool.name, b.name)
            self.removing.add((pool.name, b))
            await self.daemon.propagate()
        entry = self._entry(pool, b)
        drain = self.daemon.config.timeouts.drain
        entry["note"] = (
            f"draining: no new requests; removed once its in-flight requests finish (at most"
            f" {drain:g}s, timeouts.drain). {RUNTIME_NOTE}"
        )
        return _json(entry, 202)

    # -- helpers -------------------------------------------------------------------------------

    def _pool(self, request: web.Request) -> Pool:
        name = request.match_info["pool"]
        pool = self.daemon.pools.get(name)
        if pool is None:
            known = ", ".join(sorted(self.daemon.pools)) or "none"
            raise BadRequest(404, f"no pool named {name!r} (pools: {known})")
        return pool

    def _backend(self, request: web.Request) -> tuple[Pool, Backend]:
        pool = self._pool(request)
        name = request.match_info["name"]
        b = pool.find(name)
        if b is None:
            raise BadRequest(404, f"pool {pool.name!r} has no backend named {name!r}")
        return pool, b

    def _entry(self, pool: Pool, b: Backend) -> dict[str, Any]:
        entry = backend_status(b)
        entry["pool"] = pool.name
        cluster = self.daemon.cluster
        if cluster is not None:
            # totals over every process, as in /status
            remote = cluster.counters().get("backends", {}).get(pool.name, {}).get(b.name, {})
            for key in ("inflight", "requests", "errors"):
                entry[key] += remote.get(key, 0)
        checker = self.daemon.checkers.get(pool.name)
        entry["health_checks"] = checker.history(b) if checker is not None else []
        return entry

    def _is_removing(self, pool: Pool, b: Backend) -> bool:
        return (pool.name, b) in self.removing

    def _prune_removing(self) -> None:
        pools = self.daemon.pools
        self.removing = {
            (name, b) for name, b in self.removing if name in pools and b in pools[name].backends
        }


# -- body parsing ------------------------------------------------------------------------------


async def _body(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    raw = await request.read()
    example = {"name", "address"} if "address" in allowed else {"state", "weight"}
    if not raw.strip():
        raise BadRequest(
            400, f"empty body: expected a JSON object with {', '.join(sorted(example))}"
        )
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BadRequest(400, f"body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(400, f"body must be a JSON object, not {_kind(body)}")
    for key in body:
        if key not in allowed:
            raise BadRequest(400, f"unknown field {key!r} (allowed: {', '.join(allowed)})")
    return body


def _name(value: object) -> str:
    if not isinstance(value, str):
        raise BadRequest(400, f"name must be a string, not {_kind(value)}")
    if not NAME_RE.fullmatch(value):
        raise BadRequest(
            400, f"invalid name {value!r}: use letters, digits, '_', '-' and '.' (not first)"
        )
    return value


def _weight(value: object) -> int:
    lo, hi = WEIGHT_RANGE
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(400, f"weight must be an integer {lo}..{hi}, not {_kind(value)}")
    if not lo <= value <= hi:
        hint = " (to stop sending it traffic, set state to disabled)" if value == 0 else ""
        raise BadRequest(400, f"weight must be {lo}..{hi}, got {value}{hint}")
    return value


def _int_field(body: dict[str, Any], key: str, lo: int, hi: int | None, *, default: int) -> int:
    value = body.get(key, default)
    span = f">= {lo}" if hi is None else f"{lo}..{hi}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(400, f"{key} must be an integer {span}, not {_kind(value)}")
    if value < lo or (hi is not None and value > hi):
        raise BadRequest(400, f"{key} must be {span}, got {value}")
    return value


def _state(value: object) -> str:
    if value == "down":
        raise BadRequest(
            400,
            "state 'down' is decided by health checks, not set by an operator: use 'disabled'"
            " to take a backend out, 'draining' to let its requests finish first",
        )
    if not isinstance(value, str) or value not in ADMIN_STATES:
        shown = repr(value) if isinstance(value, str) else _kind(value)
        raise BadRequest(400, f"state must be one of {', '.join(ADMIN_STATES)}, got {shown}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    return "an object"


# -- answers -------------------------------------------------------------------------------------


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, separators=(",", ":")),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    resp = _json({"error": message}, status)
    if headers:
        resp.headers.update(headers)
    return resp


def _page_headers(page: bytes) -> dict[str, str]:
    # the page's one inline script is allowed by its hash: no other script can run there,
    # whatever a backend name or a logged URL contains
    m = re.search(rb"<script>(.*?)</script>", page, re.S)
    script = m.group(1) if m else b""
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    csp = (
        "default-src 'none'; "
        f"script-src 'sha256-{digest}'; "
        "style-src 'unsafe-inline'; "
        "connect-src 'self'; "
        "img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _loopback_host(host_header: str) -> bool:
    """Whether a Host header names this machine's loopback (with or without a port)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return _is_loopback(host) or host.endswith(".localhost")
