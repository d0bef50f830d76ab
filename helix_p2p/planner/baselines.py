"""The placements Helix is measured against, re-implemented from their published descriptions.
Each returns a bare placement; the caller scores it with the same exact max flow as the MILP.

- Petals: servers join one by one (random order) and each takes as many layers as it can hold at
  the window whose sorted per-layer throughput is lexicographically smallest (the weakest spot).
- Swarm: the model is cut into equal stages small enough for every node; nodes, strongest first,
  join the stage with the least throughput so far.
- Separate pipelines (sp): each GPU type forms as many whole pipelines as it can, layers split
  evenly; the nodes left over (types too few to hold the model alone) form mixed pipelines."""

from __future__ import annotations

import math
import random
from collections import defaultdict

from helix_p2p.cluster import Cluster, NodeId, NodeSpec

Placement = dict[NodeId, tuple[int, int]]


def petals_placement(cluster: Cluster, seed: int = 0) -> Placement:
    num_layers = cluster.model.num_layers
    act = cluster.model.activation_bytes
    order = list(cluster.nodes)
    random.Random(seed).shuffle(order)
    per_layer_tokens_per_s = [0.0] * num_layers
    placement: Placement = {}
    for node in order:
        k = min(node.max_layers, num_layers)
        start = min(range(num_layers - k + 1), key=lambda s: (sorted(per_layer_tokens_per_s[s : s + k]), s))
        cap = node.capacity_tokens_per_s(k, act)
        for layer in range(start, start + k):
            per_layer_tokens_per_s[layer] += cap
        placement[node.id] = (start, start + k)
    return placement


def even_split(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """Cut [0, num_layers) into `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(num_layers, parts)
    ranges, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def swarm_placement(cluster: Cluster, seed: int = 0) -> Placement:
    del seed  # deterministic: ties go to the lower stage and the node listed first
    num_layers = cluster.model.num_layers
    act = cluster.model.activation_bytes
    stage_layers = min(min(node.max_layers, num_layers) for node in cluster.nodes)
    stages = even_split(num_layers, math.ceil(num_layers / stage_layers))
    stage_tokens_per_s = [0.0] * len(stages)
    size = max(end - start for start, end in stages)
    nodes = sorted(cluster.nodes, key=lambda n: -n.capacity_tokens_per_s(size, act))
    placement: Placement = {}
    for node in nodes:
        i = min(range(len(stages)), key=lambda s: (stage_tokens_per_s[s], s))
        start, end = stages[i]
        stage_tokens_per_s[i] += node.capacity_tokens_per_s(end - start, act)
        placement[node.id] = stages[i]
    return placement


def separate_pipelines_placement(cluster: Cluster, seed: int = 0) -> Placement:
    del seed
    num_layers = cluster.model.num_layers
    act = cluster.model.activation_bytes
    by_type: dict[str, list[NodeSpec]] = defaultdict(list)
    for node in cluster.nodes:
        by_type[node.gpu].append(node)
    placement: Placement = {}
    leftover: list[NodeSpec] = []
    for nodes in by_type.values():
        per_pipeline = math.ceil(num_layers / min(min(n.max_layers, num_layers) for n in nodes))
        whole = len(nodes) // per_pipeline
        for p in range(whole):
            members = nodes[p * per_pipeline : (p + 1) * per_pipeline]
            for node, rng in zip(members, even_split(num_layers, per_pipeline)):
                placement[node.id] = rng
        leftover += nodes[whole * per_pipeline :]
    # Types too few to hold the model alone pool into mixed pipelines, strongest nodes first.
    leftover.sort(key=lambda n: -n.capacity_tokens_per_s(1, act))
    while sum(min(n.max_layers, num_layers) for n in leftover) >= num_layers:
        members, held = [], 0
        while held < num_layers:
            node = leftover.pop(0)
            members.append(node)
            held += min(node.max_layers, num_layers)
        placement.update(balanced_pipeline(members, num_layers, act))
    return placement


def balanced_pipeline(members: list[NodeSpec], num_layers: int, activation_bytes: int) -> Placement:
    """Split [0, num_layers) over `members` in order so that the slowest stage is as fast as a
    greedy can make it: every node holds one layer, then each further layer goes to the node
    that stays fastest after taking it."""
    counts = [1] * len(members)
    for _ in range(num_layers - len(members)):
        candidates = [i for i, n in enumerate(members) if counts[i] < n.max_layers]
        best = max(
            candidates, key=lambda i: members[i].capacity_tokens_per_s(counts[i] + 1, activation_bytes)
        )
        counts[best] += 1
    placement: Placement = {}
    start = 0
    for node, k in zip(members, counts):
        placement[node.id] = (start, start + k)
        start += k
    return placement
