"""One request and its response: the Exchange, from a parsed request head to the last byte.

An exchange routes its request to a pool, picks a backend (sticky cookie first, then the
pool's strategy), relays the request to an upstream connection and the response back, and
retries another backend when the first fails before answering. It answers on a Downstream:
an HTTP/1.1 client connection (proxy/client.py) frames the response as HTTP/1.1 bytes, as
the methods under "toward the client" do here; an HTTP/2 stream subclasses Exchange and
overrides just those methods to send frames instead.

Size: one class whose methods are the stages of one request (route, pick, connect, relay,
retry, finish); cut into parts, each would reach into the same two dozen fields.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from time import monotonic  # a global, not a module attribute per request
from typing import TYPE_CHECKING, Protocol

from balancer import sticky as sticky_cookie
from balancer.proxy import upstream as up
from balancer.proxy.http import (
    CHUNKED_END,
    CONTINUE_100,
    CRLF,
    HOP_BY_HOP,
    IDEMPOTENT,
    RequestRejected,
    connection_tokens,
    host_without_port,
    local_response,
    valid_host,
)
from balancer.proxy.proxy_protocol import Address
from balancer.proxy.proxy_protocol import encode as encode_proxy_header

if TYPE_CHECKING:
    import ssl

    from balancer.backend import Backend
    from balancer.config import TimeoutsConfig
    from balancer.pool import Pool
    from balancer.proxy.limits import ClientLimits
    from balancer.proxy.routing import Router

log = logging.getLogger("balancer.proxy")

# Request bodies up to this size are kept until the response starts, so that a request
# whose backend fails before answering can be replayed to another backend.
REPLAY_LIMIT = 64 * 1024
# While no backend connection is ready, buffer at most this much body, then pause the client.
CONNECT_BUFFER = 256 * 1024

# Reasons to stop reading from the client; reading resumes when none is left.
PAUSE_PIPELINE = 1  # a request is queued behind the active one
PAUSE_UPSTREAM = 2  # the backend connection's write buffer is full
PAUSE_CONNECTING = 4  # body buffered while the backend connection is being made
PAUSE_DONE = 8  # no more requests will be read on this connection

# Connection options that never remove a header of that name (see Exchange.prepare).
NOT_NOMINABLE = frozenset({b"close", b"keep-alive", b"upgrade", b"content-length", b"host"})

# Request headers the proxy acts on, by lower-cased name; every other header is forwarded
# as it came without further look.
_H_HOP, _H_HOST, _H_LENGTH, _H_XFF, _H_OURS, _H_EXPECT, _H_COOKIE = range(7)
_REQUEST_HEADER_KIND = {
    **dict.fromkeys(HOP_BY_HOP, _H_HOP),
    b"host": _H_HOST,
    b"content-length": _H_LENGTH,
    b"x-forwarded-for": _H_XFF,
    b"x-forwarded-proto": _H_OURS,
    b"x-forwarded-host": _H_OURS,
    b"expect": _H_EXPECT,
    b"cookie": _H_COOKIE,
}
_BLANK_LINE = (b"", b"", b"", b"")


def _drop_lines(lines: list[bytes], names: set[bytes]) -> None:
    """Blank the forwarded header lines (after the request line) whose lower-cased name is in
    `names`, in place: positions stay valid, and a blanked line joins to nothing."""
    for at in range(4, len(lines), 4):
        if lines[at].lower() in names:
            lines[at : at + 4] = _BLANK_LINE


def _names_other_host(host_values: list[bytes], authority: bytes) -> bool:
    """Some Host header names another host than the request target's authority.
    (A function of its own: a compiled cpdef method can't hold a generator expression.)"""
    want = authority.lower()
    return any(h.strip().lower() != want for h in host_values)


class Site(Protocol):
    """What an exchange and its client connection read of their listener: the listener's
    shared, swappable state (a reload replaces these by assignment)."""

    name: str
    scheme: bytes  # b"http" | b"https"
    redirect: bytes | None  # "https://{host}:8443" for a redirecting listener
    draining: bool
    rejected: int
    max_head: int
    connections: set
    ssl_context: ssl.SSLContext | None
    router: Router | None
    limits: ClientLimits
    timeouts: TimeoutsConfig
    upstreams: up.Upstreams
    watchdog: up.Watchdog
    observer: Observers
    h2_protocol: Callable[[Site, str], asyncio.Protocol] | None

    def loop_time(self) -> float: ...


class Observers(Protocol):
    """Where finished and failed requests are reported (proxy/observe.py's Observer)."""

    def request_done(self, ex: Exchange, broken: bool = False) -> None: ...
    def backend_failed(self, ex: Exchange, backend: Backend, kind: str) -> None: ...
    def retried(self, ex: Exchange, backend: Backend) -> None: ...


class Downstream(Protocol):
    """The client side an exchange answers on (proxy/client.py's ClientProtocol)."""

    listener: Site
    client_ip: str
    client_ip_b: bytes
    closed: bool
    closing: bool
    write_paused: bool

    def pause(self, reason: int) -> None: ...
    def resume(self, reason: int) -> None: ...
    def write(self, data: bytes) -> None: ...
    def writelines(self, parts: Iterable[bytes]) -> None: ...
    def exchange_done(self, ex: Exchange) -> None: ...
    def exchange_broken(self, ex: Exchange) -> None: ...
    def tunnel_opened(self, ex: Exchange, conn: up.UpstreamConnection) -> bool: ...
    def tunnel_relayed(self) -> None: ...
    def tunnel_ended(self) -> None: ...
    def addresses(self) -> tuple[Address, Address] | None: ...


class Exchange:
    """One request and its response, from the parsed head to the last response byte.

    Also the request context the strategies read (client_ip, path, header(), cookie()).
    """

    __slots__ = (
        "client",
        "listener",
        "client_ip",
        # the request
        "method",
        "url",
        "version",
        "headers",
        "keep_alive",
        "is_head",
        "host",
        "chunked",
        "content_length",
        "body_received",
        "expect_continue",
        "upgrade",
        "fwd_head",
        "needs_host",
        "prepared",
        "request_complete",
        "sticky_tag",
        "sticky_hit",
        "early_tunnel_data",
        # proxying
        "pool",
        "backend",
        "backend_name",
        "conn",
        "tried",
        "attempts",
        "body_buf",
        "body_buf_size",
        "replayable",
        "body_sent",
        "stale_retry",
        "timed_out",
        "gone",
        "proxy_header",
        # the response
        "local",
        "local_status",
        "response_started",
        "status",
        "rechunk",
        "client_close",
        "bytes_out",
        "started_at",
        "finished",
        "set_cookie",
        "held",
    )

    def __init__(self, client: Downstream) -> None:
        self.client = client
        self.listener = client.listener
        self.client_ip = client.client_ip
        self.method = b""
        self.url = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.is_head = False
        self.host = b""
        self.chunked = False
        self.content_length = -1
        self.body_received = 0
        self.expect_continue = False
        self.upgrade = False
        self.fwd_head = b""
        self.needs_host = False
        self.prepared = False
        self.request_complete = False
        self.sticky_tag: bytes | None = None
        self.sticky_hit = False  # the backend came from a valid sticky cookie: no new cookie
        self.early_tunnel_data: list[bytes] = []
        self.pool: Pool | None = None
        self.backend: Backend | None = None
        self.backend_name = "-"  # the last backend tried, for the access log
        self.conn: up.UpstreamConnection | None = None
        self.tried: list[Backend] = []
        self.attempts = 0
        self.body_buf: list[bytes] = []
        self.body_buf_size = 0
        self.replayable = True
        self.body_sent = False
        self.stale_retry = True
        self.timed_out = False
        self.gone = False
        self.proxy_header = b""  # the PROXY header a new backend connection opens with
        self.local: bytes | None = None
        self.local_status = 0
        self.response_started = False
        self.status = 0
        self.rechunk = False
        self.client_close = False
        self.bytes_out = 0
        self.started_at = monotonic()
        self.finished = False
        self.set_cookie: bytes | None = None
        # the response head, held back to leave in the same write() as the first body
        # bytes: one syscall instead of two per small response
        self.held: bytes | None = None

    # -- request context for strategies ----------------------------------------------------

    @property
    def path(self) -> str:
        url = self.url
        q = url.find(b"?")
        return (url[:q] if q >= 0 else url).decode("latin-1")

    def header(self, name: str) -> str | None:
        want = name.lower().encode()
        for n, v in self.headers:
            if n.lower() == want:
                return v.decode("latin-1")
        return None

    def cookie(self, name: str) -> str | None:
        want = name.encode()
        for n, v in self.headers:
            if n.lower() == b"cookie":
                found = sticky_cookie.find_cookie(v, want)
                if found is not None:
                    return found.decode("latin-1")
        return None

    # -- request ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Validate the head, route it, and build the head sent to backends (RFC 9112)."""
        client = self.client
        listener = self.listener
        method = self.method
        self.is_head = method == b"HEAD"
        if method == b"CONNECT":
            raise RequestRejected(405, "CONNECT is not supported")
        if self.version != "1.1" and self.version != "1.0":
            # llhttp also accepts HTTP/0.9 request lines and HTTP/2.0 as a version; neither
            # can be forwarded as the HTTP/1.1 request the backend would be sent
            raise RequestRejected(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        # One pass: ordinary headers go straight into the forwarded lines (four items each,
        # so a header's lines can be blanked in place); the few the proxy acts on are
        # classified by one dict lookup instead of a chain of comparisons.
        lines = [method, b" ", self.url, b" HTTP/1.1\r\n"]  # the request line, then headers
        host_values: list[bytes] = []
        conn_values: list[bytes] = []
        xff: list[bytes] = []
        cookie_at: list[int] = []  # positions in `lines` of Cookie headers
        te = None
        expect = None
        upgrade_value = None
        kinds = _REQUEST_HEADER_KIND
        for name, value in self.headers:
            lname = name.lower()
            kind = kinds.get(lname)
            if kind is not None:
                if kind == _H_HOP:
                    if lname == b"connection":
                        conn_values.append(value)
                    elif lname == b"transfer-encoding":
                        te = value if te is None else te + b"," + value
                    elif lname == b"upgrade":
                        upgrade_value = value
                    continue
                if kind == _H_HOST:
                    host_values.append(value)
                elif kind == _H_LENGTH:
                    self.content_length = int(value)
                elif kind == _H_XFF:
                    xff.append(value)
                    continue
                elif kind == _H_OURS:
                    continue  # X-Forwarded-Proto/-Host: set by the balancer, never trusted
                elif kind == _H_EXPECT:
                    expect = value
                    continue
                else:  # _H_COOKIE
                    cookie_at.append(len(lines))
            lines += (name, b": ", value, CRLF)
        if len(host_values) > 1:
            raise RequestRejected(400, "more than one Host header")

        url = self.url
        if url[:1] != b"/" and url != b"*":
            # absolute-form target: its authority replaces Host (RFC 9112 3.2.2)
            scheme_end = url.find(b"://")
            if scheme_end < 0:
                raise RequestRejected(400, "invalid request target")
            if url[:scheme_end].lower() not in (b"http", b"https"):
                raise RequestRejected(400, "invalid request target")
            rest = url[scheme_end + 3 :]
            slash = rest.find(b"/")
            authority = rest if slash < 0 else rest[:slash]
            # RFC 9112 3.2.2 lets the target's authority override Host; a backend (or a cache
            # in front of it) that reads Host instead would see another site, so a request
            # naming two different hosts is refused rather than silently re-pointed
            if self.version == "1.1" and not host_values:
                raise RequestRejected(400, "missing Host header")
            if _names_other_host(host_values, authority):
                raise RequestRejected(400, "Host header does not match the request target")
            self.url = url = b"/" if slash < 0 else rest[slash:]
            host_values = [authority]
            _drop_lines(lines, {b"host"})
            lines[2] = url
            lines[4:4] = (b"Host", b": ", authority, CRLF)
            cookie_at = [i + 4 for i in cookie_at]
        if host_values:
            if not valid_host(host_values[0]):
                raise RequestRejected(400, "invalid Host header")
            self.host = host_values[0]
        elif self.version == "1.1":
            raise RequestRejected(400, "missing Host header")
        else:
            self.needs_host = True

        if te is not None:
            if self.version == "1.0":
                # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing
                raise RequestRejected(400, "Transfer-Encoding in an HTTP/1.0 request")
            if te.strip().lower() != b"chunked":
                raise RequestRejected(501, "unsupported transfer coding")
            self.chunked = True
        limits = listener.limits.config
        if limits.max_body_bytes and self.content_length > limits.max_body_bytes:
            raise RequestRejected(413, "request body too large")
        if expect is not None:
            if expect.strip().lower() != b"100-continue":
                raise RequestRejected(417, "unsupported expectation")
            self.expect_continue = self.version == "1.1"
        tokens = connection_tokens(conn_values) if conn_values else None
        if tokens:
            # Connection may drop end-to-end headers, but never the ones the forwarded framing
            # and routing rest on: "Connection: content-length" would send the body without
            # its length (the backend reading it as a second, smuggled request), and
            # "Connection: host" an HTTP/1.1 request without Host
            named = tokens - NOT_NOMINABLE
            if named:
                _drop_lines(lines, named)
        if upgrade_value is not None and tokens and b"upgrade" in tokens:
            self.upgrade = True

        # -- local answers that need no backend --
        if listener.redirect is not None:
            target = listener.redirect.replace(b"{host}", host_without_port(self.host))
            self.local = local_response(
                301,
                headers=[(b"Location", target + url)],
                close=not self.keep_alive,
                head_only=False,
            )
            self.local_status = 301
            self.prepared = True
            return
        wait = listener.limits.retry_after(client.client_ip, listener.loop_time())
        if wait:
            self.local = local_response(
                429,
                "rate limit exceeded",
                headers=[(b"Retry-After", b"%d" % max(1, round(wait + 0.5)))],
            )
            self.local_status = 429
            self.client_close = True
            self.prepared = True
            return
        router = listener.router
        pool = router.match(host_without_port(self.host) if router.uses_host else b"", url)
        if pool is None:
            self.local = local_response(
                404, "no route for this host and path", close=not self.keep_alive
            )
            self.local_status = 404
            self.prepared = True
            return
        self.pool = pool

        # -- the head for the backend --
        codec = pool.sticky
        if codec is not None:
            for at in cookie_at:
                value = lines[at + 2]
                if not value:
                    continue  # dropped above (named by Connection)
                prefix = pool.sticky_cookie_prefix
                # find(), not `in`: bytes' `in` tries the needle as an int first and formats
                # an exception for it
                if value.startswith(prefix) and value.find(b";") < 0:
                    # the usual case: the header carries only the balancer's cookie
                    found: bytes | None = value[len(prefix) :].strip()
                    value = None
                else:
                    found = sticky_cookie.find_cookie(value, pool.sticky_cookie_name)
                    if found is not None:
                        value = sticky_cookie.strip_cookie(value, pool.sticky_cookie_name)
                if found is not None and self.sticky_tag is None:
                    self.sticky_tag = codec.decode(found, time.time())  # type: ignore[attr-defined]
                if value is None:
                    lines[at : at + 4] = _BLANK_LINE
                else:
                    lines[at + 2] = value
        xff.append(client.client_ip_b)
        lines += (b"X-Forwarded-For: ", b", ".join(xff), CRLF)
        lines += (b"X-Forwarded-Proto: ", listener.scheme, CRLF)
        if self.host:
            lines += (b"X-Forwarded-Host: ", self.host, CRLF)
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        if self.upgrade:
            lines += (b"Connection: upgrade\r\nUpgrade: ", upgrade_value, CRLF)
        lines.append(CRLF)
        self.fwd_head = b"".join(lines)
        self.prepared = True

    def request_body(self, data: bytes) -> None:
        """Body bytes from the client, already framed for the backend."""
        if self.finished or self.gone:
            return
        conn = self.conn
        if conn is not None:
            conn.send(data)
            self.body_sent = True
            if not self.replayable:
                return
        self.body_buf.append(data)
        self.body_buf_size += len(data)
        if conn is not None:
            if self.body_buf_size > REPLAY_LIMIT:
                self.replayable = False
                self.body_buf.clear()
        elif self.body_buf_size > CONNECT_BUFFER:
            self.replayable = False
            self.client.pause(PAUSE_CONNECTING)

    def request_done(self) -> None:
        self.request_complete = True
        if self.conn is not None:
            self.conn.request_sent()

    # -- dispatch --------------------------------------------------------------------------

    def start(self) -> None:
        """Called when this exchange becomes the connection's active one."""
        if self.local is not None:
            self._send_local(self.local, self.local_status)
            return
        client = self.client
        if client.closed:
            return
        if client.closing:
            self.client_close = True
        if self.expect_continue and not self.request_complete:
            self._send_continue()
        self.dispatch()

    def _send_continue(self) -> None:
        self.client.write(CONTINUE_100)

    def dispatch(self) -> None:
        pool = self.pool
        assert pool is not None
        b = None
        tried = self.tried
        if pool.sticky is not None:
            if self.sticky_tag is not None:
                b = pool.sticky_backend(self.sticky_tag, tried)
                if b is not None:
                    pool.sticky_hits += 1
                elif not tried:
                    pool.sticky_repins += 1  # pinned backend down, draining or removed
            elif not tried:
                pool.sticky_misses += 1
            self.sticky_hit = b is not None
        if b is None:
            b = pool.select(self, tried)
        if b is None:
            if not tried and pool.all_full():
                asyncio.get_running_loop().create_task(self._queue_for_capacity(pool))
                return
            if tried:
                self._fail(504 if self.timed_out else 502, "no backend could answer")
            else:
                self._fail(503, "no healthy backend")
            return
        self.attempts += 1
        self.backend = b
        self.backend_name = b.name
        pool.begin(b)
        conns = self.listener.upstreams.for_backend(b, pool.h2_backends)
        if pool.send_proxy:
            # the backend learns the client's address from a PROXY header, once per
            # connection: only a connection opened with this client's header will do
            addrs = self.client.addresses()
            src, dst = addrs if addrs is not None else (None, None)
            self.proxy_header = encode_proxy_header(pool.send_proxy, src, dst)
            conn = conns.acquire_idle(self.proxy_header)
        else:
            self.proxy_header = b""
            conn = conns.acquire_idle()
        if conn is not None:
            self._attach(conn)
        else:
            asyncio.get_running_loop().create_task(self._connect(conns, b))

    async def _queue_for_capacity(self, pool: Pool) -> None:
        ok = await pool.wait_for_capacity(pool.config.queue.timeout)
        if self.gone:
            return
        if ok:
            self.dispatch()
        else:
            self._fail(503, "all backends are at their connection limit")

    async def _connect(self, conns: up.BackendConnections, b: Backend) -> None:
        try:
            header = self.proxy_header
            conn = await (conns.connect(header) if header else conns.connect())
        except (TimeoutError, OSError) as e:
            if isinstance(e, asyncio.TimeoutError):
                self.timed_out = True
            if self.gone:
                self.pool.release(b, failed=True)  # type: ignore[union-attr]
                return
            self._backend_failed(up.FAIL_CONNECT, e)
            return
        if self.gone or self.backend is not b:
            # the client left while we connected: keep the fresh connection for the next one
            conns.release(conn)
            if self.backend is b:
                self.pool.release(b)  # type: ignore[union-attr]
                self.backend = None
            return
        self._attach(conn)

    def _attach(self, conn: up.UpstreamConnection) -> None:
        self.conn = conn
        conn.exchange = self
        head = self.fwd_head
        if self.needs_host:
            b = self.backend
            head = head[:-2] + b"Host: " + b.address.encode() + b"\r\n\r\n"  # type: ignore[union-attr]
        if self.body_buf:
            conn.send(head + b"".join(self.body_buf))
            self.body_sent = True
            if not self.replayable or self.body_buf_size > REPLAY_LIMIT:
                self.replayable = False
                self.body_buf.clear()
        else:
            conn.send(head)
        client = self.client
        if client.write_paused:
            conn.pause_reading()
        client.resume(PAUSE_CONNECTING)
        if self.request_complete:
            conn.request_sent()

    # -- callbacks from the upstream connection --------------------------------------------

    def upstream_failed(self, kind: str, reused: bool, exc: BaseException | None) -> None:
        """The backend connection failed before any response byte arrived."""
        self.conn = None
        if self.gone:
            if self.backend is not None:
                self.pool.release(self.backend)  # type: ignore[union-attr]
                self.backend = None
            return
        b = self.backend
        can_replay = self.replayable or not self.body_sent
        if kind == up.FAIL_RESET and reused and self.stale_retry and can_replay:
            # a pooled keep-alive connection the backend had already closed: not the
            # backend's fault, and it never saw the request; try once on a fresh connection
            self.stale_retry = False
            conns = self.listener.upstreams.for_backend(b, self.pool.h2_backends)  # type: ignore[arg-type,union-attr]
            asyncio.get_running_loop().create_task(self._connect(conns, b))  # type: ignore[arg-type]
            return
        if kind == up.FAIL_TIMEOUT:
            self.timed_out = True
        self._backend_failed(kind, exc)

    def _backend_failed(self, kind: str, exc: BaseException | None) -> None:
        b = self.backend
        pool = self.pool
        assert b is not None and pool is not None
        self.backend = None
        pool.release(b, failed=True)
        self.tried.append(b)
        self.listener.observer.backend_failed(self, b, kind)
        log.info(
            "%s %s: backend %s (%s) failed (%s: %s)",
            self.method.decode("latin-1"),
            self.url[:200].decode("latin-1"),
            b.name,
            b.address,
            kind,
            exc,
        )
        can_replay = self.replayable or not self.body_sent
        retryable = can_replay and (
            kind == up.FAIL_CONNECT
            or (kind in (up.FAIL_RESET, up.FAIL_PROTOCOL) and self.method in IDEMPOTENT)
        )
        if retryable and self.attempts <= pool.config.retries:
            self.listener.observer.retried(self, b)
            if self.body_buf and self.body_sent:
                self.body_sent = False  # the replay buffer goes out whole to the next backend
            self.dispatch()
            return
        if kind == up.FAIL_TIMEOUT or self.timed_out:
            self._fail(504, "backend too slow")
        else:
            self._fail(502, "backend failed before answering")

    def upstream_broken(self, why: str) -> None:
        """The backend failed mid-response: the client must not see a complete-looking one."""
        self.conn = None
        b = self.backend
        if b is not None:
            self.pool.release(b, failed=True)  # type: ignore[union-attr]
            self.backend = None
        log.warning(
            "%s %s: %s; closing client connection",
            self.method.decode(),
            self.url[:200].decode("latin-1"),
            why,
        )
        self.status = self.status or 502
        self.finished = True
        self.listener.observer.request_done(self, broken=True)
        self.client.exchange_broken(self)

    def upstream_pause_writing(self) -> None:
        self.client.pause(PAUSE_UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self.client.resume(PAUSE_UPSTREAM)

    def response_head(self, conn: up.UpstreamConnection, *, has_body: bool, rechunk: bool) -> None:
        client = self.client
        self.response_started = True
        self.status = status = conn.status
        self.body_buf.clear()
        self.replayable = False
        close = (
            client.closing
            or not self.keep_alive
            or self.listener.draining
            or not self.request_complete
            or self.client_close
        )
        http10 = self.version == "1.0"
        if has_body and rechunk and http10:
            rechunk = False
            close = True  # a 1.0 client reads this body until the connection closes
        self.rechunk = has_body and rechunk
        head = conn.head_out
        if self.rechunk:
            head += b"Transfer-Encoding: chunked\r\n"
        pool = self.pool
        if pool is not None and pool.sticky is not None and status != 101:
            b = self.backend
            if b is not None and not self.sticky_hit:
                self.set_cookie = pool.sticky_cookie_header(
                    b, secure=self.listener.scheme == b"https"
                )
                head += b"Set-Cookie: " + self.set_cookie + CRLF
        if status != 101:
            if close:
                head += b"Connection: close\r\n\r\n"
            elif http10:
                head += b"Connection: keep-alive\r\n\r\n"
            else:
                head += CRLF
        else:
            head += CRLF
        self.client_close = close
        self.bytes_out += len(head)
        if has_body and status != 101:
            self.held = head
        else:
            client.write(head)

    def response_body(self, data: bytes) -> None:
        if not data:
            return
        if self.rechunk:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self.bytes_out += len(data)
        held = self.held
        if held is not None:
            self.held = None
            if len(data) <= up.VIEW_OVER:
                data = held + data
            else:
                # head and first body bytes leave in one writev, without copying the body
                self.client.writelines((held, data))
                return
        self.client.write(data)

    def response_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """Trailers from an HTTP/2 backend: an HTTP/1.1 client, whose body is re-chunked
        without a trailer section, does not get them."""

    def response_done(self, reusable: bool) -> None:
        self.conn = None
        tail = b""
        if self.rechunk:
            tail = CHUNKED_END
            self.bytes_out += 5
        if self.held is not None:
            tail = self.held + tail  # a response whose body turned out empty
            self.held = None
        if tail:
            self.client.write(tail)
        b = self.backend
        if b is not None:
            self.pool.release(b, failed=self.status >= 500)  # type: ignore[union-attr]
        self._finish()

    # -- upgrade (WebSocket) ---------------------------------------------------------------

    def tunnel_open(self, conn: up.UpstreamConnection) -> bool:
        if not self.client.tunnel_opened(self, conn):
            conn.close()
            return False
        for data in self.early_tunnel_data:
            conn.send(data)
        self.early_tunnel_data.clear()
        return True

    def tunnel_from_upstream(self, data: bytes) -> None:
        self.bytes_out += len(data)
        client = self.client
        client.tunnel_relayed()
        client.write(data)

    def tunnel_closed(self) -> None:
        self.conn = None
        b = self.backend
        if b is not None:
            self.pool.release(b)  # type: ignore[union-attr]
            self.backend = None
        if not self.finished:
            self.finished = True
            self.listener.observer.request_done(self)
        self.client.tunnel_ended()

    # -- endings ---------------------------------------------------------------------------

    def abandon_upstream(self) -> None:
        """The client's request turned out bad mid-body: drop the half-sent request."""
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.abort()
        if self.backend is not None:
            self.pool.release(self.backend)  # type: ignore[union-attr]
            self.backend = None
        self.gone = True

    def client_gone(self) -> None:
        """The client closed its connection while this exchange was active."""
        if self.gone:
            return
        self.gone = True
        conn = self.conn
        self.conn = None
        if conn is not None:
            if conn.state == up.TUNNEL:
                conn.close()
            else:
                conn.abort()  # a response is in flight on it: it can't be reused
        if self.backend is not None and self.pool is not None:
            self.pool.release(self.backend)
            self.backend = None
        if not self.finished:
            self.finished = True
            self.status = self.status or 499
            self.listener.observer.request_done(self, broken=True)

    def _fail(self, status: int, detail: str) -> None:
        self.client_close = self.client_close or not self.request_complete or not self.keep_alive
        self._send_local(local_response(status, detail, close=self.client_close), status)

    def _send_local(self, data: bytes, status: int) -> None:
        self.status = status
        self.response_started = True
        client = self.client
        if not client.closed:
            if self.is_head:
                data = data[: data.find(b"\r\n\r\n") + 4]
            self.bytes_out += len(data)
            client.write(data)
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.listener.observer.request_done(self)
        self.client.exchange_done(self)
