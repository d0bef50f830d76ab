"""Fast placements that warm-start the MILP (and answer alone when the MILP finds nothing better).
Each candidate is scored by the exact max flow; the best one wins."""

from __future__ import annotations

import math

from helix_p2p.cluster import Cluster, NodeId, NodeSpec
from helix_p2p.flow import max_flow
from helix_p2p.plan import Plan
from helix_p2p.planner import baselines
from helix_p2p.planner.core import PlanOptions

Placement = dict[NodeId, tuple[int, int]]


def pipeline_partitions(cluster: Cluster, max_candidates: int = 16) -> list[Placement]:
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


def candidate_placements(
    cluster: Cluster, options: PlanOptions, previous: Plan | None = None
) -> list[Placement]:
    candidates = [
        baselines.swarm_placement(cluster),
        baselines.separate_pipelines_placement(cluster),
        baselines.petals_placement(cluster, seed=options.seed),
        # Long pipelines suit small clusters; at hundreds of nodes stages win and this is slow.
        *(pipeline_partitions(cluster) if len(cluster.nodes) <= 64 else []),
        stage_placement(cluster, list(cluster.nodes)),
        regional_stage_placement(cluster),
        *equal_stage_placements(cluster),
    ]
    if previous is not None:
        kept = {n: r for n, r in previous.placement.items() if n in cluster.node_by_id}
        candidates.append(kept)
    return candidates


def best_heuristic_placement(
    cluster: Cluster, options: PlanOptions, previous: Plan | None = None
) -> Placement:
    return max(
        (p for p in candidate_placements(cluster, options, previous) if p),
        key=lambda p: max_flow(cluster, p).value_tokens_per_s,
    )


def stage_placement(cluster: Cluster, nodes: list[NodeSpec]) -> Placement:
    """Stages of replicas for large groups of nodes on free links: the model is cut into stages,
    each held by a group of identical-length replicas whose capacities add up to a target flow F;
    F is the largest for which the stages cover every layer (bisection). Each GPU type forms its
    own stages at the length that covers the most layers per node at F; the nodes left over form
    mixed stages. With many nodes per type this wastes little, where one long pipeline would be
    bottlenecked by its slowest node."""
    num_layers = cluster.model.num_layers
    if sum(min(n.max_layers, num_layers) for n in nodes) < num_layers:
        return {}
    act = cluster.model.activation_bytes
    lo, hi = 0.0, sum(n.capacity_tokens_per_s(1, act) for n in nodes)
    for _ in range(50):
        mid = (lo + hi) / 2
        if sum(k for k, _ in _stages_for(cluster, nodes, mid)) >= num_layers:
            lo = mid
        else:
            hi = mid
    if lo <= 0:
        return {}
    return stage_placement_at(cluster, nodes, lo)


def stage_placement_at(cluster: Cluster, nodes: list[NodeSpec], target_tokens_per_s: float) -> Placement:
    """stage_placement's stages for one target flow, or {} when they do not cover the model. A
    lower target needs fewer replicas per stage, so types choose longer stages: fewer hops."""
    num_layers = cluster.model.num_layers
    stages = _stages_for(cluster, nodes, target_tokens_per_s)
    if sum(k for k, _ in stages) < num_layers:
        return {}
    return _lay_out(stages, num_layers)


