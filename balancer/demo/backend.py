"""The demo app server: a small aiohttp app to put behind the balancer in demos, tests and benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import html
import json
import logging
import math
import re
import secrets
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from aiohttp import web

__all__ = ["build_app", "serve", "main", "parse_duration"]

log = logging.getLogger("balancer.demo.backend")

SESSION_COOKIE = "demo_session"
MAX_SESSIONS = 10_000
CHUNK = 64 * 1024
# 65536 is a multiple of 256, so every full piece is this same buffer and the pattern runs on
# unbroken across pieces: byte i of a /bytes body is always i % 256.
PATTERN = bytes(range(256)) * (CHUNK // 256)

# Knob ceilings: a typo in a query string should not wedge a demo server for a day.
MAX_DELAY_S = 3600.0
MAX_CPU_MS = 60_000.0

# Headers of the requests the balancer forwards may legitimately be large (its own limit is
# 64 KiB by default); the backend should not be the one refusing them in a test of that limit.
HANDLER_ARGS = {"max_line_size": 65536, "max_field_size": 65536, "max_headers": 1000}

# A session id is whatever token_urlsafe makes; an id sent by the client is adopted only if it
# looks like one, so a session made on another server keeps its id here (and starts at 0 visits).
_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

PRODUCTS: tuple[dict[str, Any], ...] = tuple(
    {"id": i, "name": name, "price_cents": price}
    for i, (name, price) in enumerate(
        [
            ("Round-robin teapot", 1999),
            ("Least-connections lamp", 3450),
            ("Consistent-hash clock", 2599),
            ("Sticky-cookie jar", 899),
            ("Health-check thermometer", 1250),
            ("Failover umbrella", 2200),
            ("Keep-alive kettle", 4100),
            ("Backpressure valve", 1575),
            ("Drain plug", 350),
            ("Floating IP balloon", 499),
            ("Weighted scale", 6300),
            ("Timeout hourglass", 1100),
        ],
        start=1,
    )
)
PRODUCTS_BY_ID = {p["id"]: p for p in PRODUCTS}
MAX_QUANTITY = 1000


class Session:
    """What this one server remembers of a visitor (another server has its own, separate copy)."""

    __slots__ = ("visits", "user", "cart")

    def __init__(self) -> None:
        self.visits = 0
        self.user: str | None = None
        # product id -> quantity; keys come only from PRODUCTS, so a cart's size is bounded.
        self.cart: dict[int, int] = {}


class SessionStore:
    """Sessions by id, least recently used dropped first once `cap` is reached."""

    __slots__ = ("_cap", "_sessions")

    def __init__(self, cap: int = MAX_SESSIONS) -> None:
        self._cap = cap
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, sid: str | None) -> Session | None:
        if sid is None:
            return None
        session = self._sessions.get(sid)
        if session is not None:
            self._sessions.move_to_end(sid)
        return session

    def get_or_create(self, sid: str | None) -> tuple[str, Session, bool]:
        """Return (id, session, cookie_needed)."""
        if sid is not None and (session := self.get(sid)) is not None:
            return sid, session, False
        cookie_needed = False
        if sid is None or not _SESSION_ID_RE.match(sid):
            sid = secrets.token_urlsafe(16)
            cookie_needed = True
        session = Session()
        self._sessions[sid] = session
        if len(self._sessions) > self._cap:
            self._sessions.popitem(last=False)
        return sid, session, cookie_needed


class State:
    """The per-app mutable state: counters, control overrides, sessions."""

    __slots__ = (
        "name",
        "latency",
        "cpu_ms",
        "capacity",
        "inflight",
        "healthy",
        "pinned_load",
        "sessions",
    )

    def __init__(self, name: str, latency: float, cpu_ms: float, capacity: int) -> None:
        self.name = name
        self.latency = latency
        self.cpu_ms = cpu_ms
        self.capacity = capacity
        self.inflight = 0
        self.healthy = True
        self.pinned_load: float | None = None
        self.sessions = SessionStore()

    def load(self) -> float:
        if self.pinned_load is not None:
            return self.pinned_load
        return self.inflight / self.capacity


_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(ms|s|m|h)")
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART_RE.pattern})+")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

STATE_KEY = web.AppKey("demo_backend_state", State)


def parse_duration(text: str) -> float:
    """'50ms', '2s', '1m', '1h30m' (or a bare '0') -> float seconds, as durations in the config."""
    text = text.strip()
    if text == "0":
        return 0.0
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"not a duration: {text!r} (a number with a unit: 50ms, 2s, 1m, 1h30m)")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(text))


def burn_cpu(ms: float) -> None:
    """Busy-loop on this thread for `ms` milliseconds: it blocks the event loop on purpose,
    which is what a CPU-bound request does to a single-threaded app server."""
    end = time.perf_counter() + ms / 1000.0
    x = 0
    while time.perf_counter() < end:
        for i in range(500):
            x += i * i


def _query_float(request: web.Request, key: str, *, maximum: float) -> float:
    raw = request.query.get(key)
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key} must be a number\n") from None
    if not math.isfinite(value) or value < 0 or value > maximum:
        raise web.HTTPBadRequest(text=f"{key} must be between 0 and {maximum:g}\n")
    return value


def _query_delay(request: web.Request) -> float:
    """`?delay=` in seconds (`0.5`) or as a duration like the config's and --latency's
    (`500ms`, `2s`)."""
    raw = request.query.get("delay")
    if raw is not None and raw.strip() and raw.strip()[-1:].isalpha():
        try:
            value = parse_duration(raw)
        except ValueError:
            raise web.HTTPBadRequest(
                text="delay must be seconds or a duration (500ms, 2s)\n"
            ) from None
        if value > MAX_DELAY_S:
            raise web.HTTPBadRequest(text=f"delay must be between 0 and {MAX_DELAY_S:g}\n")
        return value
    return _query_float(request, "delay", maximum=MAX_DELAY_S)


def _query_int(request: web.Request, key: str, *, default: int | None = None) -> int:
    raw = request.query.get(key)
    if raw is None:
        if default is None:
            raise web.HTTPBadRequest(text=f"missing query parameter {key}\n")
        return default
    if not raw.isdigit():
        raise web.HTTPBadRequest(text=f"{key} must be a non-negative integer\n")
    return int(raw)


def _json(data: Any, status: int = 200, **kwargs: Any) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d) + "\n", **kwargs)


def _local_port(request: web.Request) -> int | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return sockname[1] if sockname else None


def _set_session_cookie(response: web.StreamResponse, sid: str) -> None:
    response.set_cookie(SESSION_COOKIE, sid, path="/", httponly=True, samesite="Lax")


# ---------------------------------------------------------------------------------------------
# Middleware and signals: the accounting every endpoint shares.
# ---------------------------------------------------------------------------------------------


@web.middleware
async def _knobs_and_accounting(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    # The health check is the observer of load, so it does not count itself.
    counted = request.path != "/healthz"
    if counted:
        state.inflight += 1
    try:
        delay = state.latency + _query_delay(request)
        cpu = state.cpu_ms + _query_float(request, "cpu", maximum=MAX_CPU_MS)
        if delay > 0:
            await asyncio.sleep(delay)
        if cpu > 0:
            burn_cpu(cpu)
        return await handler(request)
    finally:
        if counted:
            state.inflight -= 1


async def _add_backend_header(request: web.Request, response: web.StreamResponse) -> None:
    # A signal rather than the middleware so that streamed responses and the router's own
    # 404/405 answers carry the header too.
    response.headers["X-Backend-Name"] = request.app[STATE_KEY].name


# ---------------------------------------------------------------------------------------------
# The visitor's page.
# ---------------------------------------------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{name_html} answered</title>
<style>
  body {{ margin: 0; font-family: system-ui, sans-serif; background: hsl({hue}, 60%, 96%);
         color: #222; display: flex; min-height: 100vh; align-items: center; justify-content: center; }}
  main {{ text-align: center; padding: 2rem; max-width: 40rem; }}
  .label {{ font-size: 1.1rem; text-transform: uppercase; letter-spacing: .1em; color: #555; }}
  h1 {{ font-size: 4.5rem; margin: .3rem 0; color: hsl({hue}, 65%, 35%); word-break: break-all; }}
  .port {{ font-size: 2rem; font-family: ui-monospace, monospace; }}
  .visits {{ font-size: 1.6rem; margin: 2rem 0 1rem; }}
  .visits strong {{ font-size: 3rem; display: block; }}
  p.why {{ font-size: 1.05rem; line-height: 1.5; color: #444; }}
</style>
</head>
<body>
<main>
  <div class="label">This page was served by</div>
  <h1 id="name">{name_html}</h1>
  <div class="port">port <span id="port">{port}</span></div>
  <div class="visits">visits to this server in your session<strong id="visits">{visits}</strong></div>
  <p class="why">This counter lives in the memory of {name_html} alone, so it starts again from 1
  whenever the balancer sends you to another server: that is why sticky sessions exist.</p>
</main>
</body>
</html>
"""


