"""Fast placements that warm-start the MILP (and answer alone when the MILP finds nothing better).
Each candidate is scored by the exact max flow; the best one wins."""

from __future__ import annotations

from helix_p2p.cluster import Cluster, NodeId, NodeSpec
from helix_p2p.flow import max_flow
from helix_p2p.plan import Plan
from helix_p2p.planner import baselines
from helix_p2p.planner.core import PlanOptions

Placement = dict[NodeId, tuple[int, int]]


def pipeline_partitions(cluster: Cluster, max_candidates: int = 64) -> list[Placement]:
    """Disjoint pipelines: nodes ordered by per-layer speed are dealt in snake order into m
    groups, each group's layers balanced by `baselines.balanced_pipeline`. One candidate per m.
    A single pipeline over every node is the m = 1 case (it is the optimum of Helix's 10-GPU
    cluster); many pipelines suit large clusters whose nodes each hold a big share."""
    num_layers = cluster.model.num_layers
    act = cluster.model.activation_bytes
    nodes = sorted(cluster.nodes, key=lambda n: -n.capacity_tokens_per_s(1, act))
    total = cluster.total_max_layers()
    most = max(1, total // num_layers)
    step = max(1, most // max_candidates)
    out = []
    for m in range(1, most + 1, step):
        groups: list[list[NodeSpec]] = [[] for _ in range(m)]
        for i, node in enumerate(nodes):
            lap, pos = divmod(i, m)
            groups[pos if lap % 2 == 0 else m - 1 - pos].append(node)
        placement: Placement = {}
        for group in groups:
            if sum(min(n.max_layers, num_layers) for n in group) >= num_layers:
                placement.update(_fit_pipeline(group, num_layers, act))
        if placement:
            out.append(placement)
    return out


def _fit_pipeline(group: list[NodeSpec], num_layers: int, act: int) -> Placement:
    """A balanced pipeline over as few of the group's nodes as needed, fastest first, using the
    rest too while that raises the pipeline's bottleneck."""
    best: Placement = {}
    best_flow = -1.0
    for size in range(1, len(group) + 1):
        members = group[:size]
        if sum(min(n.max_layers, num_layers) for n in members) < num_layers:
            continue
        pipe = baselines.balanced_pipeline(members, num_layers, act)
        by_id = {n.id: n for n in members}
        flow = min(by_id[n].capacity_tokens_per_s(e - s, act) for n, (s, e) in pipe.items())
        if flow > best_flow:
            best, best_flow = pipe, flow
    return best


def candidate_placements(cluster: Cluster, options: PlanOptions, previous: Plan | None = None) -> list[Placement]:
    candidates = [
        baselines.swarm_placement(cluster),
        baselines.separate_pipelines_placement(cluster),
        baselines.petals_placement(cluster, seed=options.seed),
        *pipeline_partitions(cluster),
    ]
    if previous is not None:
        kept = {n: r for n, r in previous.placement.items() if n in cluster.node_by_id}
        candidates.append(kept)
    return candidates


def best_heuristic_placement(cluster: Cluster, options: PlanOptions, previous: Plan | None = None) -> Placement:
    return max(
        candidate_placements(cluster, options, previous),
        key=lambda p: max_flow(cluster, p).value_tokens_per_s,
    )
