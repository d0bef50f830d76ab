"""Per-request pipelines: which peers serve a request, chosen once at admission and kept for its
decode steps.

The seam between allocation and routing
---------------------------------------
The planner (`helix_p2p.planner`) decides *where layers live* and *how much traffic each edge
should carry*: a `Plan` with a placement and max-flow edge flows. It runs rarely (on churn).
Routing (this package) decides *which peers serve one request*, per request, from three inputs:

- the `Plan` (through a `RouteGraph`): the edges a request may take and the planned tokens/s on
  each, which IWRR uses as weights;
- a snapshot of each node's load (`NodeLoad`): free KV-cache tokens, its budget, queued work;
- the request's size (`RouteRequest`): prompt tokens and the most tokens it may generate.

and returns a `Pipeline` (the hops, each a peer and the layers `[start, end)` it runs) or a
`NoRoute` with a reason. Routers never touch the network or a clock; the simulator feeds them
simulated loads and the live client feeds them the loads nodes publish in the DHT, so one router
serves both. A router keeps only its own balancing state (IWRR counters, EWMAs) between calls.

The search walks from the source hop by hop. At each vertex the router ranks the out-edges (IWRR by
planned flow, or a baseline's rule) and takes the first one whose node can hold the request's KV
cache; if that node turns out to be a dead end (nothing after it can), it backs up and tries the
next, so a route is found whenever one exists. Only the hops finally taken are charged to IWRR."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from helix_p2p.cluster import SINK, SOURCE, Cluster, NodeId
from helix_p2p.flow import build_flow_graph
from helix_p2p.plan import Plan
from helix_p2p.routing.iwrr import IWRR


@dataclass(frozen=True)
class Hop:
    """One stage of a request's pipeline: `peer` runs layers [start, end)."""

    peer: NodeId
    start: int
    end: int

    @property
    def layers(self) -> tuple[int, int]:
        return (self.start, self.end)

    @property
    def num_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Pipeline:
    hops: tuple[Hop, ...]
    #: KV-cache tokens reserved on every hop for this request
    kv_tokens: int

    @property
    def peers(self) -> tuple[NodeId, ...]:
        return tuple(h.peer for h in self.hops)

    def as_list(self) -> list[tuple[NodeId, tuple[int, int]]]:
        """The pipeline as [(peer, (start, end)), ...]."""
        return [(h.peer, h.layers) for h in self.hops]


@dataclass(frozen=True)
class RouteRequest:
    prompt_tokens: int
    #: the most tokens the request may generate (a client always declares it)
    max_new_tokens: int

    @property
    def kv_tokens(self) -> int:
        """KV-cache tokens the request may fill on each hop: its whole context at the end."""
        return self.prompt_tokens + self.max_new_tokens

    @property
    def workload_tokens(self) -> int:
        """Tokens the request pushes through its pipeline; what IWRR charges a hop."""
        return self.prompt_tokens + self.max_new_tokens


class NodeLoad(Protocol):
    """What a router needs to know of a node right now (the simulator's node state and the live
    client's view of the DHT both provide it)."""

    @property
    def free_kv_tokens(self) -> int: ...
    @property
    def kv_budget_tokens(self) -> int: ...
    @property
    def queued_tokens(self) -> int: ...
    @property
    def accepting(self) -> bool: ...


@dataclass(frozen=True)
class NodeStatus:
    """A plain NodeLoad, for callers without their own node state objects."""

    free_kv_tokens: int
    kv_budget_tokens: int
    queued_tokens: int = 0
    accepting: bool = True


class NoRouteReason(str, Enum):
    #: a route exists but some hop lacks free KV cache now; waiting can help
    KV_FULL = "kv_full"
    #: the request's KV would not fit a whole node's budget on any route; waiting cannot help
    TOO_LONG = "too_long"
    #: a route would have room, but passes a node that is not accepting yet (loading layers)
    NOT_READY = "not_ready"
    #: no source-to-sink path over the plan's live nodes; waiting cannot help (until re-planning)
    NO_PATH = "no_path"


