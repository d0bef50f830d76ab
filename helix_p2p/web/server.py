"""Serving an aiohttp app on a port of its own, and the `/metrics` route."""

from __future__ import annotations

import errno

from aiohttp import web

from helix_p2p.errors import HelixError
from helix_p2p.metrics import CONTENT_TYPE, Registry


def add_metrics_route(app: web.Application, registry: Registry) -> None:
    async def metrics(_: web.Request) -> web.Response:
        # Content-Type carries a version parameter, which aiohttp's content_type= argument refuses
        return web.Response(body=registry.render().encode(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/metrics", metrics)


async def start_site(app: web.Application, host: str, port: int, what: str) -> web.AppRunner:
    """Serve `app` on host:port in the running loop; a port in use is a HelixError naming `what`.
    The caller cleans the returned runner up."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        why = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise HelixError(f"cannot serve the {what} on {host}:{port}: {why}") from None
    return runner
