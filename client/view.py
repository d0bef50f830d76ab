"""The client's view of the swarm: the registry and the plan it follows, read from the DHT as a
client-mode peer and refreshed in the background, plus the routes it takes over them.

Routes come from the simulator issue's router (`IwrrRouter` over the followed plan's flows), fed
with the loads nodes publish in their records; a node that is stale, not serving its planned range,
without free KV for the request, or avoided after failing is no candidate. When the plan has no
route left (its nodes died and the planner has not re-planned yet), the view falls back to any
chain of live serving nodes whose layers tile the model, so a client outlives a planner's delay."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from helix_p2p.protocol.messages import RouteHop, route_from_pipeline
from helix_p2p.routing import IwrrRouter, NodeStatus, NoRoute, RouteGraph, RouteRequest
from helix_p2p.swarm.election import choose_plan, elect_planner
from helix_p2p.swarm.records import NodeRecord, NodeState, PlanRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """The registry and the followed plan as read at `read_at` (wall-clock seconds)."""

    records: Mapping[str, NodeRecord]
    plan: PlanRecord | None
    read_at: float
    #: peers banned for lying by enough distinct reporters (`helix_p2p.swarm.reports`)
    banned: frozenset[str] = frozenset()

    def live(self, now: float) -> dict[str, NodeRecord]:
        return {p: r for p, r in self.records.items() if r.is_live(now)}


def view_time(snapshot: Snapshot, now: float) -> float:
    """The time at which to judge the records' liveness: now, unless the view itself is behind.
    When lookups fail for a while (a DHT peer holding registry entries stalls, and hivemind answers
    from its cache), every record looks stale by the clock although the nodes are fine; judging
    them against the newest record in view keeps the last good view usable. Peers that really
    failed are avoided by the client after their first failure anyway."""
    newest = max((r.updated_at + r.refresh_s for r in snapshot.records.values()), default=now)
    return min(now, newest)


def follow_plan(
    records: Mapping[str, NodeRecord], plans: Iterable[PlanRecord], current: PlanRecord | None, model_id: str
) -> PlanRecord | None:
    """The plan a node with this view follows (the election rule of `helix_p2p.swarm.election`)."""
    elected = elect_planner(records, time.time(), model_id)
    return choose_plan(plans, elected, current, model_id)


def _serving(record: NodeRecord, model_id: str) -> bool:
    return record.state == NodeState.SERVING and record.layers is not None and record.model.id == model_id


class RoutePicker:
    """Chooses routes for one model over successive snapshots; keeps the IWRR counters for as long
    as the plan stays the same (a new plan gets a new router)."""

    def __init__(self, model_id: str, seed: int = 0) -> None:
        self.model_id = model_id
        self.seed = seed
        self._router: IwrrRouter | None = None
        self._router_plan: tuple[str, int] | None = None

    def _router_for(self, plan: PlanRecord) -> IwrrRouter:
        key = (plan.planner, plan.epoch)
        if self._router is None or self._router_plan != key:
            self._router = IwrrRouter(RouteGraph(plan), seed=self.seed)  # type: ignore[arg-type]
            self._router_plan = key
        return self._router

    def pick(
        self,
        snapshot: Snapshot,
        prompt_tokens: int,
        max_new_tokens: int,
        avoid: set[str],
        now: float | None = None,
    ) -> tuple[tuple[RouteHop, ...] | None, str]:
        """A route for a request of this size, or (None, why there is none)."""
        now = view_time(snapshot, time.time()) if now is None else now
        live = {p: r for p, r in snapshot.live(now).items() if p not in avoid and _serving(r, self.model_id)}
        need = prompt_tokens + max_new_tokens
        why = "no plan has been published for this model yet"
        plan = snapshot.plan
        if plan is not None:
            loads = {
                p: NodeStatus(
                    free_kv_tokens=r.free_kv_tokens,
                    kv_budget_tokens=r.free_kv_tokens,
                    accepting=r.layers == plan.placement.get(p),
                )
                for p, r in live.items()
                if p in plan.placement
            }
            found = self._router_for(plan).route(RouteRequest(prompt_tokens, max_new_tokens), loads)
            if not isinstance(found, NoRoute):
                return route_from_pipeline(found), ""
            why = f"the plan (epoch {plan.epoch}) has no route: {found.detail}"
        fallback = chain_over_records(live, need)
        if fallback is not None:
            return fallback, ""
        return None, why + self._coverage(live)

    def _coverage(self, live: Mapping[str, NodeRecord]) -> str:
        if not live:
            return "; no live node serves the model"
        num_layers = next(iter(live.values())).model.num_layers
        held = {layer for r in live.values() if r.layers for layer in range(*r.layers)}
        missing = [layer for layer in range(num_layers) if layer not in held]
        if missing:
            return f"; no live node serves layers {_ranges(missing)}"
        return ""


def _ranges(layers: list[int]) -> str:
    spans: list[list[int]] = []
    for layer in layers:
        if spans and spans[-1][1] == layer:
            spans[-1][1] = layer + 1
        else:
            spans.append([layer, layer + 1])
    return ", ".join(f"[{a}, {b})" for a, b in spans)


def chain_over_records(live: Mapping[str, NodeRecord], need_kv_tokens: int) -> tuple[RouteHop, ...] | None:
    """Any chain of live serving nodes whose layers tile [0, num_layers), each with room for the
    request's KV; fewest hops first, then most free KV (deterministic)."""
    if not live:
        return None
    num_layers = next(iter(live.values())).model.num_layers
    by_start: dict[int, list[NodeRecord]] = {}
    for record in live.values():
        if record.layers is not None and record.free_kv_tokens >= need_kv_tokens:
            by_start.setdefault(record.layers[0], []).append(record)
    for starts in by_start.values():
        starts.sort(key=lambda r: (-(r.layers[1] if r.layers else 0), -r.free_kv_tokens, r.peer_id))
    # breadth-first over layer boundaries: the first time a boundary is reached is by the fewest hops
    previous: dict[int, tuple[int, NodeRecord]] = {}
    frontier = [0]
    while frontier:
        following = []
        for at in frontier:
            for record in by_start.get(at, []):
                assert record.layers is not None
                end = record.layers[1]
                if end not in previous and end != 0:
                    previous[end] = (at, record)
                    following.append(end)
        frontier = following
        if num_layers in previous:
            break
    if num_layers not in previous:
        return None
    hops: list[RouteHop] = []
    at = num_layers
    while at != 0:
        start, record = previous[at]
        hops.append(RouteHop(record.peer_id, start, at))
        at = start
    return tuple(reversed(hops))