@dataclass(frozen=True)
class NoRoute:
    reason: NoRouteReason
    detail: str


class RouteGraph:
    """A plan's routing graph: per vertex (source or node) its out-edges and their planned flows.

    With `cluster`, every edge the placement enables is present (baselines may use edges the max
    flow left empty); without it, only edges that carry planned flow."""

    def __init__(self, plan: Plan, cluster: Cluster | None = None) -> None:
        self.plan = plan
        self.placement: dict[NodeId, tuple[int, int]] = dict(plan.placement)
        self.partial_inference = plan.partial_inference
        planned = {(f.src, f.dst): f.tokens_per_s for f in plan.flows}
        if cluster is not None:
            self.num_layers = cluster.model.num_layers
            pairs: Iterable[tuple[str, str]] = [
                (e.src, e.dst)
                for e in build_flow_graph(cluster, self.placement, plan.partial_inference).edges
            ]
        else:
            self.num_layers = max((end for _, end in self.placement.values()), default=0)
            pairs = [pair for pair, value in planned.items() if value > 0]
        out: dict[str, list[str]] = {}
        for src, dst in pairs:
            if src != SOURCE and src not in self.placement or dst != SINK and dst not in self.placement:
                continue
            out.setdefault(src, []).append(dst)
        # Sorted, so the graph (and every seeded choice over it) does not depend on file order.
        self.out_edges: dict[str, tuple[str, ...]] = {v: tuple(sorted(d)) for v, d in out.items()}
        self.planned_tokens_per_s: dict[str, tuple[float, ...]] = {
            v: tuple(planned.get((v, d), 0.0) for d in dsts) for v, dsts in self.out_edges.items()
        }

    def hop(self, dst: NodeId, entry_layer: int) -> Hop:
        """The hop a request entering `dst` at layer boundary `entry_layer` runs there."""
        start, end = self.placement[dst]
        if self.partial_inference:
            start = entry_layer
        return Hop(dst, start, end)


def _free_kv(load: NodeLoad) -> int:
    return load.free_kv_tokens


def _kv_budget(load: NodeLoad) -> int:
    return load.kv_budget_tokens


