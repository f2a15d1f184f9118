"""HttpListener: one bound HTTP listener, its routes and the settings its connections share."""

from __future__ import annotations

import asyncio
import socket
import ssl

from balancer.config import ListenerConfig, TimeoutsConfig
from balancer.proxy.client import ClientProtocol
from balancer.proxy.limits import ClientLimits
from balancer.proxy.observe import Observer
from balancer.proxy.routing import Router
from balancer.proxy.upstream import Upstreams, Watchdog


class HttpListener:
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
        self.loop = loop
        self.loop_time = loop.time
        self.upstreams = upstreams
        self.watchdog = watchdog
        self.limits = limits
        self.observer = observer
        self.connections: set[ClientProtocol] = set()
        self.server: asyncio.AbstractServer | None = None
        self.draining = False
        self.refused = 0  # connections refused over a cap
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
        self.scheme = b"https" if config.tls else b"http"
        self.redirect = config.redirect_https.encode() if config.redirect_https else None
        self.max_head = self.limits.config.max_header_bytes or (1 << 20)

    async def start(self, *, reuse_port: bool = False) -> None:
        bind = self.config.bind
        self.server = await self.loop.create_server(
            lambda: ClientProtocol(self),
            bind.host,
            bind.port,
            ssl=self.ssl_context,
            reuse_address=True,
            reuse_port=reuse_port,
            backlog=2048,
            family=socket.AF_INET6 if ":" in bind.host else socket.AF_INET,
        )

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

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
