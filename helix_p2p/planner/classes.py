"""Interchangeable nodes. Two nodes are interchangeable when they have the same capacity table,
the same links to the clients' side and the same links to every other node (up to swapping them).
The MILP works on classes of such nodes, deciding how many of a class hold each layer range rather
than which one: that removes the symmetry that made Helix's per-node Gurobi model so slow (24 GPUs
of 3 types have 4! * 8! * 12! equivalent labelings of every placement)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from helix_p2p.cluster import Cluster, NodeId


@dataclass(frozen=True)
class NodeClass:
    name: str
    members: tuple[NodeId, ...]
    #: capacity_tokens_per_s[k - 1]: one member's capacity holding k layers (NIC limit applied)
    capacity_tokens_per_s: tuple[float, ...]
    source_tokens_per_s: float
    sink_tokens_per_s: float

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def max_layers(self) -> int:
        return len(self.capacity_tokens_per_s)


@dataclass(frozen=True)
class ClassLink:
    """The links from members of one class to members of another (or to other members of the same
    class). `uniform` says every such pair has the same capacity; `free` that every pair is linked
    with enough capacity never to be a bottleneck: a node pair's flow never exceeds the smaller of
    the two nodes' capacities, so a link at least that fast cannot bind."""

    min_tokens_per_s: float  # 0 when some pair has no link
    max_tokens_per_s: float
    uniform: bool
    free: bool


def node_classes(cluster: Cluster) -> list[NodeClass]:
    """Partition the nodes into classes by colour refinement: start from each node's own figures,
    then split classes whose members see different multisets of (class, link in, link out) to the
    others, until nothing splits."""
    num_layers = cluster.model.num_layers
    act = cluster.model.activation_bytes
    own: dict[NodeId, tuple] = {}
    for node in cluster.nodes:
        k_max = min(node.max_layers, num_layers)
        table = tuple(node.capacity_tokens_per_s(k, act) for k in range(1, k_max + 1))
        own[node.id] = (table, cluster.source_tokens_per_s(node.id), cluster.sink_tokens_per_s(node.id))
    # What a node can carry caps every figure below, so figures above it are equal for the model
    # (source and sink enter only as min(capacity, .)): noisy measurements of fast links must not
    # split a class, which would multiply the model's size and its equal optima.
    best = {i: max(table, default=0.0) for i, (table, _, _) in own.items()}
    alike = {i: (table, min(src, best[i]), min(snk, best[i])) for i, (table, src, snk) in own.items()}
    ids = [node.id for node in cluster.nodes]
    out_links: dict[NodeId, dict[NodeId, float]] = {i: {} for i in ids}
    in_links: dict[NodeId, dict[NodeId, float]] = {i: {} for i in ids}
    for link in cluster.links:
        # A link at least as fast as the slower end's best capacity never binds (ClassLink.free).
        fast = link.bytes_per_s / act >= min(best[link.src], best[link.dst])
        speed = math.inf if fast else link.bytes_per_s
        out_links[link.src][link.dst] = speed
        in_links[link.dst][link.src] = speed
    colour = _relabel({i: alike[i] for i in ids})
    while True:
        signature = {}
        for i in ids:
            seen = []
            for j in ids:
                if j != i:
                    seen.append((colour[j], out_links[i].get(j, 0.0), in_links[i].get(j, 0.0)))
            signature[i] = (colour[i], tuple(sorted(seen)))
        refined = _relabel(signature)
        if len(set(refined.values())) == len(set(colour.values())):
            break
        colour = refined
    members: dict[int, list[NodeId]] = {}
    for i in ids:
        members.setdefault(colour[i], []).append(i)
    classes = []
    for group in sorted(members.values(), key=lambda g: ids.index(g[0])):
        table, src, snk = own[group[0]]
        gpu = cluster.node_by_id[group[0]].gpu
        classes.append(NodeClass(f"{gpu}#{len(classes)}", tuple(group), table, src, snk))
    return classes


def _relabel(keys: dict[NodeId, object]) -> dict[NodeId, int]:
    """Replace arbitrary (comparable) keys by small integers, consistently."""
    order = {key: n for n, key in enumerate(sorted(set(keys.values()), key=repr))}
    return {node: order[key] for node, key in keys.items()}


def class_links(cluster: Cluster, classes: list[NodeClass]) -> dict[tuple[int, int], ClassLink]:
    """The ClassLink for every ordered pair of classes that has at least one node pair (a class
    with one member has no pair with itself)."""
    result = {}
    for a, ca in enumerate(classes):
        for b, cb in enumerate(classes):
            caps = [cluster.link_tokens_per_s(i, j) for i in ca.members for j in cb.members if i != j]
            if not caps:
                continue
            lo, hi = min(caps), max(caps)
            # The largest flow a pair can carry is bounded by both nodes' best capacity.
            pair_limit = min(max(ca.capacity_tokens_per_s), max(cb.capacity_tokens_per_s))
            result[(a, b)] = ClassLink(lo, hi, uniform=lo == hi, free=lo >= pair_limit)
    return result


def free_blocks(classes: list[NodeClass], links: dict[tuple[int, int], ClassLink]) -> list[list[int]]:
    """Group classes into blocks inside which every node pair, both ways, is free (e.g. one
    region of fast links). Flow inside a block needs no link variables; only flow between blocks
    does. Classes whose pairs are not all free stay alone."""

    def free(a: int, b: int) -> bool:
        link = links.get((a, b))
        return link is None and a == b or link is not None and link.free

    blocks: list[list[int]] = []
    for c in range(len(classes)):
        for block in blocks:
            # A class whose own members are not all free pairs joins no one and takes no one.
            if free(c, c) and all(free(o, o) and free(c, o) and free(o, c) for o in block):
                block.append(c)
                break
        else:
            blocks.append([c])
    return blocks


def split_for_exactness(
    cluster: Cluster, classes: list[NodeClass], max_nodes: int
) -> tuple[list[NodeClass], dict[tuple[int, int], ClassLink]]:
    """Split into one-member classes every class that takes part in a bounded link pair (between
    blocks, or with itself), so that the MILP's McCormick link bounds become exact. Splitting
    costs symmetry, so it stops once the split classes would hold more than `max_nodes` nodes."""
    links = class_links(cluster, classes)
    blocks = free_blocks(classes, links)
    block_of = {c: x for x, block in enumerate(blocks) for c in block}
    bounded = {
        c
        for (a, b), link in links.items()
        if not link.free and (block_of[a] != block_of[b] or a == b)
        for c in (a, b)
        if classes[c].count > 1
    }
    if not bounded or sum(classes[c].count for c in bounded) > max_nodes:
        return classes, links
    split: list[NodeClass] = []
    for c, cls in enumerate(classes):
        if c not in bounded:
            split.append(cls)
            continue
        for member in cls.members:
            split.append(
                NodeClass(
                    f"{cls.name}/{member}",
                    (member,),
                    cls.capacity_tokens_per_s,
                    cls.source_tokens_per_s,
                    cls.sink_tokens_per_s,
                )
            )
    return split, class_links(cluster, split)