class Router:
    """Chooses pipelines over a RouteGraph. Subclasses rank a vertex's out-edges (`_rank`) and may
    keep balancing state (`_commit`); the search, KV checks and reasons are shared."""

    name = "router"

    def __init__(self, graph: RouteGraph, seed: int = 0) -> None:
        self.graph = graph
        self.seed = seed

    # -- what subclasses provide
    def _rank(
        self, vertex: str, candidates: list[int], request: RouteRequest, loads: Mapping[NodeId, NodeLoad]
    ) -> list[int]:
        """Indices into graph.out_edges[vertex], best first (only those in `candidates`)."""
        raise NotImplementedError

    def _commit(self, vertex: str, index: int, request: RouteRequest, eligible: Sequence[bool]) -> None:
        """Record that the chosen route leaves `vertex` by out-edge `index`."""

    def observe_hop(self, src: str, dst: str, seconds: float) -> None:
        """Feedback from the data path: a request took `seconds` from leaving `src` until `dst`
        finished its layers. Only measurement-driven routers use it."""

    # -- the search
    def route(self, request: RouteRequest, loads: Mapping[NodeId, NodeLoad]) -> Pipeline | NoRoute:
        if request.prompt_tokens < 1 or request.max_new_tokens < 0:
            raise ValueError(f"bad request size: {request}")
        found = self._search(request, loads, _free_kv, ready_only=True, rank=True)
        if found is not None:
            hops, choices = found
            for vertex, index, eligible in choices:
                self._commit(vertex, index, request, eligible)
            return Pipeline(hops, request.kv_tokens)
        # Explain the failure, most hopeful first: would the request fit if the KV in use were
        # free, or once loading nodes are ready, or never?
        if self._search(request, loads, _kv_budget, ready_only=True, rank=False) is not None:
            return NoRoute(
                NoRouteReason.KV_FULL, f"every route has a hop without {request.kv_tokens} free KV tokens"
            )
        if self._search(request, loads, _kv_budget, ready_only=False, rank=False) is not None:
            return NoRoute(
                NoRouteReason.NOT_READY,
                "every route with room passes a node that is not accepting requests yet",
            )
        if self._search(request, loads, None, ready_only=False, rank=False) is not None:
            return NoRoute(
                NoRouteReason.TOO_LONG,
                f"the request needs {request.kv_tokens} KV tokens per hop, more than a whole node holds on any route",
            )
        return NoRoute(NoRouteReason.NO_PATH, "no source-to-sink path over the plan's live nodes")

    def _search(
        self,
        request: RouteRequest,
        loads: Mapping[NodeId, NodeLoad],
        room: Callable[[NodeLoad], int] | None,
        ready_only: bool,
        rank: bool,
    ) -> tuple[tuple[Hop, ...], list[tuple[str, int, list[bool]]]] | None:
        """Depth-first from the source; `room(load)` is the KV a node offers (None: ignore KV);
        nodes absent from `loads` are gone, and with `ready_only` so are those not accepting.
        Returns (hops, [(vertex, chosen out-edge index, eligibility mask)]) or None."""
        graph = self.graph
        need = request.kv_tokens
        dead: set[tuple[str, int]] = set()  # (vertex, entry layer) with no way to the sink

        def fits(dst: str) -> bool:
            if dst == SINK:
                return True
            load = loads.get(dst)
            if load is None or ready_only and not load.accepting:
                return False
            return room is None or room(load) >= need

        def walk(vertex: str, layer: int):
            if (vertex, layer) in dead:
                return None
            dsts = graph.out_edges.get(vertex, ())
            eligible = [fits(d) and (d != SINK or layer == graph.num_layers) for d in dsts]
            candidates = [i for i, ok in enumerate(eligible) if ok]
            if rank and candidates:
                candidates = self._rank(vertex, candidates, request, loads)
            for i in candidates:
                dst = dsts[i]
                if dst == SINK:
                    return [], [(vertex, i, eligible)]
                hop = graph.hop(NodeId(dst), layer)
                rest = walk(dst, hop.end)
                if rest is not None:
                    hops, choices = rest
                    return [hop, *hops], [(vertex, i, eligible), *choices]
            dead.add((vertex, layer))
            return None

        result = walk(SOURCE, 0)
        if result is None:
            return None
        hops, choices = result
        return tuple(hops), choices


class IwrrRouter(Router):
    """Helix's scheduler: at each vertex, IWRR over the out-edges weighted by the plan's flows,
    charged by the request's tokens. Edges without planned flow are never used."""

    name = "iwrr"

    def __init__(self, graph: RouteGraph, seed: int = 0) -> None:
        super().__init__(graph, seed)
        self._iwrr = {
            vertex: IWRR(weights, seed=seed * 1_000_003 + i)
            for i, (vertex, weights) in enumerate(sorted(graph.planned_tokens_per_s.items()))
        }

    def _rank(self, vertex, candidates, request, loads):
        mask = [False] * len(self.graph.out_edges[vertex])
        for i in candidates:
            mask[i] = True
        return self._iwrr[vertex].order(request.workload_tokens, mask)

    def _commit(self, vertex, index, request, eligible):
        self._iwrr[vertex].commit(index, request.workload_tokens, eligible)

    def split(self, vertex: str) -> dict[str, float]:
        """Share of the tokens routed out of `vertex` that went to each out-neighbour so far."""
        shares = self._iwrr[vertex].shares()
        return dict(zip(self.graph.out_edges[vertex], shares))
