"""The flow graph of a placement and its exact maximum flow (DESIGN.md, "The flow model").

Vertices: `source`, `sink`, and every placed node. A node's capacity (tokens/s for the layers it
holds, capped by its NIC) is a vertex capacity, modelled by splitting the node into an in-half and
an out-half joined by one arc. Edges:
- `source -> i` iff start_i == 0, capacity out_bytes_per_s / token_bytes
- `i -> sink`   iff end_i == L,   capacity in_bytes_per_s / token_bytes
- `i -> j`      iff end_i == start_j (or, with partial inference, start_j <= end_i < end_j) and a
  link i -> j exists; capacity bytes_per_s / activation_bytes.
With partial inference, j runs only layers end_i .. end_j-1 for flow from i, but we still charge it
j's full per-token capacity: a conservative choice that keeps the node a single vertex.

The solver is Dinic's algorithm on float capacities; the graphs are small (edges only join
matching layer boundaries), so exactness matters more than speed here."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from helix_p2p.cluster import SINK, SOURCE, Cluster, NodeId
from helix_p2p.errors import HelixError
from helix_p2p.plan import EdgeFlow, Placement


class FlowCheckError(HelixError, ValueError):
    """Edge flows that are not a feasible flow of their placement (e.g. a corrupted plan file)."""


@dataclass(frozen=True)
class FlowEdge:
    src: str
    dst: str
    capacity_tokens_per_s: float


@dataclass(frozen=True)
class FlowGraph:
    """The flow network of one placement: node capacities and the edges the placement enables."""

    node_capacity_tokens_per_s: dict[NodeId, float]
    edges: tuple[FlowEdge, ...]


@dataclass(frozen=True)
class MaxFlow:
    value_tokens_per_s: float
    #: flows on the graph's edges (node capacities are not edges), only those carrying flow
    flows: tuple[EdgeFlow, ...]
    #: tokens/s through each placed node
    node_flow_tokens_per_s: dict[NodeId, float]


def edge_enabled(end_i: int, start_j: int, end_j: int, partial_inference: bool) -> bool:
    """Whether layers handed on at boundary end_i can continue on a node holding [start_j, end_j)."""
    if partial_inference:
        return start_j <= end_i < end_j
    return end_i == start_j


def build_flow_graph(cluster: Cluster, placement: Placement, partial_inference: bool = False) -> FlowGraph:
    num_layers = cluster.model.num_layers
    caps = {
        node_id: cluster.node_capacity_tokens_per_s(node_id, end - start)
        for node_id, (start, end) in placement.items()
    }
    edges: list[FlowEdge] = []
    by_start: dict[int, list[NodeId]] = {}
    for node_id, (start, _) in placement.items():
        by_start.setdefault(start, []).append(node_id)
    for node_id, (start, end) in placement.items():
        if start == 0 and (cap := cluster.source_tokens_per_s(node_id)) > 0:
            edges.append(FlowEdge(SOURCE, node_id, cap))
        if end == num_layers and (cap := cluster.sink_tokens_per_s(node_id)) > 0:
            edges.append(FlowEdge(node_id, SINK, cap))
    for src, (_, end_i) in placement.items():
        if end_i == num_layers:
            continue
        if partial_inference:
            candidates = [j for j, (s, e) in placement.items() if s <= end_i < e and j != src]
        else:
            candidates = by_start.get(end_i, [])
        for dst in candidates:
            cap = cluster.link_tokens_per_s(src, dst)
            if cap > 0:
                edges.append(FlowEdge(src, dst, cap))
    return FlowGraph(caps, tuple(edges))


def max_flow(cluster: Cluster, placement: Placement, partial_inference: bool = False) -> MaxFlow:
    """The exact max source-to-sink flow of a placement, with per-edge flows."""
    return solve_flow_graph(build_flow_graph(cluster, placement, partial_inference))


def solve_flow_graph(graph: FlowGraph) -> MaxFlow:
    net = _Network()
    for node_id, cap in graph.node_capacity_tokens_per_s.items():
        net.add_arc(("in", node_id), ("out", node_id), cap)
    reported: list[tuple[FlowEdge, int]] = []
    for edge in graph.edges:
        tail = SOURCE if edge.src == SOURCE else ("out", edge.src)
        head = SINK if edge.dst == SINK else ("in", edge.dst)
        reported.append((edge, net.add_arc(tail, head, edge.capacity_tokens_per_s)))
    value = net.max_flow(SOURCE, SINK)
    flows = tuple(
        EdgeFlow(edge.src, edge.dst, net.flow_on(arc)) for edge, arc in reported if net.flow_on(arc) > 0
    )
    node_flow = {node_id: net.flow_on(2 * i) for i, node_id in enumerate(graph.node_capacity_tokens_per_s)}
    return MaxFlow(value, flows, node_flow)


class _Network:
    """Dinic's max-flow on float capacities. Arcs are stored in pairs (arc, arc ^ 1 = its reverse)."""

    def __init__(self) -> None:
        self.index: dict[object, int] = {}
        self.adjacency: list[list[int]] = []
        self.head: list[int] = []
        self.residual: list[float] = []
        self.capacity: list[float] = []
        # Flows are kept as the sum of what was pushed, not read back as capacity - residual: on a
        # 5e8 tokens/s coordinator edge carrying 231 tokens/s that difference is off by ~1e-7.
        self.flow: list[float] = []
        # An arc counts as saturated when its residual is below this (1e-12 of its pair's capacity),
        # so float round-off cannot create endless augmenting paths of 1e-17, while a small arc
        # in a graph of huge ones is still seen.
        self.eps: list[float] = []

    def _vertex(self, key: object) -> int:
        if key not in self.index:
            self.index[key] = len(self.adjacency)
            self.adjacency.append([])
        return self.index[key]

    def add_arc(self, tail: object, head: object, capacity: float) -> int:
        u, v = self._vertex(tail), self._vertex(head)
        arc = len(self.head)
        self.head += [v, u]
        self.residual += [capacity, 0.0]
        self.capacity += [capacity, 0.0]
        self.flow += [0.0, 0.0]
        self.eps += [1e-12 * capacity] * 2
        self.adjacency[u].append(arc)
        self.adjacency[v].append(arc + 1)
        return arc

    def flow_on(self, arc: int) -> float:
        return min(self.capacity[arc], max(0.0, self.flow[arc]))

    def max_flow(self, source: object, sink: object) -> float:
        if source not in self.index or sink not in self.index:
            return 0.0
        s, t = self.index[source], self.index[sink]
        total = 0.0
        while True:
            level = self._levels(s, t)
            if level[t] < 0:
                return total
            cursor = [0] * len(self.adjacency)
            while (pushed := self._augment(s, t, level, cursor)) > 0:
                total += pushed

    def _levels(self, s: int, t: int) -> list[int]:
        level = [-1] * len(self.adjacency)
        level[s] = 0
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for arc in self.adjacency[u]:
                v = self.head[arc]
                if level[v] < 0 and self.residual[arc] > self.eps[arc]:
                    level[v] = level[u] + 1
                    queue.append(v)
        return level

    def _augment(self, s: int, t: int, level: list[int], cursor: list[int]) -> float:
        """Find one blocking-flow path from s to t iteratively (no recursion limit at 1,000 nodes)."""
        path: list[int] = []
        u = s
        while True:
            if u == t:
                pushed = min(self.residual[arc] for arc in path)
                for arc in path:
                    self.residual[arc] -= pushed
                    self.residual[arc ^ 1] += pushed
                    self.flow[arc] += pushed
                    self.flow[arc ^ 1] -= pushed
                return pushed
            arcs = self.adjacency[u]
            advanced = False
            while cursor[u] < len(arcs):
                arc = arcs[cursor[u]]
                v = self.head[arc]
                if self.residual[arc] > self.eps[arc] and level[v] == level[u] + 1:
                    path.append(arc)
                    u = v
                    advanced = True
                    break
                cursor[u] += 1
            if not advanced:
                if not path:
                    return 0.0
                # dead end: retreat and skip the arc that led here
                level[u] = -1
                arc = path.pop()
                u = self.head[arc ^ 1]
                cursor[u] += 1


