"""The HTTP/1.1 client connection: the listener's protocol (httptools), one Exchange per request.

The protocol parses and hands off; each parsed request becomes an Exchange (proxy/exchange.py)
that picks a backend through its pool, streams the request to an upstream connection and the
response back. Pipelined requests wait in order behind the active one (reading from the client
pauses while they wait, so at most one socket read of them is ever buffered).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import httptools

from balancer.proxy.exchange import (
    CHUNKED_END,
    PAUSE_DONE,
    PAUSE_PIPELINE,
    Exchange,
    Site,
)
from balancer.proxy.http import RequestRejected, local_response
from balancer.proxy.proxy_protocol import Address, transport_addresses

if TYPE_CHECKING:
    from balancer.proxy import upstream as up

log = logging.getLogger("balancer.proxy")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# What the connection deadline means when the watchdog fires.
DL_IDLE = 0  # between requests: close quietly
DL_HEAD = 1  # reading a request head: 408
DL_BODY = 2  # reading a request body: 408
DL_TUNNEL = 3  # upgraded connection idle: close both sides


class ClientProtocol:
    """One client connection on an HTTP listener: an asyncio protocol.

    It does not inherit asyncio.Protocol: compiled, it is a C type (client.pxd), which
    can't inherit a Python class; the loop needs only the methods."""

    __slots__ = (
        "listener",
        "transport",
        "parser",
        "client_ip",
        "client_ip_b",
        "origin",
        "admitted",
        # requests
        "parsing",
        "active",
        "queue",
        "head_size",
        "head_raw",
        "header_count",
        "max_headers",
        "max_header_bytes",
        "upgrade_pending",
        # flow control
        "read_pause",
        "write_paused",
        "closing",
        "closed",
        "tunnel",
        # timeouts
        "deadline",
        "deadline_kind",
        "sniff",
    )

    def __init__(self, listener: Site, client_ip: str = "") -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = client_ip  # known at accept; else read from the transport
        self.client_ip_b = b""
        # (client, listener) addresses from a PROXY header the listener read, else None
        self.origin: tuple[Address, Address] | None = None
        self.admitted = False
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.head_size = 0
        self.head_raw = 0
        self.header_count = 0
        # the request head limits (limits.config), read once per request, not per header
        self.max_headers = 0
        self.max_header_bytes = 0
        self.upgrade_pending = False
        self.read_pause = 0
        self.write_paused = False
        self.closing = False
        self.closed = False
        self.tunnel: up.UpstreamConnection | None = None
        self.deadline = 0.0
        self.deadline_kind = DL_IDLE
        self.sniff: bytes | None = None  # h2c listener: the first bytes, until they tell

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.client_ip:
            peer = transport.get_extra_info("peername")
            self.client_ip = peer[0] if peer else "unknown"
        self.client_ip_b = self.client_ip.encode()
        listener = self.listener
        if listener.h2_protocol is not None:
            if listener.ssl_context is None:
                self.sniff = b""  # prior-knowledge HTTP/2 starts with its preface
            else:
                tls = transport.get_extra_info("ssl_object")
                if tls is not None and tls.selected_alpn_protocol() == "h2":
                    self._hand_over(b"")
                    return
        self.admitted = True  # counted against the connection caps by the listener at accept
        listener.connections.add(self)
        # the first request head must be complete within client_header of the accept (not of
        # its first byte: a client that waits, then trickles, must not get the time twice)
        self.deadline_kind = DL_HEAD
        self.deadline = listener.loop_time() + listener.timeouts.client_header
        listener.watchdog.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # the parser holds this protocol's callbacks: dropping it breaks the cycle, so a
        # closed connection is freed at once by reference counting instead of waiting for
        # the cyclic collector (whose full passes showed up as tail latency)
        self.parser = None  # type: ignore[assignment]
        listener = self.listener
        if not self.admitted:
            return
        self.admitted = False
        listener.limits.release(self.client_ip)
        listener.connections.discard(self)
        listener.watchdog.discard(self)
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        if self.active is not None:
            self.active.client_gone()
            self.active = None
        self.queue.clear()
        self.parsing = None

    def eof_received(self) -> bool:
        """The client half-closed (shutdown(SHUT_WR) after its request, as `nc -N` and many
        scripted clients do): the requests it completed are still answered and the connection
        closes after the last; one cut short can never complete, so it is not waited for.
        (While pipelined requests wait, reading is paused and the EOF is seen late: then the
        last answer may already be out without Connection: close; the close still follows.)"""
        if self.tunnel is not None or self.listener.ssl_context is not None:
            return False  # TLS has no half-close; a tunnel ends with either side
        last = None
        for ex in (self.active, *self.queue):
            if ex is None or not ex.request_complete:
                break
            last = ex
        if last is None:
            return False  # nothing complete to answer: close now
        last.client_close = True
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.active
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.active
        if ex is not None and ex.conn is not None and not ex.conn.closed:
            ex.conn.resume_reading()

    def pause(self, reason: int) -> None:
        if not self.read_pause and not self.closed:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.read_pause |= reason

    def resume(self, reason: int) -> None:
        if self.read_pause & reason:
            self.read_pause &= ~reason
            if not self.read_pause and not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.sniff is not None:
            data = self.sniff + data
            if len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                self.sniff = data
                return
            self.sniff = None
            if data.startswith(H2_PREFACE):
                self._hand_over(data)
                return
        if self.tunnel is not None:
            # every byte either way keeps an upgraded connection alive (DL_TUNNEL)
            self.deadline = self.listener.loop_time() + self.listener.timeouts.client_idle
            self.tunnel.send(data)
            return
        if self.upgrade_pending:
            # bytes after an upgrade request belong to the new protocol: hold them (checked
            # before PAUSE_DONE, which an upgrade request also sets: see on_headers_complete)
            if self.active is not None:
                self.active.early_tunnel_data.append(data)
            self.pause(PAUSE_DONE)
            return
        if self.read_pause & PAUSE_DONE:
            return  # after `Connection: close` or an error: the rest is not read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, RequestRejected):
                self.reject(cause.status, cause.detail)
            else:
                log.exception("request handling failed", exc_info=cause)
                self.reject(500, "internal error")
            return
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0] if e.args else len(data)
            self.upgrade_pending = True
            rest = data[offset:]
            if rest and self.active is not None:
                self.active.early_tunnel_data.append(rest)
            self.pause(PAUSE_DONE)
            return
        except httptools.HttpParserError as e:
            self.reject(400, f"malformed request: {e}")
            return
        if self.parsing is not None and self.deadline_kind == DL_HEAD:
            # still inside a request head: enforce the size cap on what is buffered (a line
            # that never ends). Its own count: head_size, kept by the callbacks, already
            # holds the complete lines of these same bytes (adding both made a head split
            # across two reads count nearly double and get a 431 at half the cap)
            self.head_raw += len(data)
            if self.head_raw > self.max_header_bytes > 0:
                self.reject(431, "request header fields too large")

    def _hand_over(self, data: bytes) -> None:
        """The client speaks HTTP/2: the connection goes to the listener's HTTP/2 protocol,
        which takes over its place under the connection caps."""
        listener = self.listener
        if self.admitted:
            self.admitted = False
            listener.connections.discard(self)
            listener.watchdog.discard(self)
        self.closed = True
        self.parser = None  # type: ignore[assignment]
        h2 = listener.h2_protocol(listener, self.client_ip)  # type: ignore[misc]
        h2.origin = self.origin  # type: ignore[attr-defined]
        transport = self.transport
        transport.set_protocol(h2)  # type: ignore[union-attr]
        h2.connection_made(transport)
        if data:
            h2.data_received(data)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        listener = self.listener
        ex = Exchange(self)
        self.parsing = ex
        self.head_size = 0
        self.head_raw = 0
        self.header_count = 0
        limits = listener.limits.config
        self.max_headers = limits.max_headers
        self.max_header_bytes = limits.max_header_bytes
        if self.active is None and self.deadline_kind != DL_HEAD:
            self.deadline_kind = DL_HEAD
            self.deadline = listener.loop_time() + listener.timeouts.client_header

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        ex.url += url  # type: ignore[union-attr]
        if len(ex.url) > self.listener.max_head:  # type: ignore[union-attr]
            raise RequestRejected(414, "request target too long")
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if 0 < self.max_headers < self.header_count:
            raise RequestRejected(431, "too many request header fields")
        self.head_size += len(name) + len(value) + 4
        if 0 < self.max_header_bytes < self.head_size:
            raise RequestRejected(431, "request header fields too large")
        self.parsing.headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        p = self.parser
        ex.method = p.get_method()
        ex.version = p.get_http_version()
        # An upgrade request ends HTTP/1.1 on this connection whatever the answer: on 101 it
        # becomes a tunnel; on anything else the bytes after it were already claimed as
        # tunnel data and can't be parsed as requests, so that answer closes the connection.
        ex.keep_alive = p.should_keep_alive() and not p.should_upgrade()
        # the whole head counts against max_header_bytes, as documented ("request head
        # size"): the request line ("GET " url " HTTP/1.1\r\n") and the blank line too
        head_size = self.head_size + len(ex.method) + 14
        self.head_size = 0
        if 0 < self.max_header_bytes < head_size:
            raise RequestRejected(431, "request header fields too large")
        ex.prepare()  # validates, routes and builds the forwarded head; may raise
        listener = self.listener
        if ex.chunked or ex.content_length > 0:
            self.deadline_kind = DL_BODY
            self.deadline = listener.loop_time() + listener.timeouts.client_idle
        elif self.active is None:
            self.deadline = 0.0
        if self.active is None:
            self.active = ex
            ex.start()
        else:
            self.queue.append(ex)
            self.pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.body_received += len(body)
        max_body = self.listener.limits.config.max_body_bytes
        if max_body and ex.body_received > max_body:
            raise RequestRejected(413, "request body too large")
        if self.deadline_kind == DL_BODY:
            self.deadline = self.listener.loop_time() + self.listener.timeouts.client_idle
        if ex.chunked:
            ex.request_body(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            ex.request_body(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self.parsing = None
        if ex.chunked:
            ex.request_body(CHUNKED_END)
        if self.deadline_kind == DL_BODY or self.deadline_kind == DL_HEAD:
            self.deadline = 0.0
            self.deadline_kind = DL_IDLE
        if not ex.keep_alive:
            self.pause(PAUSE_DONE)
        ex.request_done()

    # -- exchanges -------------------------------------------------------------------------

    def exchange_done(self, ex: Exchange) -> None:
        """The active exchange wrote its whole response."""
        if self.active is not ex:
            return
        self.active = None
        if ex.client_close or self.closing or self.closed:
            self.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.active = nxt
            if not self.queue:
                self.resume(PAUSE_PIPELINE)
            nxt.start()
            return
        if self.parsing is None:
            listener = self.listener
            self.deadline_kind = DL_IDLE
            self.deadline = listener.loop_time() + listener.timeouts.client_idle
        elif self.parsing.prepared:
            # the next request's head already arrived (its body is streaming in)
            pass
        else:
            # the next head began while this response was sent and no clock ran for it:
            # it gets client_header from now (else a trickled pipelined head never times out)
            listener = self.listener
            self.deadline_kind = DL_HEAD
            self.deadline = listener.loop_time() + listener.timeouts.client_header

    def reject(self, status: int, detail: str) -> None:
        """Answer a bad request with a local error and close after it."""
        self.pause(PAUSE_DONE)
        self.listener.rejected += 1
        bad = self.parsing
        self.parsing = None
        log.info("%s: rejected request: %d %s", self.client_ip, status, detail)
        if bad is not None and bad is self.active:
            # mid-body of the request being proxied: its backend must not keep a half request
            bad.abandon_upstream()
            if bad.response_started:
                self.close()
                return
            self.active = None
        elif bad is not None and bad in self.queue:
            self.queue.remove(bad)
        ex = Exchange(self)
        ex.local = local_response(status, detail)
        ex.local_status = status
        ex.client_close = True
        if bad is not None:
            ex.method, ex.url, ex.version = bad.method, bad.url, bad.version
        if self.active is None:
            self.active = ex
            ex.start()
        else:
            self.queue.append(ex)

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, parts: Iterable[bytes]) -> None:
        self.transport.writelines(parts)  # type: ignore[union-attr]

    def exchange_broken(self, ex: Exchange) -> None:
        """The backend failed mid-response: the client must see a cut, not a complete-looking
        response, so the connection is reset."""
        self.active = None
        if not self.closed:
            self.transport.abort()  # type: ignore[union-attr]

    # -- upgrade (WebSocket) ---------------------------------------------------------------

    def tunnel_opened(self, ex: Exchange, conn: up.UpstreamConnection) -> bool:
        """The backend answered 101: from here bytes are spliced both ways."""
        if self.closed:
            return False
        self.tunnel = conn
        # a tunnel with no traffic either way for client_idle is closed (both sides); each
        # byte relayed pushes the deadline on (data_received, tunnel_relayed)
        listener = self.listener
        self.deadline_kind = DL_TUNNEL
        self.deadline = listener.loop_time() + listener.timeouts.client_idle
        self.read_pause &= ~PAUSE_DONE
        if not self.read_pause:
            self.transport.resume_reading()  # type: ignore[union-attr]
        return True

    def tunnel_relayed(self) -> None:
        self.deadline = self.listener.loop_time() + self.listener.timeouts.client_idle

    def tunnel_ended(self) -> None:
        self.tunnel = None
        self.close()

    def addresses(self) -> tuple[Address, Address] | None:
        """The client's address and the one it connected to, as a PROXY header to a backend
        tells them: those a received PROXY header named, else the socket's."""
        return self.origin or transport_addresses(self.transport)

    def close(self) -> None:
        if not self.closed:
            self.closing = True
            self.transport.close()  # type: ignore[union-attr]

    def shutdown(self) -> None:
        """Graceful stop: an idle connection closes now, a busy one after its response."""
        self.closing = True
        if self.active is None and self.tunnel is None and self.parsing is None:
            self.close()

    def on_deadline(self, now: float) -> None:
        kind = self.deadline_kind
        if kind == DL_IDLE:
            if self.active is None and self.parsing is None:
                self.close()
        elif kind in (DL_HEAD, DL_BODY):
            if self.active is not None and self.parsing is None and kind == DL_HEAD:
                return  # the head finished; the response is the backend's business now
            # including a new connection that sent nothing at all: "too slow to send its
            # headers" (HAProxy's default too; only an idle keep-alive one closes quietly)
            self.reject(408, "client too slow to send its request")
        elif kind == DL_TUNNEL:
            self.close()
