"""Classes of interchangeable nodes and blocks of free links (`helix_p2p.planner.classes`), on small
clusters whose right answer can be seen by eye: nodes that the planner cannot tell apart are grouped,
one different link or figure splits them, and regions joined by slow links make separate blocks."""

from __future__ import annotations

import itertools

import pytest
from builders import (
    A100,
    L4,
    T4,
    UNLIMITED_TOKENS_PER_S,
    Hardware,
    bundled_cluster,
    make_cluster,
    node,
    nodes_of,
    region_links,
)

from helix_p2p.cluster import Cluster
from helix_p2p.planner.classes import NodeClass, class_links, free_blocks, node_classes


def groups(classes: list[NodeClass]) -> set[frozenset[str]]:
    """The partition of node ids, whatever the classes' order and names."""
    return {frozenset(cls.members) for cls in classes}


def class_of(classes: list[NodeClass], node_id: str) -> int:
    return next(c for c, cls in enumerate(classes) if node_id in cls.members)


def assert_partition(cluster: Cluster, classes: list[NodeClass]) -> None:
    members = [m for cls in classes for m in cls.members]
    assert sorted(members) == sorted(n.id for n in cluster.nodes), "every node in exactly one class"


# ------------------------------------------------------------------------------------------ classes


def test_identical_nodes_on_identical_links_form_one_class() -> None:
    cluster = make_cluster(nodes_of(A100, 3) + nodes_of(L4, 2), num_layers=4)
    classes = node_classes(cluster)
    assert_partition(cluster, classes)
    assert groups(classes) == {frozenset({"a100-0", "a100-1", "a100-2"}), frozenset({"l4-0", "l4-1"})}
    a100 = classes[class_of(classes, "a100-0")]
    assert a100.count == 3
    # one member's table for k = 1..min(max_layers, num_layers), and the coordinator in tokens/s
    assert a100.capacity_tokens_per_s == A100.tokens_per_s[:4]
    assert a100.max_layers == 4
    assert a100.source_tokens_per_s == UNLIMITED_TOKENS_PER_S
    assert a100.sink_tokens_per_s == UNLIMITED_TOKENS_PER_S


def test_nodes_that_differ_in_one_link_are_split() -> None:
    """Three L4s, complete and fast, except l4-0 -> l4-1 is slow: l4-0 sends slowly to one node,
    l4-1 receives slowly from one, l4-2 neither. No two of them are interchangeable."""
    links = [
        ("l4-0", "l4-1", 50.0),
        ("l4-1", "l4-0"),
        ("l4-0", "l4-2"),
        ("l4-2", "l4-0"),
        ("l4-1", "l4-2"),
        ("l4-2", "l4-1"),
    ]
    cluster = make_cluster(nodes_of(L4, 3), num_layers=4, links=links)
    assert groups(node_classes(cluster)) == {frozenset({"l4-0"}), frozenset({"l4-1"}), frozenset({"l4-2"})}
    # with that one link fast again they are one class
    fast = make_cluster(nodes_of(L4, 3), num_layers=4)
    assert groups(node_classes(fast)) == {frozenset({"l4-0", "l4-1", "l4-2"})}


def test_a_missing_link_to_another_type_splits_a_type() -> None:
    """Two T4s, identical, but only t4-0 has a link to the A100 (both ways)."""
    nodes = nodes_of(T4, 2) + [node("a100", A100)]
    links = [("t4-0", "t4-1"), ("t4-1", "t4-0"), ("t4-0", "a100"), ("a100", "t4-0")]
    classes = node_classes(make_cluster(nodes, num_layers=4, links=links))
    assert groups(classes) == {frozenset({"t4-0"}), frozenset({"t4-1"}), frozenset({"a100"})}


def test_refinement_looks_past_direct_neighbours() -> None:
    """Five identical L4s on a path a - b - c - d - e (links both ways): the ends differ from the
    middle by their links, and b, d differ from c only through whom they are linked to (an end).
    The mirror a <-> e, b <-> d makes those pairs interchangeable."""
    names = ["a", "b", "c", "d", "e"]
    links = [pair for x, y in itertools.pairwise(names) for pair in ((x, y), (y, x))]
    cluster = make_cluster([node(n, L4) for n in names], num_layers=4, links=links)
    assert groups(node_classes(cluster)) == {frozenset("ae"), frozenset("bd"), frozenset("c")}