async def index(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    sid, session, cookie_needed = state.sessions.get_or_create(request.cookies.get(SESSION_COOKIE))
    session.visits += 1
    hue = int(hashlib.sha256(state.name.encode()).hexdigest()[:4], 16) % 360
    body = _PAGE.format(
        name_html=html.escape(state.name),
        port=_local_port(request) or "?",
        visits=session.visits,
        hue=hue,
    )
    response = web.Response(text=body, content_type="text/html", charset="utf-8")
    response.headers["Cache-Control"] = "no-store"
    if cookie_needed:
        _set_session_cookie(response, sid)
    return response


# ---------------------------------------------------------------------------------------------
# Health and the controls that steer it.
# ---------------------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    load = round(state.load(), 4)
    body = {
        "status": "ok" if state.healthy else "unhealthy",
        "name": state.name,
        "load": load,
        "inflight": state.inflight,
    }
    return _json(
        body,
        status=200 if state.healthy else 503,
        headers={"X-Backend-Load": repr(load), "Cache-Control": "no-store"},
    )


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="body must be JSON\n") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object\n")
    return data


async def control_health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await _json_object(request)
    healthy = data.get("healthy")
    if not isinstance(healthy, bool):
        raise web.HTTPBadRequest(text='expected {"healthy": true|false}\n')
    state.healthy = healthy
    return _json({"name": state.name, "healthy": state.healthy})


