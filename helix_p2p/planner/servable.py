"""The planner's last stage: among placements, the one whose flow can actually be served.

A deliberate deviation from DESIGN.md's pure max flow. The max flow prices compute and links but
neither pipeline depth nor KV concurrency, while a request is served one token at a time: each
decode step passes every hop of its pipeline before the next one starts. By Little's law a
placement P serves at most
    served(P) ~ min(r * F_P, N / (h * D_P))          decode tokens/s
where F_P is its max flow (r the decode share of the tokens it carries), N the requests the KV
caches admit at once, h the time of one hop of a step, and D_P = (sum of node flows) / F_P the mean
number of nodes a token passes (a token counts once on every node it crosses).

Measured in our simulator (LLaMA-2-70B on Helix's 24 GPUs, offline, 300 s after 100 s of warm-up):
the proven max-flow optimum (F 2045.6) is one 24-hop chain; its nodes are 12-22 % busy, its A100s'
KV caches full (~490 requests in flight) and a token takes 2.74 s, so it serves 178 tokens/s.
Helix's published placement (F 1289.6) serves 237, a 14-hop stage placement of F 1515.7 serves 270,
a 12-hop one of F 1392.6 serves 353. h stays 0.10-0.12 s and N 350-490: served tracks N / (h D),
not F. On LLaMA-1-30B the same cluster is flow-bound instead (50-100 requests in flight): shallow
placements of little flow serve less (F 954 in 5 hops: 259) than deeper ones of more (F 1309 in 8
hops: 324).

The planner knows F_P and D_P exactly (the max flow of the placement) but not N, h or r: KV
budgets and step times are not in helix-cluster/1, and all three move with the workload. Since
min(a, b) <= sqrt(a b),
    served(P) <= sqrt(r N / h) * sqrt(F_P / D_P),
a bound monotone in the *flow per hop* F_P / D_P = F_P^2 / (sum of node flows) whatever N, h and r
are; the planner publishes the candidate of largest flow per hop (ties: the larger flow).
Candidates: the max-flow placement (so a cluster whose best flow is also shallow keeps it) and
heuristics.shallow_stage_placement at every target flow that some number of one type's members
reach at some stage length (the flows at which such a structure changes). On 70B the choice is
F 1392.6 in 12 hops (116 per hop against the chain's 85). The proxy does not know which side of
the min binds: on the flow-bound 30B cluster it picks F 954.1 in 5 hops (191 per hop; serves 259)
over F 1308.8 in 8 (164; serves 324), still above the max-flow placement's 239.

The plan's objective stays the chosen placement's exact max flow; its bound stays the max-flow
search's proven bound on any placement (so the gap shows what the choice gave up)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from helix_p2p.cluster import Cluster
from helix_p2p.flow import max_flow
from helix_p2p.plan import Placement
from helix_p2p.planner.core import PlanOptions

#: at most this many target flows are tried (evenly spread over the sorted distinct ones)
MAX_TARGETS = 256
#: share of the time limit the max-flow search leaves to this stage (24 nodes: 0.2 s of CPU)
STAGE_TIME_SHARE = 0.1


@dataclass(frozen=True)
class Servability:
    """A placement's figures for this stage, from its exact max flow."""

    flow_tokens_per_s: float
    #: mean number of nodes a token passes: sum of node flows / flow
    mean_hops: float


def servability(cluster: Cluster, placement: Placement) -> Servability:
    result = max_flow(cluster, placement)
    flow = result.value_tokens_per_s
    through_nodes = sum(result.node_flow_tokens_per_s.values())
    return Servability(flow, through_nodes / flow if flow > 0 else 0.0)


def flow_per_hop(s: Servability) -> float:
    return s.flow_tokens_per_s / s.mean_hops if s.mean_hops > 0 else 0.0


def stage_targets(cluster: Cluster) -> list[float]:
    """Flows at which a one-type stage structure changes: m members of a type at stage length k."""
    act = cluster.model.activation_bytes
    groups: dict[tuple, int] = {}
    specimen = {}
    for node in cluster.nodes:
        key = (node.max_layers, node.tokens_per_s)
        groups[key] = groups.get(key, 0) + 1
        specimen[key] = node
    targets = set()
    for key, count in groups.items():
        node = specimen[key]
        for k in range(1, min(node.max_layers, cluster.model.num_layers) + 1):
            cap = node.capacity_tokens_per_s(k, act)
            if cap > 0:
                targets.update(cap * m for m in range(1, count + 1))
    ordered = sorted(targets)
    if len(ordered) > MAX_TARGETS:
        step = len(ordered) / MAX_TARGETS
        ordered = [ordered[int(i * step)] for i in range(MAX_TARGETS)]
    return ordered


@dataclass(frozen=True)
class StageResult:
    placement: Placement
    details: dict[str, object]


def most_servable(cluster: Cluster, best: Placement, deadline: float) -> StageResult:
    """The candidate (see the module docstring) of most flow per hop; `best` is the max-flow one."""
    from helix_p2p.planner.heuristics import shallow_stage_placement

    first = servability(cluster, best)
    placements: list[Placement] = [best]
    figures: list[Servability] = [first]
    seen = {(round(first.flow_tokens_per_s, 6), round(first.mean_hops, 6))}
    for target in stage_targets(cluster):
        if time.monotonic() > deadline:
            break
        placement = shallow_stage_placement(cluster, list(cluster.nodes), target)
        if not placement:
            continue
        s = servability(cluster, placement)
        key = (round(s.flow_tokens_per_s, 6), round(s.mean_hops, 6))
        if s.flow_tokens_per_s <= 0 or key in seen:
            continue
        seen.add(key)
        placements.append(placement)
        figures.append(s)
    # most flow per hop, then most flow; the max-flow placement (index 0) wins exact ties on both
    chosen = max(
        range(len(figures)), key=lambda i: (flow_per_hop(figures[i]), figures[i].flow_tokens_per_s, -i)
    )
    details = {
        "max_flow_placement_tokens_per_s": round(first.flow_tokens_per_s, 3),
        "max_flow_placement_mean_hops": round(first.mean_hops, 3),
        "chosen_tokens_per_s": round(figures[chosen].flow_tokens_per_s, 3),
        "chosen_mean_hops": round(figures[chosen].mean_hops, 3),
        "chosen_flow_per_hop_tokens_per_s": round(flow_per_hop(figures[chosen]), 3),
        "max_flow_placement_flow_per_hop_tokens_per_s": round(flow_per_hop(first), 3),
        "candidates": len(figures),
    }
    return StageResult(placements[chosen], details)


def stage_reserve_s(options: PlanOptions) -> float:
    """Seconds the max-flow search leaves for this stage."""
    if not options.servable or options.partial_inference:
        return 0.0
    return STAGE_TIME_SHARE * options.time_limit_s
