"""The schedulers Helix is measured against. Same search, same KV checks as `IwrrRouter`; only the
rule that ranks a vertex's out-edges differs, and none of them looks at the plan's flows.

- `RandomRouter`: a uniformly random next hop among the edges the placement enables.
- `ShortestQueueRouter`: the next node with the least queued work (tokens waiting to run there).
- `SwarmRouter`: SWARM's stochastic wiring as Helix re-implemented it: each sender keeps, per next
  hop, an EWMA of the hop times it observed, and a priority; the next hop is the one with the
  smallest priority (the top of a min-heap), and taking it adds its EWMA to its priority. So each
  next hop gets requests in inverse proportion to how slow it has looked, one request at a time,
  whatever its length."""

from __future__ import annotations

import random
from collections.abc import Mapping

from helix_p2p.cluster import SINK, NodeId
from helix_p2p.routing.pipeline import NodeLoad, RouteGraph, Router, RouteRequest


class RandomRouter(Router):
    name = "random"

    def __init__(self, graph: RouteGraph, seed: int = 0) -> None:
        super().__init__(graph, seed)
        self._rng = random.Random(seed)

    def _rank(self, vertex, candidates, request, loads):
        ranked = list(candidates)
        self._rng.shuffle(ranked)
        return ranked


class ShortestQueueRouter(Router):
    name = "shortest-queue"

    def __init__(self, graph: RouteGraph, seed: int = 0) -> None:
        super().__init__(graph, seed)
        rng = random.Random(seed)
        # A fixed seeded tie order per vertex, so equal queues do not always favour the first name.
        self._tie = {}
        for vertex, dsts in sorted(graph.out_edges.items()):
            ranks = list(range(len(dsts)))
            rng.shuffle(ranks)
            self._tie[vertex] = ranks

    def _rank(self, vertex, candidates, request, loads: Mapping[NodeId, NodeLoad]):
        dsts = self.graph.out_edges[vertex]
        tie = self._tie[vertex]

        def queued(i: int) -> int:
            return 0 if dsts[i] == SINK else loads[NodeId(dsts[i])].queued_tokens

        return sorted(candidates, key=lambda i: (queued(i), tie[i]))


class SwarmRouter(Router):
    name = "swarm"

    def __init__(
        self, graph: RouteGraph, seed: int = 0, initial_hop_s: float = 1.0, smoothing: float = 0.2
    ) -> None:
        super().__init__(graph, seed)
        if not initial_hop_s > 0 or not 0 < smoothing <= 1:
            raise ValueError("SwarmRouter needs initial_hop_s > 0 and 0 < smoothing <= 1")
        self.smoothing = smoothing
        #: (sender, next hop) -> EWMA of observed hop seconds
        self.ewma_s: dict[tuple[str, str], float] = {}
        self._priority: dict[tuple[str, str], float] = {}
        rng = random.Random(seed)
        self._tie: dict[str, list[int]] = {}
        for vertex, dsts in sorted(graph.out_edges.items()):
            for dst in dsts:
                self.ewma_s[(vertex, dst)] = initial_hop_s
                self._priority[(vertex, dst)] = initial_hop_s
            ranks = list(range(len(dsts)))
            rng.shuffle(ranks)
            self._tie[vertex] = ranks

    def _rank(self, vertex, candidates, request: RouteRequest, loads):
        # The order successive pops of the sender's min-heap would give (ties in seeded order).
        dsts = self.graph.out_edges[vertex]
        tie = self._tie[vertex]
        return sorted(candidates, key=lambda i: (self._priority[(vertex, dsts[i])], tie[i]))

    def _commit(self, vertex, index, request, eligible):
        key = (vertex, self.graph.out_edges[vertex][index])
        self._priority[key] += self.ewma_s[key]

    def observe_hop(self, src: str, dst: str, seconds: float) -> None:
        key = (src, dst)
        if key in self.ewma_s and seconds >= 0:
            self.ewma_s[key] = self.smoothing * seconds + (1 - self.smoothing) * self.ewma_s[key]
