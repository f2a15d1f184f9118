"""balancer: a reverse-proxy load balancer daemon on uvloop and httptools."""

from balancer import build as _build

__version__ = "0.1.0"

# before any hot module is imported: BALANCER_PURE=1 (or a stale build) loads them from .py
_build.install()
