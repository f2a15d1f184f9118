"""Routing: a listener's routes (host, path prefix) to pools; first match wins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from balancer.config import Route
from balancer.pool import Pool


class Router:
    """Immutable once built: a reload builds a new Router and swaps it into the listener."""

    __slots__ = ("_routes", "uses_host")

    def __init__(self, routes: Sequence[Route], pools: Mapping[str, Pool]) -> None:
        compiled: list[tuple[bytes | None, bool, bytes | None, Pool]] = []
        for r in routes:
            host = r.host.lower().encode() if r.host else None
            wildcard = bool(host and host.startswith(b"*."))
            if wildcard:
                host = host[1:]  # "*.example.com" -> ".example.com", matched as a suffix
            prefix = r.path_prefix.encode() if r.path_prefix else None
            compiled.append((host, wildcard, prefix, pools[r.pool]))
        self._routes = tuple(compiled)
        # lets the proxy skip normalising the Host header when no route looks at it
        self.uses_host = any(host is not None for host, _, _, _ in compiled)

    def match(self, host: bytes, path: bytes) -> Pool | None:
        """`host` without port, lower-cased; `path` the raw request target."""
        for want_host, wildcard, prefix, pool in self._routes:
            if want_host is not None:
                if wildcard:
                    if not host.endswith(want_host):
                        continue
                elif host != want_host:
                    continue
            if prefix is not None and not path.startswith(prefix):
                continue
            return pool
        return None
