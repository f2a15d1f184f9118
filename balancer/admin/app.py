"""Admin API (aiohttp): status, health, metrics and runtime backend changes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from balancer.daemon import Daemon


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def status(request: web.Request) -> web.Response:
        return web.json_response(daemon.status())

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    return app
