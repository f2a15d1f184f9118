"""Listeners: the bound socket every kind shares, and HttpListener with its routes and settings."""

from __future__ import annotations

import asyncio
import socket
import ssl
from abc import ABC, abstractmethod

from balancer.config import ListenerConfig, TimeoutsConfig
from balancer.proxy.client import ClientProtocol
from balancer.proxy.limits import ClientLimits
from balancer.proxy.observe import Observer
from balancer.proxy.routing import Router
from balancer.proxy.upstream import Upstreams, Watchdog


class Listener(ABC):
    """What every listener kind shares: its listening socket and its live connections."""

    config: ListenerConfig
    ssl_context: ssl.SSLContext | None = None
    handshake_timeout: float | None = None  # a TLS client must finish its handshake in this

    def __init__(self) -> None:
        self.connections: set = set()
        self.server: asyncio.AbstractServer | None = None
        self.refused = 0  # connections refused over a cap

    @abstractmethod
    def protocol(self) -> asyncio.Protocol:
        """A protocol object for one new client connection."""

    async def start(self, *, reuse_port: bool = False) -> None:
        bind = self.config.bind
        self.server = await asyncio.get_running_loop().create_server(
            self.protocol,
            bind.host,
            bind.port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.handshake_timeout if self.ssl_context else None,
            reuse_address=True,
            reuse_port=reuse_port,
            backlog=2048,
            family=socket.AF_INET6 if ":" in bind.host else socket.AF_INET,
        )

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()


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
        # a stalled handshake is the TLS form of a slow request head
        self.handshake_timeout = timeouts.client_header
        self.scheme = b"https" if config.tls else b"http"
        self.redirect = config.redirect_https.encode() if config.redirect_https else None
        self.max_head = self.limits.config.max_header_bytes or (1 << 20)

    def protocol(self) -> ClientProtocol:
        return ClientProtocol(self)

    def shutdown_connections(self) -> None:
        """Graceful stop: idle connections close now, busy ones after their response."""
        self.draining = True
        for conn in list(self.connections):
            conn.shutdown()

    def abort_connections(self) -> None:
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()

    def status(self) -> dict:
        return {
            "name": self.name,
            "bind": str(self.config.bind),
            "mode": self.config.mode,
            "tls": self.config.tls is not None,
            "connections": len(self.connections),
            "refused": self.refused,
            "rejected": self.rejected,
        }
