"""Routing: each request gets its own pipeline, chosen at admission hop by hop over the plan.

`make_router(name, graph, seed)` builds one of `SCHEDULERS`; `router.route(request, loads)` returns a
`Pipeline` or a `NoRoute`; `AdmissionQueue` adds the bounded wait and the reasons for rejection.
The seam with the planner is described in `pipeline.py`. Pure: no I/O, no clock, seeded."""

from __future__ import annotations

from helix_p2p.errors import HelixError
from helix_p2p.routing.admission import AdmissionQueue, Admitted, Queued, Rejected, RejectReason
from helix_p2p.routing.baselines import RandomRouter, ShortestQueueRouter, SwarmRouter
from helix_p2p.routing.iwrr import IWRR
from helix_p2p.routing.pipeline import (
    Hop,
    IwrrRouter,
    NodeLoad,
    NodeStatus,
    NoRoute,
    NoRouteReason,
    Pipeline,
    RouteGraph,
    Router,
    RouteRequest,
)

_ROUTERS: dict[str, type[Router]] = {
    "iwrr": IwrrRouter,
    "random": RandomRouter,
    "shortest-queue": ShortestQueueRouter,
    "swarm": SwarmRouter,
}
SCHEDULERS: tuple[str, ...] = tuple(_ROUTERS)


class UnknownSchedulerError(HelixError, ValueError):
    pass


def make_router(name: str, graph: RouteGraph, seed: int = 0) -> Router:
    cls = _ROUTERS.get(name)
    if cls is None:
        raise UnknownSchedulerError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return cls(graph, seed=seed)


__all__ = [
    "IWRR",
    "SCHEDULERS",
    "AdmissionQueue",
    "Admitted",
    "Hop",
    "IwrrRouter",
    "NoRoute",
    "NoRouteReason",
    "NodeLoad",
    "NodeStatus",
    "Pipeline",
    "Queued",
    "RandomRouter",
    "RejectReason",
    "Rejected",
    "RouteGraph",
    "RouteRequest",
    "Router",
    "ShortestQueueRouter",
    "SwarmRouter",
    "UnknownSchedulerError",
    "make_router",
]
