"""Listeners: the bound socket every kind shares, and HttpListener with its routes and settings."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import struct
from abc import ABC, abstractmethod
from collections.abc import Coroutine

from balancer.config import ListenerConfig, TimeoutsConfig
from balancer.proxy.client import ClientProtocol
from balancer.proxy.h2client import H2ClientConnection
from balancer.proxy.http import local_response
from balancer.proxy.limits import ClientLimits
from balancer.proxy.observe import Observer
from balancer.proxy.proxy_protocol import MAX_HEADER, NEED_MORE, ProxyHeader, ProxyProtocolError
from balancer.proxy.proxy_protocol import parse as parse_proxy_header
from balancer.proxy.routing import Router
from balancer.proxy.upstream import Upstreams, Watchdog

log = logging.getLogger("balancer.proxy")

LISTEN_BACKLOG = 4096
ACCEPT_BATCH = 64  # connections accepted per readiness event (HAProxy's tune.maxaccept)
ACCEPT_RETRY_DELAY = 0.1  # accepting pauses this long after running out of descriptors
# accept() errors that concern one client only (it reset while queued): go on accepting
_CLIENT_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
PLAIN_HTTP_ON_TLS = local_response(400, "plain HTTP request sent to the HTTPS port")
# connections at most waiting for their PROXY header at once (beyond: refused at accept); they
# are not yet counted under the caps, which apply to the address the header names
PROXY_PENDING_MAX = 10000


class _Accepted(socket.socket):
    """An accepted client socket. socket.socket's `family` and `type` properties build an
    IntEnum on every read, and uvloop reads them three times per adopted connection (about
    1 µs of a new connection's Python work); here they are plain class attributes."""

    __slots__ = ()
    type = socket.SOCK_STREAM


class _AcceptedInet(_Accepted):
    __slots__ = ()
    family = socket.AF_INET


class _AcceptedInet6(_Accepted):
    __slots__ = ()
    family = socket.AF_INET6


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _answer_and_close(conn: socket.socket, response: bytes) -> None:
    """Send a last answer on a raw accepted socket and close it without a reset.

    The socket is still in blocking mode, so every call says MSG_DONTWAIT. What the client
    sent is read first: unread bytes at close() make the kernel send RST, and the client
    could lose the answer."""
    try:
        for _ in range(16):
            if not conn.recv(65536, socket.MSG_DONTWAIT):
                break
    except OSError:
        pass  # nothing more to read now (or the client is gone)
    try:
        conn.send(response, socket.MSG_DONTWAIT)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    conn.close()


class Listener(ABC):
    """What every listener kind shares: its listening socket and its live connections."""

    config: ListenerConfig
    limits: ClientLimits
    ssl_context: ssl.SSLContext | None = None
    handshake_timeout: float | None = None  # a TLS client must finish its handshake in this
    header_timeout: float = 10.0  # a PROXY header must be complete within this of the accept

    def __init__(self) -> None:
        self.connections: set = set()
        self.sock: socket.socket | None = None
        self.refused = 0  # connections refused over a cap
        self.accept_errors = 0
        self._accept_retry: asyncio.TimerHandle | None = None  # accepting paused until then
        # proxy_protocol: connections whose header is being read, and those refused for it
        self.proxy_pending: set[asyncio.Task] = set()
        self.proxy_protocol_rejected = 0

    @property
    def proxy_protocol(self) -> bool:
        """Every connection starts with a PROXY header (the listener's `proxy_protocol`)."""
        return self.config.proxy_protocol

    @abstractmethod
    def protocol(self, client_ip: str) -> asyncio.Protocol:
        """A protocol object for one new client connection from `client_ip`."""

    async def start(self, *, reuse_port: bool = False) -> None:
        bind = self.config.bind
        family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((bind.host, bind.port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.family = family
        self._accepted = _AcceptedInet6 if family == socket.AF_INET6 else _AcceptedInet
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._accept_ready)

    def _accept_ready(self) -> None:
        # Accept in batches, as HAProxy does (tune.maxaccept): the event loop's own accept
        # takes one connection per loop iteration, and under load an iteration serves
        # hundreds of ready sockets, so a burst of new clients waited seconds in the
        # kernel's accept queue before the balancer even read their requests.
        sock = self.sock
        if sock is None:
            return
        # socket.accept() wraps each descriptor through enum conversions in Python; the C
        # accept returns the bare descriptor, wrapped here with the family already known.
        # No setblocking/TCP_NODELAY either: libuv sets both when it opens the descriptor.
        accept = sock._accept
        family = self.family
        accepted = self._accepted
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _CLIENT_GONE:
                    continue  # that client reset before we got to it; the next may be fine
                self.accept_errors += 1
                if self.accept_errors in (1, 10, 100) or self.accept_errors % 1000 == 0:
                    log.error(
                        "listener %s: accept failed: %s (%d so far); retrying in %gs",
                        self.config.name,
                        e,
                        self.accept_errors,
                        ACCEPT_RETRY_DELAY,
                    )
                # Out of descriptors or memory: the listening socket stays readable, so
                # retrying at once would spin the loop at full CPU until something closes.
                # Clients wait in the kernel's backlog meanwhile; served ones go on.
                self._pause_accepting()
                return
            conn = accepted(family, socket.SOCK_STREAM, 0, fd)
            ip = addr[0] if addr else "unknown"
            if self.proxy_protocol:
                # the client is who the header names: admitted under the caps once it is read
                self._read_proxy_header(conn, ip)
                continue
            if not self.limits.admit(ip):
                # over a connection cap: refused at once (reset), before any protocol or TLS
                # work is spent on it; other clients are unaffected
                self.refused += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                conn.close()
                continue
            if self.ssl_context is None:
                self._adopt_plain(conn, ip)
            else:
                self.loop.create_task(self._adopt_tls(conn, ip))

    def _pause_accepting(self) -> None:
        sock = self.sock
        if sock is None or self._accept_retry is not None:
            return
        self.loop.remove_reader(sock.fileno())
        self._accept_retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_retry = None
        if self.sock is not None:
            self.loop.add_reader(self.sock.fileno(), self._accept_ready)

    # -- PROXY protocol -----------------------------------------------------------------------

    def _read_proxy_header(self, conn: socket.socket, peer_ip: str) -> None:
        if len(self.proxy_pending) >= PROXY_PENDING_MAX:
            self.refused += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            conn.close()
            return
        task = self.loop.create_task(self._adopt_proxied(conn, peer_ip))
        self.proxy_pending.add(task)
        task.add_done_callback(self.proxy_pending.discard)

    async def _adopt_proxied(self, conn: socket.socket, peer_ip: str) -> None:
        """Read the PROXY header, then adopt the connection as from the client it names."""
        try:
            header = await asyncio.wait_for(self._proxy_header(conn), self.header_timeout)
        except asyncio.CancelledError:
            conn.close()  # the listener is stopping
            raise
        except (TimeoutError, OSError, ProxyProtocolError) as e:
            self.proxy_protocol_rejected += 1
            n = self.proxy_protocol_rejected
            if n in (1, 10, 100) or n % 1000 == 0:
                why = "no header within the timeout" if isinstance(e, TimeoutError) else e
                log.warning(
                    "listener %s: connection from %s closed: PROXY protocol: %s (%d so far)",
                    self.config.name,
                    peer_ip,
                    why or type(e).__name__,
                    n,
                )
            conn.close()
            return
        if header.source is None:
            ip, origin = peer_ip, None  # LOCAL / UNKNOWN: the socket's peer stands
        else:
            ip, origin = header.source[0], (header.source, header.destination)
        if not self.limits.admit(ip):
            self.refused += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            conn.close()
            return
        if self.ssl_context is None:
            self._adopt_plain(conn, ip, origin)
        else:
            await self._adopt_tls(conn, ip, origin)

    async def _proxy_header(self, conn: socket.socket) -> ProxyHeader:
        """Take exactly the header's bytes from the socket: what follows stays in it for the
        HTTP parser, the TLS handshake or the TCP splice. Bytes are peeked, then consumed only
        as far as they belong to the header (all of them while it is incomplete)."""
        got = b""
        while True:
            data = await self._peek(conn, MAX_HEADER - len(got))
            if not data:
                raise ProxyProtocolError("connection closed before its header was complete")
            result = parse_proxy_header(got + data)
            take = len(data) if result is NEED_MORE else result.length - len(got)  # type: ignore[union-attr]
            while take > 0:
                chunk = conn.recv(take, socket.MSG_DONTWAIT)  # peeked: already there
                if not chunk:
                    raise ProxyProtocolError("connection closed before its header was complete")
                got += chunk
                take -= len(chunk)
            if result is not NEED_MORE:
                return result

    def _with_origin(self, ip: str, origin: tuple) -> asyncio.Protocol:
        proto = self.protocol(ip)
        proto.origin = origin  # type: ignore[attr-defined]
        return proto

    # -- adopting ------------------------------------------------------------------------------

    def _adopt_plain(self, conn: socket.socket, ip: str, origin: tuple | None = None) -> None:
        # A Task per connection costs more than the rest of the accept. For a plain socket,
        # connect_accepted_socket does all its work before its one await (on the
        # connection_made callback), so its coroutine is stepped here directly: once now,
        # once more when that future completes.
        factory = (
            (lambda: self.protocol(ip))
            if origin is None
            else (lambda: self._with_origin(ip, origin))
        )
        coro = self.loop.connect_accepted_socket(factory, conn)
        try:
            waiter = coro.send(None)
        except StopIteration:
            return
        except OSError:
            self._adopt_failed(conn, ip)
            return
        waiter.add_done_callback(lambda _: self._adopt_step(coro, conn, ip))

    def _adopt_step(self, coro: Coroutine, conn: socket.socket, ip: str) -> None:
        try:
            coro.send(None)
        except StopIteration:
            return
        except (OSError, asyncio.CancelledError):
            self._adopt_failed(conn, ip)
            return
        # the coroutine awaited again: it never does for a plain socket; don't strand it
        coro.close()
        self._adopt_failed(conn, ip)

    async def _adopt_tls(self, conn: socket.socket, ip: str, origin: tuple | None = None) -> None:
        loop = self.loop
        timeout = self.handshake_timeout
        started = loop.time()
        try:
            first = await asyncio.wait_for(self._peek(conn), timeout)
            if first[:1].isalpha():
                # "GET / HTTP/1.1" where a TLS record (0x16) belongs: a plain HTTP client on
                # the HTTPS port gets told so, as nginx does, instead of a dropped connection
                self.rejected += 1
                _answer_and_close(conn, PLAIN_HTTP_ON_TLS)
                self.limits.release(ip)
                return
            if timeout is not None:
                timeout = max(0.001, timeout - (loop.time() - started))
            await loop.connect_accepted_socket(
                (lambda: self.protocol(ip))
                if origin is None
                else (lambda: self._with_origin(ip, origin)),
                conn,
                ssl=self.ssl_context,
                ssl_handshake_timeout=timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError):
            self._adopt_failed(conn, ip)

    async def _peek(self, conn: socket.socket, size: int = 8) -> bytes:
        """The first bytes a new client sent, left in the socket for the TLS handshake
        (the accepted socket is still in blocking mode until the transport adopts it)."""
        loop = self.loop
        fd = conn.fileno()
        while True:
            try:
                return conn.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            ready = loop.create_future()
            loop.add_reader(fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)

    def _adopt_failed(self, conn: socket.socket, ip: str) -> None:
        # a failed or stalled handshake, or a client gone already: the protocol never
        # started, so its slot under the caps is given back here
        conn.close()
        self.limits.release(ip)

    @property
    def listening(self) -> bool:
        return self.sock is not None

    def stop_accepting(self) -> None:
        sock = self.sock
        if sock is not None:
            self.sock = None
            if self._accept_retry is not None:
                self._accept_retry.cancel()
                self._accept_retry = None
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def abort_connections(self) -> None:
        for task in list(self.proxy_pending):
            task.cancel()  # still reading a PROXY header: closed unserved
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()


class HttpListener(Listener):
    """Shared, swappable state for the connections of one listener.

    A reload replaces `router`, `timeouts` and friends by assignment: a connection reads them
    per request, so new requests see the new config while in-flight ones finish on the pools
    they were routed to.
    """

    def __init__(
        self,
        config: ListenerConfig,
        *,
        router: Router | None,
        upstreams: Upstreams,
        watchdog: Watchdog,
        limits: ClientLimits,
        timeouts: TimeoutsConfig,
        observer: Observer,
        loop: asyncio.AbstractEventLoop,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__()
        self.loop = loop
        self.loop_time = loop.time
        self.upstreams = upstreams
        self.watchdog = watchdog
        self.limits = limits
        self.observer = observer
        self.draining = False
        self.rejected = 0  # requests answered with a local 4xx/5xx for bad input
        self.ssl_context = ssl_context
        self.apply(config, router=router, timeouts=timeouts)

    def apply(
        self, config: ListenerConfig, *, router: Router | None, timeouts: TimeoutsConfig
    ) -> None:
        self.config = config
        self.name = config.name
        self.router = router
        self.timeouts = timeouts
        # a stalled handshake is the TLS form of a slow request head, and so is a PROXY
        # header that does not come
        self.handshake_timeout = timeouts.client_header
        self.header_timeout = timeouts.client_header
        self.scheme = b"https" if config.tls else b"http"
        self.redirect = config.redirect_https.encode() if config.redirect_https else None
        self.max_head = self.limits.config.max_header_bytes or (1 << 20)
        # HTTP/2 beside HTTP/1.1: chosen by ALPN on TLS, by the client's preface on plain
        self.http2 = config.http2
        self.h2_protocol = H2ClientConnection if self.http2 else None

    def protocol(self, client_ip: str) -> ClientProtocol:
        return ClientProtocol(self, client_ip)

    def shutdown_connections(self) -> None:
        """Graceful stop: idle connections close now, busy ones after their response."""
        self.draining = True
        for conn in list(self.connections):
            conn.shutdown()

    def status(self) -> dict:
        return {
            "name": self.name,
            "bind": str(self.config.bind),
            "mode": self.config.mode,
            "tls": self.config.tls is not None,
            "http2": self.http2,
            "connections": len(self.connections),
            "refused": self.refused,
            "accept_errors": self.accept_errors,
            "rejected": self.rejected,
            "proxy_protocol": self.proxy_protocol,
            "proxy_protocol_rejected": self.proxy_protocol_rejected,
        }