@pytest.mark.parametrize(
    ("other", "same"),
    [
        # a NIC above every table value changes nothing the planner sees
        (node("x1", L4, nic_tokens_per_s=10 * UNLIMITED_TOKENS_PER_S), True),
        # the same table under another GPU name is the same to the planner
        (node("x1", Hardware("other-name", L4.tokens_per_s)), True),
        # a NIC below the one-layer speed caps the node: different capacities
        (node("x1", L4, nic_tokens_per_s=250.0), False),
        # fewer layers allowed
        (node("x1", L4, max_layers=3), False),
        # another table
        (node("x1", Hardware("L4", (600.0, 300.0, 200.0, 149.0))), False),
    ],
)
def test_what_makes_two_nodes_the_same_to_the_planner(other, same: bool) -> None:
    cluster = make_cluster([node("x0", L4), other], num_layers=4)
    assert (len(node_classes(cluster)) == 1) is same


def test_a_node_holding_more_than_the_model_is_cut_to_the_model() -> None:
    """max_layers beyond num_layers means nothing: an A100 allowed 6 and one allowed 3 of a
    3-layer model are the same."""
    cluster = make_cluster([node("x0", A100), node("x1", A100, max_layers=3)], num_layers=3)
    classes = node_classes(cluster)
    assert len(classes) == 1 and classes[0].capacity_tokens_per_s == A100.tokens_per_s[:3]


@pytest.mark.parametrize(
    ("coordinator", "same"),
    [
        ({"x-0": (100.0, 100.0), "x-1": (100.0, 100.0)}, True),
        ({"x-0": (100.0, 100.0), "x-1": (100.0, 90.0)}, False),
        ({"x-0": (100.0, 100.0)}, False),
    ],
)
def test_coordinator_links_split_classes(coordinator: dict, same: bool) -> None:
    cluster = make_cluster(nodes_of(L4, 2, prefix="x"), num_layers=4, coordinator=coordinator)
    classes = node_classes(cluster)
    assert (len(classes) == 1) is same
    if same:
        assert classes[0].source_tokens_per_s == 100.0 and classes[0].sink_tokens_per_s == 100.0


def test_bundled_24_gpu_cluster_has_one_class_per_gpu_type() -> None:
    """Helix's 24 GPUs: 4 A100, 8 L4, 12 T4 on a uniform complete graph. Three classes instead of
    24 nodes is what makes the MILP small."""
    cluster = bundled_cluster("single24-llama70b")
    classes = node_classes(cluster)
    assert_partition(cluster, classes)
    by_gpu = {cluster.node_by_id[cls.members[0]].gpu: cls.count for cls in classes}
    assert by_gpu == {"A100": 4, "L4": 8, "T4": 12}
    for cls in classes:
        assert len({cluster.node_by_id[m].gpu for m in cls.members}) == 1


# ---------------------------------------------------------------------------------- class links


def test_class_links_uniform_and_free() -> None:
    """A link is free when it is at least as fast as the slower node's best capacity (then it never
    binds: no node pair carries more than that). L4 best 600, T4 best 240: the bar is 240."""
    at_bar = make_cluster(nodes_of(L4, 1) + nodes_of(T4, 1), num_layers=4, link_tokens_per_s=240.0)
    below = make_cluster(nodes_of(L4, 1) + nodes_of(T4, 1), num_layers=4, link_tokens_per_s=239.0)
    for cluster, free in ((at_bar, True), (below, False)):
        classes = node_classes(cluster)
        links = class_links(cluster, classes)
        l4, t4 = class_of(classes, "l4-0"), class_of(classes, "t4-0")
        assert set(links) == {(l4, t4), (t4, l4)}, "a one-member class has no pair with itself"
        link = links[(l4, t4)]
        assert link.uniform and link.free is free
        assert link.min_tokens_per_s == link.max_tokens_per_s == cluster.link_tokens_per_s("l4-0", "t4-0")


def test_class_link_with_a_missing_pair_is_not_free() -> None:
    """Two L4s and two T4s where l4-0 -> t4-1 is missing (the rest fast): the L4s now differ, and
    between the classes that remain some pair has no link, so the min is 0 and nothing is free."""
    nodes = nodes_of(L4, 2) + nodes_of(T4, 2)
    links = [(a.id, b.id) for a in nodes for b in nodes if a.id != b.id and (a.id, b.id) != ("l4-0", "t4-1")]
    cluster = make_cluster(nodes, num_layers=4, links=links)
    classes = node_classes(cluster)
    links_by_class = class_links(cluster, classes)
    l4_0, t4_1 = class_of(classes, "l4-0"), class_of(classes, "t4-1")
    assert l4_0 != class_of(classes, "l4-1")
    link = links_by_class[(l4_0, t4_1)]
    assert link.min_tokens_per_s == 0.0 and not link.free


