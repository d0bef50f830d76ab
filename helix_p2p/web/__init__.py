"""HTTP faces of the shells, on aiohttp: the swarm's status page with `GET /api/state` (served by
`helix-bootstrap --dashboard-port` and by `helix serve`) and Prometheus' `GET /metrics` (nodes and
the gateway). Not part of the pure core: the shells import it, the core never does."""

from .dashboard import StateView, SwarmPage, add_dashboard_routes, serve_swarm_page, watch_swarm
from .server import add_metrics_route, start_site

__all__ = [
    "StateView",
    "SwarmPage",
    "add_dashboard_routes",
    "add_metrics_route",
    "serve_swarm_page",
    "start_site",
    "watch_swarm",
]
