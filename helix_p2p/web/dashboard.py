"""The swarm's status page: `GET /` (a page that polls `api/state` every 2 s and draws the nodes,
the layer map, the flow graph, the plan and the rates; `page.py`) and `GET /api/state` (the same as
JSON, built by `helix_p2p.swarm.status.swarm_state`).

`StateView` turns successive readings of the registry into states, keeping the counters between
readings that rates need; `watch_swarm` is the reading loop of a peer that has no client view of
its own (the bootstrap). The gateway feeds the view from its client's snapshot instead."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from helix_p2p.swarm.records import NodeRecord, PlanRecord
from helix_p2p.swarm.status import PeerRates, advance_rates, swarm_state

from .page import render_page
from .server import start_site

logger = logging.getLogger(__name__)

#: how often the bootstrap re-reads the registry for its page (the page itself polls every 2 s)
READ_PERIOD_S = 2.0


class StateView:
    """The latest state of the swarm for the page, with each node's rates since its previous record."""

    def __init__(self, model_id: str | None = None) -> None:
        self.model_id = model_id
        self._rates: dict[str, PeerRates] = {}
        self.state: dict[str, Any] = swarm_state({}, [], time.time(), {}, model_id)

    def update(
        self, records: Mapping[str, NodeRecord], plans: Iterable[PlanRecord], now: float
    ) -> dict[str, Any]:
        live = {p: r for p, r in records.items() if not r.is_stale(now)}
        self._rates = advance_rates(self._rates, live)
        self.state = swarm_state(live, plans, now, self._rates, self.model_id)
        return self.state


def add_dashboard_routes(app: web.Application, state: Callable[[], Mapping[str, Any]]) -> None:
    """`GET /` and `GET /api/state`; `state()` returns the current state (cheap: no I/O)."""

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=render_page(state()), content_type="text/html")

    async def api_state(_: web.Request) -> web.Response:
        return web.json_response(state(), headers={"Cache-Control": "no-store"})

    app.router.add_get("/", page)
    app.router.add_get("/api/state", api_state)


async def watch_swarm(dht: Any, view: StateView, period_s: float = READ_PERIOD_S) -> None:
    """Read the registry and the plans every `period_s` into `view` (forever; cancel to stop). A
    lookup can miss entries, so a record read before stays until it goes stale by its own times."""
    records: dict[str, NodeRecord] = {}
    while True:
        try:
            fresh, signed = await asyncio.wait_for(dht.read(), timeout=max(5.0, 4 * period_s))
        except Exception as e:  # noqa: BLE001 - a DHT hiccup of any kind: the last state stays shown
            logger.info("reading the swarm for the status page failed: %r", e)
        else:
            for peer, record in fresh.items():
                if peer not in records or record.updated_at >= records[peer].updated_at:
                    records[peer] = record
            now = time.time()
            records = {p: r for p, r in records.items() if not r.is_stale(now)}
            view.update(records, [p.record for p in signed], now)
        await asyncio.sleep(period_s)


class SwarmPage:
    """A status page served on its own port, fed by `watch_swarm`; `close()` stops both."""

    def __init__(self, runner: web.AppRunner, watcher: asyncio.Task) -> None:
        self.runner = runner
        self.watcher = watcher

    async def close(self) -> None:
        self.watcher.cancel()
        await asyncio.gather(self.watcher, return_exceptions=True)
        await self.runner.cleanup()


async def serve_swarm_page(dht: Any, host: str, port: int) -> SwarmPage:
    """Serve the status page of the swarm `dht` reads on host:port (HelixError if the port is taken)."""
    view = StateView()
    app = web.Application()
    add_dashboard_routes(app, lambda: view.state)
    runner = await start_site(app, host, port, "status page")
    return SwarmPage(runner, asyncio.create_task(watch_swarm(dht, view), name="status page"))