def _stages_for(cluster: Cluster, nodes: list[NodeSpec], target: float) -> list[tuple[int, list[NodeSpec]]]:
    num_layers = cluster.model.num_layers
    act = cluster.model.activation_bytes

    def cap(node: NodeSpec, k: int) -> float:
        return node.capacity_tokens_per_s(k, act)

    by_type: dict[tuple, list[NodeSpec]] = {}
    for node in nodes:
        by_type.setdefault((node.max_layers, node.tokens_per_s), []).append(node)
    stages: list[tuple[int, list[NodeSpec]]] = []
    leftover: list[NodeSpec] = []
    for group in by_type.values():
        kmax = min(group[0].max_layers, num_layers)
        best_k, best_layers, best_size = 1, 0, len(group) + 1
        for k in range(1, kmax + 1):
            # a target that is m replicas' capacity exactly must need m, not m + 1 (float noise)
            size = math.ceil(target / cap(group[0], k) * (1 - 1e-9))
            layers = (len(group) // size) * k
            if layers > best_layers:
                best_k, best_layers, best_size = k, layers, size
        whole = len(group) // best_size if best_layers else 0
        for i in range(whole):
            stages.append((best_k, group[i * best_size : (i + 1) * best_size]))
        leftover += group[whole * best_size :]
    leftover.sort(key=lambda n: -cap(n, 1))
    while leftover:
        # a mixed stage as long as its weakest member allows while reaching the target
        members: list[NodeSpec] = []
        k = min(n.max_layers for n in leftover)
        while leftover and sum(cap(n, min(k, n.max_layers)) for n in members) < target:
            members.append(leftover.pop(0))
        k = min(min(n.max_layers for n in members), num_layers)
        if sum(cap(n, k) for n in members) < target:
            break
        stages.append((k, members))
    return stages


def shallow_stage_placement(cluster: Cluster, nodes: list[NodeSpec], target_tokens_per_s: float) -> Placement:
    """Stages of replicas of one GPU type each, every stage carrying `target_tokens_per_s`, in as
    few stages as cover the model (servable.py: fewer hops per token). For each type and stage
    length k, a stage needs ceil(target / capacity(k)) replicas; a dynamic programme over layers
    covered picks how many stages of which length each type forms, minimising the stages; a type's
    unused members join its stages as extra replicas (more flow, same depth). {} if none covers."""
    num_layers = cluster.model.num_layers
    act = cluster.model.activation_bytes
    groups: dict[tuple, list[NodeSpec]] = {}
    for node in nodes:
        groups.setdefault((node.max_layers, node.tokens_per_s), []).append(node)
    types = list(groups.values())
    # best[c] = (stages, choices) covering c layers (capped at num_layers) with the types so far
    best: dict[int, tuple[int, tuple]] = {0: (0, ())}
    for t, group in enumerate(types):
        options = [(0, 0, 0)]  # (stages, layers, k)
        for k in range(1, min(group[0].max_layers, num_layers) + 1):
            cap = group[0].capacity_tokens_per_s(k, act)
            if cap <= 0:
                continue
            size = math.ceil(target_tokens_per_s / cap * (1 - 1e-9))
            for j in range(1, len(group) // size + 1):
                options.append((j, j * k, k))
        step: dict[int, tuple[int, tuple]] = {}
        for covered, (stages, choices) in best.items():
            for j, layers, k in options:
                c = min(num_layers, covered + layers)
                cand = (stages + j, (*choices, (t, j, k)))
                if c not in step or cand[0] < step[c][0]:
                    step[c] = cand
        best = step
    if num_layers not in best:
        return {}
    stages: list[tuple[int, list[NodeSpec]]] = []
    for t, j, k in best[num_layers][1]:
        if j == 0:
            continue
        group = sorted(types[t], key=lambda n: n.id)
        own = [(k, []) for _ in range(j)]
        for i, node in enumerate(group):
            own[i % j][1].append(node)
        stages += own
    return _lay_out(stages, num_layers)


def _lay_out(stages: list[tuple[int, list[NodeSpec]]], num_layers: int) -> Placement:
    """Stages of (layers, members) one after another from layer 0, longest first; the last one is
    cut to end at the last layer (fewer layers, faster)."""
    placement: Placement = {}
    start = 0
    for k, members in sorted(stages, key=lambda s: -s[0]):
        if start >= num_layers:
            break
        end = min(num_layers, start + k)
        for node in members:
            placement[node.id] = (start, end)
        start = end
    return placement


def regional_stage_placement(cluster: Cluster) -> Placement:
    """stage_placement inside each region (regions are usually the blocks of fast links)."""
    regions: dict[str, list[NodeSpec]] = {}
    for node in cluster.nodes:
        regions.setdefault(node.region, []).append(node)
    placement: Placement = {}
    for members in regions.values():
        placement.update(stage_placement(cluster, members))
    return placement


def equal_stage_placements(cluster: Cluster) -> list[Placement]:
    """Swarm's shape done well: for each stage length k, cut the model into stages of k layers
    (the last one shorter) and deal the nodes that can hold k layers to stages, strongest first,
    each to the stage with the least capacity so far (longest-processing-time balancing). When
    per-layer throughput k * T(k) falls with k and there are more nodes than layers, k = 1 is a
    bin covering of the nodes into layers, which loses at most one small node per layer."""
    num_layers = cluster.model.num_layers
    act = cluster.model.activation_bytes
    out = []
    longest = max(min(n.max_layers, num_layers) for n in cluster.nodes)
    for k in range(1, longest + 1):
        stages = [(s, min(num_layers, s + k)) for s in range(0, num_layers, k)]
        able = [n for n in cluster.nodes if n.max_layers >= k]
        if len(able) < len(stages):
            continue
        able.sort(key=lambda n: -n.capacity_tokens_per_s(k, act))
        load = [0.0] * len(stages)
        placement: Placement = {}
        for node in able:
            i = min(range(len(stages)), key=lambda j: (load[j], j))
            start, end = stages[i]
            load[i] += node.capacity_tokens_per_s(end - start, act)
            placement[node.id] = stages[i]
        out.append(placement)
    return out