def check_flows(
    cluster: Cluster,
    placement: Placement,
    flows: tuple[EdgeFlow, ...] | list[EdgeFlow],
    partial_inference: bool = False,
    rel_tol: float = 1e-9,
) -> float:
    """Verify that `flows` is a feasible flow for `placement`: only enabled edges, each within its
    capacity, conservation at every node, node capacities respected. Returns the flow value
    (tokens/s leaving the source); raises FlowCheckError (a ValueError) naming the first violation."""
    graph = build_flow_graph(cluster, placement, partial_inference)
    capacity = {(e.src, e.dst): e.capacity_tokens_per_s for e in graph.edges}
    inflow: dict[str, float] = {}
    outflow: dict[str, float] = {}
    seen: set[tuple[str, str]] = set()
    for f in flows:
        cap = capacity.get((f.src, f.dst))
        if cap is None:
            raise FlowCheckError(f"flow on {f.src} -> {f.dst}, which this placement does not enable")
        # each edge once: two entries could each fit its capacity while together exceeding it
        if (f.src, f.dst) in seen:
            raise FlowCheckError(f"flow on {f.src} -> {f.dst} listed twice")
        seen.add((f.src, f.dst))
        # NaN compares false with everything, so it would pass every check below
        if not math.isfinite(f.tokens_per_s) or f.tokens_per_s < 0:
            raise FlowCheckError(f"flow {f.tokens_per_s} on {f.src} -> {f.dst} is not a finite number >= 0")
        if f.tokens_per_s > cap * (1 + rel_tol) + 1e-9:
            raise FlowCheckError(f"flow {f.tokens_per_s} on {f.src} -> {f.dst} exceeds its capacity {cap}")
        outflow[f.src] = outflow.get(f.src, 0.0) + f.tokens_per_s
        inflow[f.dst] = inflow.get(f.dst, 0.0) + f.tokens_per_s
    for node_id, cap in graph.node_capacity_tokens_per_s.items():
        fin, fout = inflow.get(node_id, 0.0), outflow.get(node_id, 0.0)
        scale = max(1.0, fin, fout)
        if abs(fin - fout) > rel_tol * scale + 1e-9:
            raise FlowCheckError(f"node {node_id}: {fin} tokens/s in but {fout} out")
        if fin > cap * (1 + rel_tol) + 1e-9:
            raise FlowCheckError(f"node {node_id}: {fin} tokens/s exceeds its capacity {cap}")
    return outflow.get(SOURCE, 0.0)