def test_class_link_between_members_of_one_class() -> None:
    """Three L4s at 100 tokens/s between each other: the class's link to itself is uniform and
    slow (600 is the bar), so not free; at 1e6 it is."""
    slow = make_cluster(nodes_of(L4, 3), num_layers=4, link_tokens_per_s=100.0)
    classes = node_classes(slow)
    assert len(classes) == 1
    link = class_links(slow, classes)[(0, 0)]
    assert link.uniform and link.min_tokens_per_s == 100.0 and not link.free
    fast = make_cluster(nodes_of(L4, 3), num_layers=4)
    assert class_links(fast, node_classes(fast))[(0, 0)].free


# ---------------------------------------------------------------------------------- free blocks


def two_region_cluster(inter_tokens_per_s: float | None) -> Cluster:
    """Region r1: 2 A100 + 1 L4; region r2: 2 T4 + 1 L4; fast inside, `inter` between."""
    nodes = (
        nodes_of(A100, 2, region="r1")
        + [node("l4-r1", L4, region="r1")]
        + nodes_of(T4, 2, region="r2")
        + [node("l4-r2", L4, region="r2")]
    )
    return make_cluster(
        nodes, num_layers=6, link_tokens_per_s=region_links(UNLIMITED_TOKENS_PER_S, inter_tokens_per_s)
    )


def region_blocks(cluster: Cluster) -> set[frozenset[str]]:
    classes = node_classes(cluster)
    blocks = free_blocks(classes, class_links(cluster, classes))
    assert sorted(c for block in blocks for c in block) == list(range(len(classes))), (
        "blocks partition classes"
    )
    return {frozenset(m for c in block for m in classes[c].members) for block in blocks}


@pytest.mark.parametrize("inter_tokens_per_s", [10.0, None])
def test_two_regions_joined_by_slow_links_are_two_blocks(inter_tokens_per_s: float | None) -> None:
    cluster = two_region_cluster(inter_tokens_per_s)
    classes = node_classes(cluster)
    # the two L4s see different neighbours, so they are different classes
    assert class_of(classes, "l4-r1") != class_of(classes, "l4-r2")
    assert groups(classes) == {
        frozenset({"a100-0", "a100-1"}),
        frozenset({"l4-r1"}),
        frozenset({"t4-0", "t4-1"}),
        frozenset({"l4-r2"}),
    }
    assert region_blocks(cluster) == {
        frozenset({"a100-0", "a100-1", "l4-r1"}),
        frozenset({"t4-0", "t4-1", "l4-r2"}),
    }


def test_two_regions_joined_by_fast_links_are_one_block() -> None:
    cluster = two_region_cluster(UNLIMITED_TOKENS_PER_S)
    assert region_blocks(cluster) == {frozenset(n.id for n in cluster.nodes)}


def test_every_pair_inside_a_block_is_free() -> None:
    """Between regions at 240 tokens/s: as fast as a T4 ever runs, so every pair with a T4 is free
    across regions, but A100 or L4 pairs across are not (their bar is 600). Whatever the grouping,
    each block holds only classes whose node pairs are all free, both ways and among themselves."""
    cluster = two_region_cluster(240.0)
    classes = node_classes(cluster)
    links = class_links(cluster, classes)
    blocks = free_blocks(classes, links)
    for block in blocks:
        for a in block:
            for b in block:
                link = links.get((a, b))
                assert (a == b and link is None) or link.free, (classes[a].members, classes[b].members)
    block_of = {m: x for x, block in enumerate(blocks) for c in block for m in classes[c].members}
    assert block_of["a100-0"] != block_of["l4-r2"]
    assert block_of["l4-r1"] != block_of["l4-r2"]


def test_class_not_free_with_itself_is_alone_in_its_block() -> None:
    """Two L4s with a slow link between them and a fast A100 linked fast to both: the L4 class's
    own pairs are not free, so it cannot share a block (inside a block every pair must be free)."""
    nodes = nodes_of(L4, 2) + [node("a100", A100)]
    links = [("l4-0", "l4-1", 10.0), ("l4-1", "l4-0", 10.0), ("l4-0", "a100"), ("a100", "l4-0")]
    links += [("l4-1", "a100"), ("a100", "l4-1")]
    cluster = make_cluster(nodes, num_layers=4, links=links)
    assert region_blocks(cluster) == {frozenset({"l4-0", "l4-1"}), frozenset({"a100"})}