async def control_load(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await _json_object(request)
    if "load" not in data:
        raise web.HTTPBadRequest(text='expected {"load": number|null}\n')
    load = data["load"]
    if load is not None and (
        isinstance(load, bool)
        or not isinstance(load, int | float)
        or not math.isfinite(load)
        or load < 0
    ):
        raise web.HTTPBadRequest(text="load must be a non-negative number or null\n")
    state.pinned_load = None if load is None else float(load)
    return _json({"name": state.name, "pinned_load": state.pinned_load})


# ---------------------------------------------------------------------------------------------
# Helpers for the balancer's integration tests.
# ---------------------------------------------------------------------------------------------


async def echo(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    # Hashed as it streams in: aiohttp's reader pauses the socket past its high-water mark, so
    # a 1 GiB upload costs a few buffers of memory, never the body.
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    version = request.version
    return _json(
        {
            "server": state.name,
            "method": request.method,
            "path": request.raw_path,
            "http_version": f"{version.major}.{version.minor}",
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_sha256": digest.hexdigest(),
            "body_length": length,
        }
    )


async def _write_pattern(response: web.StreamResponse, n: int) -> None:
    full, rest = divmod(n, CHUNK)
    for _ in range(full):
        await response.write(PATTERN)  # write() drains: a slow reader slows us, not our memory
    if rest:
        await response.write(PATTERN[:rest])


async def bytes_(request: web.Request) -> web.StreamResponse:
    n = _query_int(request, "n")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("chunked") in ("1", "true", "yes"):
        response.enable_chunked_encoding()
    else:
        response.content_length = n
    await response.prepare(request)
    if request.method != "HEAD":
        await _write_pattern(response, n)
    await response.write_eof()
    return response


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="status must be 200..599\n")
    if code in (204, 304):
        return web.Response(status=code)
    return web.Response(status=code, text=f"status {code}\n")


async def slow_body(request: web.Request) -> web.StreamResponse:
    n = _query_int(request, "n", default=1024)
    pause = _query_float(request, "pause", maximum=MAX_DELAY_S)
    # Chunked on purpose: with a Content-Length of n the response would be complete before the
    # pause; this way the stall sits inside the body, where a between-bytes timeout must catch it.
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    await _write_pattern(response, n)
    await asyncio.sleep(pause)
    await response.write_eof()
    return response


async def close_mid_body(request: web.Request) -> web.StreamResponse:
    n = _query_int(request, "n", default=1024)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = 2 * n
    response.force_close()
    await response.prepare(request)
    await _write_pattern(response, n)
    transport = request.transport
    if transport is not None:
        # abort() throws away whatever is still buffered, so let the first half reach the
        # kernel first: the client must get exactly n bytes and then lose the connection.
        deadline = time.monotonic() + 10.0
        while transport.get_write_buffer_size() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        transport.abort()
    # aiohttp sees the closed transport when it finishes the response and drops the
    # connection quietly (a raised error would be logged as a 500 for a deliberate act).
    return response


async def set_cookie(request: web.Request) -> web.Response:
    response = web.Response(text="two cookies set\n")
    response.set_cookie("app_a", "1", path="/")
    response.set_cookie("app_b", "2", path="/")
    return response


# ---------------------------------------------------------------------------------------------
# The tiny shop for the locust benchmark.
# ---------------------------------------------------------------------------------------------


async def _form_or_json(request: web.Request) -> dict[str, Any]:
    if request.content_type == "application/json":
        return await _json_object(request)
    return dict(await request.post())


async def login(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await _form_or_json(request)
    user = data.get("user")
    if not isinstance(user, str) or not user.strip() or len(user) > 100:
        raise web.HTTPBadRequest(text="user must be a non-empty string of at most 100 chars\n")
    sid, session, cookie_needed = state.sessions.get_or_create(request.cookies.get(SESSION_COOKIE))
    session.user = user.strip()
    response = _json({"server": state.name, "user": session.user})
    if cookie_needed:
        _set_session_cookie(response, sid)
    return response


async def products(request: web.Request) -> web.Response:
    return _json({"server": request.app[STATE_KEY].name, "products": list(PRODUCTS)})


async def product(request: web.Request) -> web.Response:
    item = PRODUCTS_BY_ID.get(int(request.match_info["id"]))
    if item is None:
        raise web.HTTPNotFound(text="no such product\n")
    return _json({"server": request.app[STATE_KEY].name, "product": item})


def _cart_body(state: State, session: Session | None) -> dict[str, Any]:
    items = []
    total = 0
    for pid, qty in (session.cart if session else {}).items():
        p = PRODUCTS_BY_ID[pid]
        items.append({"product_id": pid, "name": p["name"], "quantity": qty})
        total += p["price_cents"] * qty
    return {
        "server": state.name,
        "user": session.user if session else None,
        "items": items,
        "total_cents": total,
    }


async def cart_add(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await _form_or_json(request)
    try:
        pid = int(data.get("product_id"))  # type: ignore[arg-type]
        qty = int(data.get("quantity", 1))
    except (TypeError, ValueError):
        raise web.HTTPBadRequest(text="product_id and quantity must be integers\n") from None
    if pid not in PRODUCTS_BY_ID:
        raise web.HTTPNotFound(text="no such product\n")
    if not 1 <= qty <= MAX_QUANTITY:
        raise web.HTTPBadRequest(text=f"quantity must be 1..{MAX_QUANTITY}\n")
    sid, session, cookie_needed = state.sessions.get_or_create(request.cookies.get(SESSION_COOKIE))
    session.cart[pid] = min(session.cart.get(pid, 0) + qty, MAX_QUANTITY)
    response = _json(_cart_body(state, session))
    if cookie_needed:
        _set_session_cookie(response, sid)
    return response


async def cart_get(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    session = state.sessions.get(request.cookies.get(SESSION_COOKIE))
    return _json(_cart_body(state, session))


# ---------------------------------------------------------------------------------------------
# Assembly and running.
# ---------------------------------------------------------------------------------------------


def build_app(
    name: str, *, latency: float = 0.0, cpu_ms: float = 0.0, capacity: int = 10
) -> web.Application:
    """The demo app named `name`; `latency` (s) and `cpu_ms` are added to every request, and
    `capacity` in-flight requests count as load 1.0."""
    if capacity < 1:
        raise ValueError("capacity must be at least 1")
    if latency < 0 or cpu_ms < 0:
        raise ValueError("latency and cpu_ms must not be negative")
    app = web.Application(middlewares=[_knobs_and_accounting])
    app[STATE_KEY] = State(name, latency, cpu_ms, capacity)
    app.on_response_prepare.append(_add_backend_header)
    r = app.router
    r.add_get("/", index)
    r.add_get("/healthz", healthz)
    r.add_post("/_control/health", control_health)
    r.add_post("/_control/load", control_load)
    r.add_route("*", "/echo{tail:.*}", echo)
    r.add_get("/bytes", bytes_)
    r.add_get(r"/status/{code:\d{3}}", status)
    r.add_get("/slow-body", slow_body)
    r.add_get("/close-mid-body", close_mid_body)
    r.add_get("/set-cookie", set_cookie)
    r.add_post("/login", login)
    r.add_get("/products", products)
    r.add_get(r"/products/{id:\d{1,9}}", product)
    r.add_post("/cart", cart_add)
    r.add_get("/cart", cart_get)
    return app


async def serve(host: str, port: int, name: str, *, announce: bool = True, **opts: Any) -> None:
    """Serve build_app(name, **opts) on host:port until cancelled. With `announce`, print the
    ready line once the socket is bound (port 0 picks a free port and prints the real one)."""
    app = build_app(name, **opts)
    # A short shutdown_timeout: a demo server that is told to stop should stop, not wait a
    # minute for a /slow-body to finish.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, **HANDLER_ARGS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound_port = runner.addresses[0][1] if runner.addresses else port
        if announce:
            shown_host = f"[{host}]" if ":" in host else host
            print(f"demo-backend {name} listening on http://{shown_host}:{bound_port}", flush=True)
        await asyncio.Event().wait()  # until cancelled
    finally:
        await runner.cleanup()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="balancer demo-backend",
        description="Run one demo app server (a page naming the server, a per-session visit "
        "counter, /healthz reporting load, and test endpoints).",
        epilog="Per request: ?delay=SECONDS or a duration (?delay=500ms) and ?cpu=MS add "
        "latency and CPU work to any path. Endpoints: / (the page), /healthz "
        '(JSON {"load": ...} and X-Backend-Load), /echo, /bytes?n=N, /status/CODE, '
        '/slow-body?n=N&pause=S; POST /_control/health {"healthy": false} and '
        'POST /_control/load {"load": 0.9} (null: measured again) steer the health check.',
    )
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    p.add_argument("--name", help="name shown on the page and in X-Backend-Name (default app-PORT)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--latency",
        type=parse_duration,
        default=0.0,
        metavar="DURATION",
        help="delay added to every request, e.g. 50ms",
    )
    p.add_argument(
        "--cpu-ms", type=float, default=0.0, metavar="N", help="busy CPU work per request (ms)"
    )
    p.add_argument(
        "--capacity",
        type=int,
        default=10,
        metavar="N",
        help="in-flight requests that count as load 1.0 (default 10)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """`balancer demo-backend ...`: run one demo server until SIGTERM/SIGINT, then exit 0."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    if args.capacity < 1:
        parser.error("--capacity must be at least 1")
    if args.cpu_ms < 0 or not math.isfinite(args.cpu_ms):
        parser.error("--cpu-ms must be a non-negative number")
    name = args.name or f"app-{args.port}"
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stopping = False

        def stop() -> None:
            nonlocal stopping
            if not stopping:  # a second Ctrl-C must not interrupt the cleanup of the first
                stopping = True
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        try:
            await serve(
                args.host,
                args.port,
                name,
                latency=args.latency,
                cpu_ms=args.cpu_ms,
                capacity=args.capacity,
            )
        except asyncio.CancelledError:
            if not stopping:
                raise
        except OSError as exc:
            print(
                f"demo-backend {name}: cannot listen on {args.host}:{args.port}: {exc}",
                file=sys.stderr,
            )
            return 1
        return 0

    return uvloop.run(run())


if __name__ == "__main__":
    raise SystemExit(main())
