"""Upstream side: one backend connection (response parsing, raw body relay) and idle pools.

A connection belongs to at most one exchange at a time. Between exchanges it waits in its
backend's idle stack (last in, first out: the warmest connection is reused first) until it is
reused, closed by the backend, or closed by the idle sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import httptools
from httptools import HttpResponseParser  # a global, not a module attribute per response

from balancer.backend import parse_load
from balancer.proxy.http import CRLF, HOP_BY_HOP

if TYPE_CHECKING:
    from balancer.backend import Backend

log = logging.getLogger("balancer.proxy")

MAX_RESPONSE_HEAD = 65536
# Body bytes beyond this size are passed on as memoryviews rather than copied slices.
VIEW_OVER = 4096

# Header lines that send a lower-cased head down the full parse: the hop-by-hop ones other
# than Connection (chunked framing, upgrades, and the rest are rare), and the backend's load
# report, which is read and kept from the client. (One regex search: cheaper than seven
# `in` tests, each of which first tries the needle as an int and formats an exception.)
_FULL_PARSE = re.compile(
    rb"\r\n(?:keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade"
    rb"|x-backend-load):"
)


class _HeadCheck:
    """A parser protocol with no callbacks: llhttp validates the head and calls nothing.
    (No instance dict: the parser's lookups of its nine callbacks fail sooner.)"""

    __slots__ = ()


_HEAD_CHECK = _HeadCheck()

# What the response body looks like on the wire, decided once its head is parsed.
HEAD = 0  # reading the response head
BODY_LENGTH = 1  # Content-Length: bytes relayed raw, counted down (the fast path)
BODY_CHUNKED = 2  # chunked: the parser finds the end; chunks re-framed for the client
BODY_EOF = 3  # neither: the body ends when the backend closes
TUNNEL = 4  # after 101 Switching Protocols: bytes spliced both ways
DONE = 5

# Why an exchange lost its backend connection.
FAIL_CONNECT = "connect"  # never connected: the request was not sent
FAIL_RESET = "reset"  # closed or reset before any response byte
FAIL_TIMEOUT = "timeout"  # no response (or no next byte) within timeouts.backend
FAIL_PROTOCOL = "protocol"  # the backend's answer was not valid HTTP


class Relay(Protocol):
    """What a backend connection reports to: the exchange it serves (proxy/exchange.py)."""

    backend: Backend | None
    is_head: bool
    upgrade: bool

    def response_head(self, conn: UpstreamConnection, *, has_body: bool, rechunk: bool) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_done(self, reusable: bool) -> None: ...
    def upstream_failed(self, kind: str, reused: bool, exc: BaseException | None) -> None: ...
    def upstream_broken(self, why: str) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...
    def tunnel_open(self, conn: UpstreamConnection) -> bool: ...
    def tunnel_from_upstream(self, data: bytes) -> None: ...
    def tunnel_closed(self) -> None: ...
    def response_trailers(self, fields: list[tuple[bytes, bytes]]) -> None: ...


class UpstreamConnection:
    """One keep-alive connection to a backend: an asyncio protocol.

    It does not inherit asyncio.Protocol: compiled, it is a C type (upstream.pxd), which
    can't inherit a Python class; the loop needs only the methods."""

    # the response fields as a list, where a backend gave them so (HTTP/2): None here, the
    # head is bytes (head_out)
    h2_fields = None

    __slots__ = (
        "pool",
        "transport",
        "exchange",
        "reused",
        "closed",
        "idle_since",
        "deadline",
        "proxy_key",
        # response parsing
        "state",
        "head_buf",
        "parser",
        "status",
        "reason",
        "headers",
        "hop",
        "conn_named",
        "content_length",
        "chunked",
        "conn_close",
        "upgrade_header",
        "remaining",
        "received_any",
        "message_complete",
        "head_out",
    )

    def __init__(self, pool: BackendConnections, proxy_header: bytes = b"") -> None:
        self.pool = pool
        # the PROXY header this connection opened with (send_proxy_protocol), b"" for none:
        # it names one client, so the connection is reused only for that client (see
        # BackendConnections)
        self.proxy_key = proxy_header
        self.transport: asyncio.Transport | None = None
        self.exchange: Relay | None = None
        self.reused = False
        self.closed = False
        self.idle_since = 0.0
        self.deadline = 0.0  # loop time after which the watchdog calls on_deadline()
        self._reset_response()

    def _reset_response(self) -> None:
        self.state = HEAD
        self.head_buf = b""
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []  # end-to-end headers only
        self.hop: list[tuple[bytes, bytes, bytes]] | None = None  # hop-by-hop, set aside
        self.conn_named = False  # Connection names headers beyond close/keep-alive
        self.content_length = -1
        self.chunked = False
        self.conn_close = False
        self.upgrade_header = False
        self.remaining = 0
        self.received_any = False
        self.message_complete = False
        # the status line and end-to-end header lines for the client, CRLF after each
        self.head_out = b""

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.proxy_key:
            transport.write(self.proxy_key)  # type: ignore[attr-defined]  # before any request
        # registered once for its whole life: deadline 0 means nothing to enforce
        self.pool.watchdog.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.watchdog.discard(self)
        ex = self.exchange
        if ex is None:
            self.pool.forget(self)
            return
        self.exchange = None
        state = self.state
        if state == BODY_EOF:
            ex.response_done(reusable=False)
        elif state in (TUNNEL, DONE):
            ex.tunnel_closed()
        elif not self.received_any:
            ex.upstream_failed(FAIL_RESET, self.reused, exc)
        else:
            ex.upstream_broken("backend closed the connection mid-response")

    def eof_received(self) -> bool | None:
        return None  # the transport closes, and connection_lost tells the exchange

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_resume_writing()

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # an idle keep-alive connection has nothing to say; whatever it sent is junk
            self.transport.close()  # type: ignore[union-attr]
            return
        self.received_any = True
        state = self.state
        if state == BODY_LENGTH:
            self.deadline = self.pool.loop_time() + self.pool.backend_timeout
            n = len(data)
            if n < self.remaining:
                self.remaining -= n
                ex.response_body(data)
            else:
                extra = n > self.remaining
                if extra:
                    data = data[: self.remaining]
                self.remaining = 0
                ex.response_body(data)
                self._finish(reusable=not extra)
        elif state == HEAD:
            self.deadline = self.pool.loop_time() + self.pool.backend_timeout
            self._head_data(data)
        elif state == BODY_CHUNKED:
            self.deadline = self.pool.loop_time() + self.pool.backend_timeout
            self._feed(data)
            if self.message_complete:
                self._finish(reusable=True)
        elif state == BODY_EOF:
            self.deadline = self.pool.loop_time() + self.pool.backend_timeout
            ex.response_body(data)
        elif state == TUNNEL:
            ex.tunnel_from_upstream(data)

    # -- response head ---------------------------------------------------------------------

    def _head_data(self, data: bytes) -> None:
        if self.head_buf:
            data = self.head_buf + data
            self.head_buf = b""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_RESPONSE_HEAD:
                self._protocol_error("response head too large")
            else:
                self.head_buf = data
            return
        end += 4
        head = data[:end]
        low = head.lower()
        if _FULL_PARSE.search(low) is None:
            if not self._plain_head(head, low):
                return
        elif not self._full_head(head):
            return
        if self.status == 0:
            self._protocol_error("incomplete response head")
            return
        if 100 <= self.status < 200 and self.status != 101:
            # interim response (100 Continue, 103 Early Hints): the balancer handles
            # Expect itself, so drop it and read the final response
            self._reset_response()
            self.received_any = True
            rest = data[end:]
            if rest:
                self._head_data(rest)
            return
        # the body bytes that came with the head go on as a view: copying a 64 KiB read
        # costs more than the rest of relaying it
        self._start_body(data[end:] if len(data) - end < VIEW_OVER else memoryview(data)[end:])

    def _plain_head(self, head: bytes, low: bytes) -> bool:
        """The common response head, with no hop-by-hop header but Connection: keep-alive or
        close: validated by llhttp without a callback per header, then forwarded as the
        backend sent it minus its Connection line (no parse into a list and join back)."""
        parser = HttpResponseParser(_HEAD_CHECK)
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass  # a 101: handled as such by _start_body
        except httptools.HttpParserError as e:
            self._protocol_error(f"invalid response: {e}")
            return False
        self.status = status = parser.get_status_code()
        if not parser.should_keep_alive():
            # llhttp's verdict covers HTTP/1.0 without keep-alive and bodies ending at EOF
            self.conn_close = True
        at = low.find(b"\r\ncontent-length:")
        if at >= 0:
            # llhttp has refused a second Content-Length or a value that is not all digits
            self.content_length = int(low[at + 17 : low.find(b"\r\n", at + 17)])
        at = low.find(b"\r\nconnection:")
        if at >= 0:
            line_end = low.find(b"\r\n", at + 13)
            value = low[at + 13 : line_end].strip()
            if value == b"close":
                self.conn_close = True
            elif value != b"keep-alive" or low.find(b"\r\nconnection:", line_end) >= 0:
                # options naming other headers, or several Connection lines: the full parse
                # knows how to strip what they name
                self._reset_response()
                return self._full_head(head)
            head = head[:at] + head[line_end:]
        line_end = head.find(b"\r\n")
        if head.startswith(b"HTTP/1.1 ") and line_end > 13:
            self.head_out = head[:-2]
        else:
            # HTTP/1.0 or an empty reason phrase: the status line is rewritten
            reason = head[13:line_end] if line_end > 13 else b"-"
            self.head_out = b"HTTP/1.1 %d %b%b" % (status, reason, head[line_end:-2])
        return True

    def _full_head(self, head: bytes) -> bool:
        """Any response head: parsed header by header (hop-by-hop ones set aside, the ones
        Connection names stripped), then joined back for the client. False when the
        response turned out invalid (the exchange has been told)."""
        self.parser = HttpResponseParser(self)
        self._feed(head)
        if self.state != HEAD or self.exchange is None:
            return False
        parts = [b"HTTP/1.1 %d " % self.status, self.reason or b"-", CRLF]
        for name, value in self.client_headers():
            parts += (name, b": ", value, CRLF)
        self.head_out = b"".join(parts)
        return True

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade:
            # llhttp stops after the head of a 101 (it is not an HttpParserError): the head
            # is complete and _start_body turns the connection into a tunnel
            pass
        except httptools.HttpParserError as e:
            self._protocol_error(f"invalid response: {e}")

    def _protocol_error(self, why: str) -> None:
        ex = self.exchange
        self.exchange = None
        self.transport.abort()  # type: ignore[union-attr]
        if ex is not None:
            if self.state == HEAD:
                ex.upstream_failed(FAIL_PROTOCOL, self.reused, ValueError(why))
            else:
                ex.upstream_broken(why)

    def _start_body(self, rest: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        status = self.status
        if status == 101:
            if not ex.upgrade:
                self._protocol_error("101 Switching Protocols without an upgrade request")
                return
            self.state = TUNNEL
            self.pool.watchdog.discard(self)
            ex.response_head(self, has_body=False, rechunk=False)
            if ex.tunnel_open(self) and rest:
                ex.tunnel_from_upstream(rest)
            return
        no_body = ex.is_head or status == 204 or status == 304
        if no_body:
            ex.response_head(self, has_body=False, rechunk=False)
            self._finish(reusable=not rest and not self.conn_close)
        elif self.chunked:
            self.state = BODY_CHUNKED
            self.message_complete = False
            ex.response_head(self, has_body=True, rechunk=True)
            if rest and self.exchange is ex:
                self._feed(rest)
                if self.message_complete:
                    self._finish(reusable=True)
        elif self.content_length >= 0:
            self.remaining = self.content_length
            ex.response_head(self, has_body=True, rechunk=False)
            if self.exchange is not ex:
                return
            if self.remaining == 0:
                self._finish(reusable=not rest)
            else:
                self.state = BODY_LENGTH
                if rest:
                    self.data_received(rest)
        else:
            self.state = BODY_EOF
            self.conn_close = True
            ex.response_head(self, has_body=True, rechunk=True)
            if rest and self.exchange is ex:
                ex.response_body(rest)

    def _finish(self, reusable: bool) -> None:
        ex = self.exchange
        self.state = DONE
        self.exchange = None
        self.deadline = 0.0
        if reusable and not self.conn_close:
            self.pool.release(self)
        else:
            self.close()
        if ex is not None:
            ex.response_done(reusable=reusable)

    # -- httptools callbacks (response head, and chunked bodies) ---------------------------

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # hop-by-hop headers are set aside as they arrive, so the end-to-end list is ready
        # for the client without a second pass in the common case
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"transfer-encoding":
                self.chunked = value.strip().lower().endswith(b"chunked")
            elif lname == b"connection":
                v = value.lower()
                if b"close" in v:
                    self.conn_close = True
                if v != b"keep-alive" and v != b"close":
                    self.conn_named = True
            if self.hop is None:
                self.hop = []
            self.hop.append((name, value, lname))
            return
        if lname == b"content-length":
            self.content_length = int(value)
        elif lname == b"x-backend-load":
            # the backend's own load report rides on its answers as on its health checks
            # (least_load's feedback); it describes the private side, so the client never
            # sees it
            load = parse_load(value)
            ex = self.exchange
            if load is not None and ex is not None and ex.backend is not None:
                ex.backend.report_load(load)
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        self.status = p.get_status_code()  # type: ignore[union-attr]
        if p.get_http_version() == "1.0" and not p.should_keep_alive():  # type: ignore[union-attr]
            self.conn_close = True

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.response_body(body)

    def on_message_complete(self) -> None:
        self.message_complete = True

    # -- used by the exchange --------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def pause_reading(self) -> None:
        """The client can't take more of the response now."""
        self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        self.transport.resume_reading()  # type: ignore[union-attr]

    def request_sent(self) -> None:
        """The whole request is on its way: the backend's response time starts now."""
        if self.state == HEAD:
            self.deadline = self.pool.loop_time() + self.pool.backend_timeout

    def on_deadline(self, now: float) -> None:
        if self.exchange is None:  # idle too long in the pool
            self.close()
            return
        ex = self.exchange
        self.exchange = None
        self.transport.abort()  # type: ignore[union-attr]
        if self.received_any and self.state != HEAD:
            ex.upstream_broken("backend stopped sending mid-response")
        else:
            ex.upstream_failed(FAIL_TIMEOUT, self.reused, TimeoutError("backend response timeout"))

    def close(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.pool.watchdog.discard(self)
            self.transport.close()  # type: ignore[union-attr]

    def abort(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.pool.watchdog.discard(self)
            self.transport.abort()  # type: ignore[union-attr]

    def client_headers(self) -> list[tuple[bytes, bytes]]:
        """Response headers minus hop-by-hop ones (and any the Connection header names)."""
        hop = self.hop
        if hop is None or (not self.conn_named and self.status != 101):
            return self.headers
        if self.status == 101:
            return self.headers + [(n, v) for n, v, ln in hop if ln in (b"upgrade", b"connection")]
        named: set[bytes] = set()
        for _, v, ln in hop:
            if ln == b"connection":
                named.update(t.strip().lower() for t in v.split(b","))
        # the response is relayed with its own Content-Length framing: a "Connection:
        # content-length" must not strip it (the client would misread where the body ends)
        named -= {b"close", b"keep-alive", b"content-length"}
        if not named:
            return self.headers
        return [(n, v) for n, v in self.headers if n.lower() not in named]


class Watchdog:
    """One periodic sweep enforcing every connection's deadline.

    Cheaper than a timer per request: the hot path only stores a float; the sweep runs a few
    times a second over the live connections.
    """

    __slots__ = ("_items", "_handle", "_loop", "period")

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float = 0.1) -> None:
        self._items: set = set()
        self._loop = loop
        self.period = period
        self._handle: asyncio.TimerHandle | None = None

    def add(self, item: object) -> None:
        self._items.add(item)

    def discard(self, item: object) -> None:
        self._items.discard(item)

    def start(self) -> None:
        self._handle = self._loop.call_later(self.period, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = self._loop.time()
        for item in [i for i in self._items if 0.0 < i.deadline <= now]:
            item.deadline = 0.0
            try:
                item.on_deadline(now)
            except Exception:
                log.exception("deadline handler failed")
        self._handle = self._loop.call_later(self.period, self._tick)


class BackendConnections:
    """Idle keep-alive connections to one backend address, and new connections to it.

    A connection that opened with a PROXY header (a pool's send_proxy_protocol) told the
    backend one client's address, and the backend reads it once per connection: reused for
    another client it would credit that client's requests to the first. So such connections
    are kept apart, keyed by the exact header they sent (client address and port, and the
    address it connected to), and reused only for requests carrying the same header, which
    is what HAProxy does (it hashes idle connections by their PROXY parameters): a client's
    keep-alive requests still share one backend connection, two clients never do. Idle keyed
    connections of clients that left are closed by the idle timeout or, when the cap is
    reached, oldest first to make room.
    """

    __slots__ = (
        "host",
        "port",
        "idle",
        "keyed",
        "keyed_count",
        "max_idle",
        "watchdog",
        "loop_time",
        "backend_timeout",
        "idle_timeout",
        "connect_timeout",
        "_loop",
    )

    def __init__(self, host: str, port: int, upstreams: Upstreams) -> None:
        self.host = host
        self.port = port
        self.idle: list[UpstreamConnection] = []
        # idle connections that sent a PROXY header, by that header (oldest key first)
        self.keyed: dict[bytes, list[UpstreamConnection]] = {}
        self.keyed_count = 0
        self.max_idle = upstreams.max_idle
        self.watchdog = upstreams.watchdog
        self._loop = upstreams.loop
        self.loop_time = upstreams.loop.time
        self.backend_timeout = upstreams.backend_timeout
        self.idle_timeout = upstreams.idle_timeout
        self.connect_timeout = upstreams.connect_timeout

    def acquire_idle(self, proxy_header: bytes = b"") -> UpstreamConnection | None:
        if proxy_header:
            idle = self.keyed.get(proxy_header)
            if idle is None:
                return None
            self.keyed_count -= len(idle)
            del self.keyed[proxy_header]  # re-added at the end when released: LRU order
            conn = None
            while idle and conn is None:
                c = idle.pop()
                if not c.closed and not c.transport.is_closing():  # type: ignore[union-attr]
                    conn = c
            if idle:
                self.keyed[proxy_header] = idle
                self.keyed_count += len(idle)
            if conn is not None:
                conn.deadline = 0.0
                conn.reused = True
                conn._reset_response()
            return conn
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                conn.deadline = 0.0
                conn.reused = True
                conn._reset_response()
                return conn
        return None

    async def connect(self, proxy_header: bytes = b"") -> UpstreamConnection:
        """A new connection; `proxy_header` (if any) is the first thing it sends."""
        _, conn = await asyncio.wait_for(
            self._loop.create_connection(
                lambda: UpstreamConnection(self, proxy_header), self.host, self.port
            ),
            self.connect_timeout,
        )
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        key = conn.proxy_key
        if key:
            self._release_keyed(conn, key)
            return
        if len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = now = self.loop_time()
        conn.deadline = now + self.idle_timeout
        self.idle.append(conn)

    def _release_keyed(self, conn: UpstreamConnection, key: bytes) -> None:
        keyed = self.keyed
        if self.keyed_count >= self.max_idle:
            # full: the least recently used client's connection makes room (it most likely
            # left; a live client would only open a new one)
            oldest = next(iter(keyed))
            stack = keyed[oldest]
            stack.pop(0).close()  # its connection_lost calls forget(): no longer listed
            self.keyed_count -= 1
            if not stack:
                del keyed[oldest]
        conn.idle_since = now = self.loop_time()
        conn.deadline = now + self.idle_timeout
        stack = keyed.pop(key, None) or []  # popped and put back: most recent last
        stack.append(conn)
        keyed[key] = stack
        self.keyed_count += 1

    def forget(self, conn: UpstreamConnection) -> None:
        """An idle connection was closed by the backend."""
        key = conn.proxy_key
        if key:
            stack = self.keyed.get(key)
            if stack is not None and conn in stack:
                stack.remove(conn)
                self.keyed_count -= 1
                if not stack:
                    del self.keyed[key]
            return
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close_idle(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        keyed = [c for stack in self.keyed.values() for c in stack]
        self.keyed.clear()
        self.keyed_count = 0
        for conn in keyed:
            conn.close()


class Upstreams:
    """Connection pools for every backend address, shared by all listeners and kept across
    reloads (a backend whose address is unchanged keeps its warm connections)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        watchdog: Watchdog,
        *,
        connect_timeout: float,
        backend_timeout: float,
        idle_timeout: float,
        # idle connections kept per backend: enough for the peak concurrency a busy pool
        # sees (a lower cap closes and reopens connections under load); unused ones are
        # still closed after timeouts.upstream_idle
        max_idle: int = 1024,
        h2_pools: Callable[..., Any] | None = None,
    ) -> None:
        self.loop = loop
        self.watchdog = watchdog
        self.connect_timeout = connect_timeout
        self.backend_timeout = backend_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.h2_pools = h2_pools  # makes the pool of a `protocol: h2` backend
        self._by_address: dict[tuple[str, int], Any] = {}
        self._h2_by_address: dict[tuple[str, int], Any] = {}

    def for_backend(self, backend: Backend, h2: bool = False) -> BackendConnections:
        key = (backend.host, backend.port)
        if h2:
            return self._h2_for(key)
        conns = self._by_address.get(key)
        if conns is None:
            conns = self._by_address[key] = BackendConnections(backend.host, backend.port, self)
        return conns

    def _h2_for(self, key: tuple[str, int]) -> Any:
        conns = self._h2_by_address.get(key)
        if conns is None:
            if self.h2_pools is None:
                raise RuntimeError("HTTP/2 backends are not wired")
            conns = self._h2_by_address[key] = self.h2_pools(
                key[0],
                key[1],
                watchdog=self.watchdog,
                loop=self.loop,
                connect_timeout=self.connect_timeout,
                backend_timeout=self.backend_timeout,
                idle_timeout=self.idle_timeout,
            )
        return conns

    def _all(self) -> list[Any]:
        return [*self._by_address.values(), *self._h2_by_address.values()]

    def retune(
        self, *, connect_timeout: float, backend_timeout: float, idle_timeout: float
    ) -> None:
        """Apply reloaded timeouts to existing and future pools."""
        self.connect_timeout = connect_timeout
        self.backend_timeout = backend_timeout
        self.idle_timeout = idle_timeout
        for c in self._all():
            c.connect_timeout = connect_timeout
            c.backend_timeout = backend_timeout
            c.idle_timeout = idle_timeout

    def drop(self, host: str, port: int) -> None:
        for table in (self._by_address, self._h2_by_address):
            conns = table.pop((host, port), None)
            if conns is not None:
                conns.close_idle()

    def close_all(self) -> None:
        for conns in self._all():
            conns.close_idle()
        self._by_address.clear()
        self._h2_by_address.clear()
