"""Layer-4 mode: a listener that splices each client TCP connection to one backend of a pool."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from balancer.config import ListenerConfig, TimeoutsConfig
from balancer.proxy.listener import Listener
from balancer.proxy.proxy_protocol import encode as encode_proxy_header
from balancer.proxy.proxy_protocol import transport_addresses

if TYPE_CHECKING:
    from balancer.backend import Backend
    from balancer.pool import Pool
    from balancer.proxy.limits import ClientLimits
    from balancer.proxy.upstream import Watchdog

log = logging.getLogger("balancer.tcp")

PRECONNECT_BUFFER = 256 * 1024  # client bytes held while the backend connection is made


class TcpContext:
    """Request context for strategies: a TCP connection only has its client address."""

    __slots__ = ("client_ip",)
    path = ""

    def __init__(self, client_ip: str) -> None:
        self.client_ip = client_ip

    def header(self, name: str) -> None:
        return None

    def cookie(self, name: str) -> None:
        return None


class TcpUpstream(asyncio.Protocol):
    __slots__ = ("client", "transport")

    def __init__(self, client: TcpClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.from_upstream(data)

    def eof_received(self) -> bool:
        client = self.client
        client.upstream_eof = True
        if client.client_eof:
            # both sides have said FIN: the session is over. False closes this transport;
            # connection_lost then closes the client's (after what is still buffered).
            # (Keeping both open here leaked both sockets and the connection slot until
            # tcp_idle: a keep-alive HTTP backend behind curl did it on every request.)
            return False
        # half-close: pass the backend's FIN on, keep reading the client
        t = client.transport
        if t is not None and t.can_write_eof() and not t.is_closing():
            t.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None and not self.client.transport.is_closing():
            self.client.transport.resume_reading()


class TcpClient(asyncio.Protocol):
    """One client connection in TCP mode."""

    __slots__ = (
        "listener",
        "transport",
        "client_ip",
        "origin",
        "upstream",
        "backend",
        "pending",
        "pending_size",
        "closed",
        "admitted",
        "tried",
        "eof_pending",
        "client_eof",
        "upstream_eof",
        "deadline",
    )

    def __init__(self, listener: TcpListener, client_ip: str = "") -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.client_ip = client_ip  # known at accept; else read from the transport
        self.origin = None  # (client, listener) addresses from a received PROXY header
        self.upstream: TcpUpstream | None = None
        self.backend: Backend | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.closed = False
        self.admitted = False
        self.tried: list[Backend] = []
        self.eof_pending = False  # the client half-closed before the backend connection was up
        self.client_eof = False  # a FIN from the client
        self.upstream_eof = False  # a FIN from the backend
        # loop time after which the watchdog ends the session: no byte either way for
        # timeouts.tcp_idle (a vanished client or a wedged backend must not hold it forever)
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.client_ip:
            peer = transport.get_extra_info("peername")
            self.client_ip = peer[0] if peer else "unknown"
        listener = self.listener
        # counted against the connection caps by the listener at accept
        self.admitted = True
        listener.connections.add(self)
        self.touch()
        listener.watchdog.add(self)
        asyncio.get_running_loop().create_task(self._connect(listener.pool))

    def touch(self) -> None:
        listener = self.listener
        self.deadline = listener.loop.time() + listener.timeouts.tcp_idle

    def on_deadline(self, now: float) -> None:
        log.info(
            "tcp %s: session of %s idle for %gs: closed",
            self.listener.name,
            self.client_ip,
            self.listener.timeouts.tcp_idle,
        )
        if self.transport is not None:
            self.transport.abort()

    async def _connect(self, pool: Pool) -> None:
        ctx = TcpContext(self.client_ip)
        for _ in range(pool.config.retries + 1):
            b = pool.select(ctx, self.tried)
            if b is None:
                break
            pool.begin(b)
            try:
                _, up = await asyncio.wait_for(
                    asyncio.get_running_loop().create_connection(
                        lambda: TcpUpstream(self), b.host, b.port
                    ),
                    self.listener.timeouts.connect,
                )
            except (TimeoutError, OSError) as e:
                pool.release(b, failed=True)
                self.tried.append(b)
                log.info(
                    "tcp %s: backend %s (%s) failed: %s",
                    self.listener.name,
                    b.name,
                    b.address,
                    e or "timeout",
                )
                continue
            if self.closed:
                pool.release(b)
                up.transport.close()
                return
            self.backend = b
            self.upstream = up
            if pool.send_proxy:
                # the backend's first bytes: who the client is (before anything it sent)
                addrs = self.origin or transport_addresses(self.transport)
                src, dst = addrs if addrs is not None else (None, None)
                up.transport.write(encode_proxy_header(pool.send_proxy, src, dst))
            if self.pending:
                up.transport.write(b"".join(self.pending))
                self.pending.clear()
                self.transport.resume_reading()  # type: ignore[union-attr]
            if self.eof_pending and up.transport.can_write_eof():
                up.transport.write_eof()
            return
        log.warning("tcp %s: no backend available for %s", self.listener.name, self.client_ip)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.touch()
        up = self.upstream
        if up is not None:
            up.transport.write(data)  # type: ignore[union-attr]
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PRECONNECT_BUFFER:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.upstream_eof:
            return False  # both sides have said FIN: close (connection_lost closes upstream)
        up = self.upstream
        if up is None:
            # half-closed before the backend connection is up (`printf ... | nc -N`): pass
            # the FIN on once it is, after the pending bytes; keep our side open for the reply
            self.eof_pending = True
            return True
        if up.transport is not None and up.transport.can_write_eof():
            up.transport.write_eof()
            return True
        return False

    def from_upstream(self, data: bytes) -> None:
        self.touch()
        if self.transport is not None:
            self.transport.write(data)

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None and not up.transport.is_closing():
            up.transport.resume_reading()

    def upstream_lost(self) -> None:
        self._release()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.admitted:
            self.admitted = False
            self.listener.limits.release(self.client_ip)
            self.listener.connections.discard(self)
            self.listener.watchdog.discard(self)
        up = self.upstream
        self.upstream = None  # the two protocols point at each other: break the cycle
        if up is not None and up.transport is not None:
            up.transport.close()
        self._release()

    def _release(self) -> None:
        b = self.backend
        if b is not None:
            self.backend = None
            self.listener.pool.release(b)


class TcpListener(Listener):
    """A listener in mode: tcp. A reload swaps `pool` and `timeouts` through apply(): new
    sessions see them, running ones keep the pool they started on."""

    def __init__(
        self,
        config: ListenerConfig,
        *,
        pool: Pool,
        watchdog: Watchdog,
        limits: ClientLimits,
        timeouts: TimeoutsConfig,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__()
        self.loop = loop
        self.watchdog = watchdog  # ends sessions idle for timeouts.tcp_idle
        self.limits = limits
        self.apply(config, pool=pool, timeouts=timeouts)

    def apply(self, config: ListenerConfig, *, pool: Pool, timeouts: TimeoutsConfig) -> None:
        self.config = config
        self.name = config.name
        self.pool = pool
        self.timeouts = timeouts  # tcp_idle and connect (to the backend)
        self.header_timeout = timeouts.client_header  # for proxy_protocol

    def protocol(self, client_ip: str) -> TcpClient:
        return TcpClient(self, client_ip)

    def shutdown_connections(self) -> None:
        """TCP sessions can't be ended politely from the middle: they get the drain time to
        finish on their own, then abort_connections()."""

    def status(self) -> dict:
        return {
            "name": self.name,
            "bind": str(self.config.bind),
            "mode": "tcp",
            "tls": False,
            "pool": self.pool.name,
            "connections": len(self.connections),
            "refused": self.refused,
            "accept_errors": self.accept_errors,
            "proxy_protocol": self.proxy_protocol,
            "proxy_protocol_rejected": self.proxy_protocol_rejected,
        }
