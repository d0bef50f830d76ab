"""The flow graph of a placement and its exact max flow, on clusters small enough to check by hand;
every returned flow is checked for feasibility (capacities, conservation) and for optimality with a
min-cut certificate, and random cases are cross-checked against OR-Tools' max-flow on a graph built
independently from DESIGN.md's rules."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import pytest
from builders import (
    A100,
    BUNDLED_CLUSTERS,
    KV_BOUND,
    L4,
    T4,
    UNLIMITED_TOKENS_PER_S,
    Hardware,
    bundled_cluster,
    make_cluster,
    node,
    nodes_of,
)
from ortools.graph.python import max_flow as ortools_max_flow

from helix_p2p.cluster import SINK, SOURCE, Cluster, NodeId
from helix_p2p.errors import HelixError
from helix_p2p.flow import (
    FlowEdge,
    FlowGraph,
    build_flow_graph,
    check_flows,
    edge_enabled,
    max_flow,
    solve_flow_graph,
)
from helix_p2p.plan import EdgeFlow, Placement
from helix_p2p.planner.baselines import petals_placement, separate_pipelines_placement, swarm_placement

#: 100 tokens/s whether it holds 1 or 2 layers
FLAT_100 = Hardware("flat", (100.0, 100.0))


def P(**ranges: tuple[int, int]) -> dict[NodeId, tuple[int, int]]:
    """A placement written as keyword arguments: P(a=(0, 2), b=(2, 4))."""
    return {NodeId(k): v for k, v in ranges.items()}


def edge_flows(result_flows: tuple[EdgeFlow, ...]) -> dict[tuple[str, str], float]:
    return {(f.src, f.dst): f.tokens_per_s for f in result_flows}


def assert_max_flow(
    cluster: Cluster, placement: Placement, expected: float, partial_inference: bool = False
) -> dict[tuple[str, str], float]:
    """Max flow equals `expected`; its edge flows are feasible, conserve, sum to the value on both
    ends, agree with the per-node flows, and a min cut of the same value proves it maximal."""
    result = max_flow(cluster, placement, partial_inference)
    assert result.value_tokens_per_s == pytest.approx(expected, rel=1e-12, abs=1e-9)
    flows = edge_flows(result.flows)
    assert len(flows) == len(result.flows), "an edge is listed twice"
    assert all(f.tokens_per_s > 0 for f in result.flows)  # only edges carrying flow are listed
    value = check_flows(cluster, placement, result.flows, partial_inference)
    assert value == pytest.approx(result.value_tokens_per_s, rel=1e-12, abs=1e-9)
    into_sink = sum(v for (_, dst), v in flows.items() if dst == SINK)
    assert into_sink == pytest.approx(value, rel=1e-12, abs=1e-9)
    for node_id in placement:
        inflow = sum(v for (_, dst), v in flows.items() if dst == node_id)
        assert result.node_flow_tokens_per_s[node_id] == pytest.approx(inflow, rel=1e-12, abs=1e-9)
    assert_min_cut_certifies(
        cluster, placement, result.flows, result.node_flow_tokens_per_s, partial_inference
    )
    return flows


def assert_min_cut_certifies(
    cluster: Cluster,
    placement: Placement,
    flows: tuple[EdgeFlow, ...],
    node_flow: Mapping[NodeId, float],
    partial_inference: bool,
) -> None:
    """Max-flow min-cut: the vertices reachable from the source in the residual graph define a cut
    whose capacity equals the flow value exactly when no augmenting path is left."""
    graph = build_flow_graph(cluster, placement, partial_inference)
    on_edge = edge_flows(flows)
    arcs: list[tuple[object, object, float, float]] = [
        (("in", n), ("out", n), cap, node_flow[n]) for n, cap in graph.node_capacity_tokens_per_s.items()
    ]
    for e in graph.edges:
        tail = SOURCE if e.src == SOURCE else ("out", e.src)
        head = SINK if e.dst == SINK else ("in", e.dst)
        arcs.append((tail, head, e.capacity_tokens_per_s, on_edge.get((e.src, e.dst), 0.0)))
    tol = 1e-9 * max([1.0] + [cap for *_, cap, _ in arcs])
    reachable, frontier = {SOURCE}, [SOURCE]
    while frontier:
        u = frontier.pop()
        for tail, head, cap, f in arcs:
            if tail == u and cap - f > tol and head not in reachable:
                reachable.add(head)
                frontier.append(head)
            if head == u and f > tol and tail not in reachable:
                reachable.add(tail)
                frontier.append(tail)
    assert SINK not in reachable, "an augmenting path is left: the flow is not maximal"
    cut = sum(cap for tail, head, cap, _ in arcs if tail in reachable and head not in reachable)
    value = sum(f for tail, _, _, f in arcs if tail == SOURCE)
    assert cut == pytest.approx(value, rel=1e-9, abs=1e-9)


# -------------------------------------------------------------------------------- hand-checked cases


def two_stage(**cluster_options: object) -> Cluster:
    """a: A100 then b: L4, linked a -> b; the model has 4 layers."""
    options: dict[str, object] = {"num_layers": 4, "links": "chain", **cluster_options}
    nodes = options.pop("nodes", [node("a", A100), node("b", L4)])
    return make_cluster(nodes, **options)  # type: ignore[arg-type]


def test_node_capacity_binds() -> None:
    # a holds 2 layers: 600 tokens/s; b holds 2 layers: 300 tokens/s
    flows = assert_max_flow(two_stage(), P(a=(0, 2), b=(2, 4)), 300.0)
    assert flows == {(SOURCE, "a"): 300.0, ("a", "b"): 300.0, ("b", SINK): 300.0}


def test_node_capacity_depends_on_layers_held() -> None:
    # a holds 3 layers (400 tokens/s), b holds 1 (600): now a binds
    assert_max_flow(two_stage(), P(a=(0, 3), b=(3, 4)), 400.0)
    # KV_BOUND falls faster than 1/k: 1000, 400, 200
    cluster = two_stage(nodes=[node("a", KV_BOUND), node("b", KV_BOUND)])
    assert_max_flow(cluster, P(a=(0, 1), b=(1, 4)), 200.0)
    assert_max_flow(cluster, P(a=(0, 2), b=(2, 4)), 400.0)


def test_link_capacity_binds() -> None:
    cluster = two_stage(links=[("a", "b", 100.0)])
    flows = assert_max_flow(cluster, P(a=(0, 2), b=(2, 4)), 100.0)
    assert flows[("a", "b")] == 100.0


def test_link_capacity_is_bytes_per_s_over_activation_bytes() -> None:
    cluster = two_stage(links=[("a", "b", 100.0)], activation_bytes=16384, nodes=[
        node("a", A100, activation_bytes=16384), node("b", L4, activation_bytes=16384)])  # fmt: skip
    assert cluster.links[0].bytes_per_s == 100.0 * 16384
    assert cluster.link_tokens_per_s(NodeId("a"), NodeId("b")) == 100.0
    assert cluster.link_tokens_per_s(NodeId("b"), NodeId("a")) == 0.0
    assert_max_flow(cluster, P(a=(0, 2), b=(2, 4)), 100.0)


def test_source_coordinator_capacity_binds() -> None:
    cluster = two_stage(coordinator={"a": (50.0, 0.0), "b": (0.0, UNLIMITED_TOKENS_PER_S)})
    flows = assert_max_flow(cluster, P(a=(0, 2), b=(2, 4)), 50.0)
    assert flows == {(SOURCE, "a"): 50.0, ("a", "b"): 50.0, ("b", SINK): 50.0}


def test_sink_coordinator_capacity_binds() -> None:
    cluster = two_stage(coordinator={"a": (UNLIMITED_TOKENS_PER_S, 0.0), "b": (0.0, 70.0)})
    assert_max_flow(cluster, P(a=(0, 2), b=(2, 4)), 70.0)


def test_coordinator_capacity_is_bytes_per_s_over_token_bytes() -> None:
    cluster = two_stage(coordinator={"a": (50.0, 0.0), "b": (0.0, 70.0)}, token_bytes=4)
    assert cluster.coordinator_by_node[NodeId("a")].out_bytes_per_s == 200.0
    assert cluster.source_tokens_per_s(NodeId("a")) == 50.0 and cluster.sink_tokens_per_s(NodeId("a")) == 0.0
    assert_max_flow(cluster, P(a=(0, 2), b=(2, 4)), 50.0)


def test_no_coordinator_link_means_no_source_or_sink_edge() -> None:
    # a has no link from the clients' side (0 out), so nothing enters the pipeline
    assert_max_flow(two_stage(coordinator={"a": (0.0, 5.0), "b": (5.0, 5.0)}), P(a=(0, 2), b=(2, 4)), 0.0)
    # b is not in the coordinator list at all, so nothing leaves it
    assert_max_flow(two_stage(coordinator=["a"]), P(a=(0, 2), b=(2, 4)), 0.0)


@pytest.mark.parametrize("nic_in,nic_out", [(150.0, None), (None, 150.0), (150.0, 150.0)])
def test_nic_cap_binds(nic_in: float | None, nic_out: float | None) -> None:
    """A node's capacity is min(tokens_per_s[k-1], min(nic_in, nic_out) / activation_bytes)."""
    b = node("b", L4, nic_in_tokens_per_s=nic_in, nic_out_tokens_per_s=nic_out)
    cluster = two_stage(nodes=[node("a", A100), b])
    assert cluster.node_capacity_tokens_per_s(NodeId("b"), 1) == 150.0  # NIC below 600
    assert cluster.node_capacity_tokens_per_s(NodeId("b"), 4) == 150.0  # NIC equal to compute
    assert cluster.node_by_id[NodeId("b")].compute_tokens_per_s(1) == 600.0
    assert_max_flow(cluster, P(a=(0, 3), b=(3, 4)), 150.0)


def test_missing_link_gives_zero() -> None:
    assert_max_flow(two_stage(links="none"), P(a=(0, 2), b=(2, 4)), 0.0)
    # a link the wrong way round is no link
    assert max_flow(two_stage(links=[("b", "a")]), P(a=(0, 2), b=(2, 4))).flows == ()
    assert_max_flow(two_stage(links=[("b", "a")]), P(a=(0, 2), b=(2, 4)), 0.0)


def test_layers_that_do_not_meet_give_zero() -> None:
    assert_max_flow(two_stage(), P(a=(0, 2), b=(3, 4)), 0.0)  # layer 2 is held by nobody
    assert_max_flow(two_stage(), P(a=(0, 3), b=(2, 4)), 0.0)  # overlap without partial inference
    assert_max_flow(two_stage(), P(a=(1, 3), b=(3, 4)), 0.0)  # layer 0 is held by nobody
    assert_max_flow(two_stage(), P(), 0.0)
    assert max_flow(two_stage(), P()).node_flow_tokens_per_s == {}


def test_one_node_holding_the_whole_model() -> None:
    flows = assert_max_flow(two_stage(), P(a=(0, 4)), 300.0)  # A100 holding 4 layers
    assert flows == {(SOURCE, "a"): 300.0, ("a", SINK): 300.0}


def test_unplaced_nodes_are_ignored() -> None:
    cluster = make_cluster([node("a", A100), node("b", L4), *nodes_of(T4, 3)], num_layers=4)
    result = max_flow(cluster, P(a=(0, 2), b=(2, 4)))
    assert result.value_tokens_per_s == 300.0
    assert set(result.node_flow_tokens_per_s) == {"a", "b"}


def test_diamond_with_two_paths() -> None:
    """source -> a -> {b, c} -> d -> sink: the middle stage splits the flow over both paths."""
    cluster = make_cluster(
        [node("a", A100), node("b", L4), node("c", T4), node("d", A100)],
        num_layers=6,
        links=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
        coordinator={"a": (UNLIMITED_TOKENS_PER_S, 0.0), "d": (0.0, UNLIMITED_TOKENS_PER_S)},
    )
    placement = P(a=(0, 2), b=(2, 4), c=(2, 4), d=(4, 6))
    # a: 600, b: 300, c: 120, d: 600 -> the middle stage carries 300 + 120
    flows = assert_max_flow(cluster, placement, 420.0)
    assert flows == {
        (SOURCE, "a"): 420.0,
        ("a", "b"): 300.0,
        ("a", "c"): 120.0,
        ("b", "d"): 300.0,
        ("c", "d"): 120.0,
        ("d", SINK): 420.0,
    }


def test_diamond_with_a_slow_link_on_one_path() -> None:
    cluster = make_cluster(
        [node("a", A100), node("b", L4), node("c", T4), node("d", A100)],
        num_layers=6,
        links=[("a", "b", 250.0), ("a", "c"), ("b", "d"), ("c", "d", 100.0)],
    )
    flows = assert_max_flow(cluster, P(a=(0, 2), b=(2, 4), c=(2, 4), d=(4, 6)), 350.0)
    assert flows[("a", "b")] == 250.0 and flows[("c", "d")] == 100.0


def test_flow_that_must_be_rerouted() -> None:
    """x reaches u and v, y reaches only u: the max (200) needs x -> v, y -> u. A greedy that first
    sends x -> u must undo it through the residual (reverse) arc."""
    nodes = [node(n, FLAT_100) for n in ("x", "y", "u", "v")]
    cluster = make_cluster(nodes, num_layers=4, links=[("x", "u"), ("x", "v"), ("y", "u")])
    flows = assert_max_flow(cluster, P(x=(0, 2), y=(0, 2), u=(2, 4), v=(2, 4)), 200.0)
    assert flows.get(("x", "u"), 0.0) == 0.0
    assert flows[("x", "v")] == 100.0 and flows[("y", "u")] == 100.0


def test_two_separate_pipelines_add_up() -> None:
    cluster = make_cluster(
        nodes_of(L4, 2) + nodes_of(T4, 2), num_layers=4, links=[("l4-0", "l4-1"), ("t4-0", "t4-1")]
    )
    placement = P(**{"l4-0": (0, 2), "l4-1": (2, 4), "t4-0": (0, 2), "t4-1": (2, 4)})
    assert_max_flow(cluster, placement, 300.0 + 120.0)


def test_small_capacities_next_to_huge_ones_are_exact() -> None:
    """A node of 1e-4 tokens/s behind 1e9 tokens/s coordinator links still carries its flow, and the
    flow on the huge edges is read exactly (not as 1e9 minus a residual)."""
    cluster = make_cluster(
        [node("slow", Hardware("slow", (1e-4,)))], num_layers=1, coordinator_tokens_per_s=1e9
    )
    flows = assert_max_flow(cluster, P(slow=(0, 1)), 1e-4)
    assert flows == {(SOURCE, "slow"): 1e-4, ("slow", SINK): 1e-4}
    cluster = make_cluster(
        [node("a", KV_BOUND), node("b", KV_BOUND)], num_layers=2, coordinator_tokens_per_s=5e8, links="chain"
    )
    flows = assert_max_flow(cluster, P(a=(0, 1), b=(1, 2)), 1000.0)
    assert flows == {(SOURCE, "a"): 1000.0, ("a", "b"): 1000.0, ("b", SINK): 1000.0}


# ---------------------------------------------------------------------------------- partial inference


@pytest.mark.parametrize(
    "end_i,start_j,end_j,exact,partial",
    [
        (2, 2, 4, True, True),  # the usual hand-over at a boundary
        (3, 2, 4, False, True),  # j already holds layer 2; with partial inference it runs layer 3 only
        (2, 0, 4, False, True),  # j holds everything i did and more
        (4, 2, 4, False, False),  # j has nothing left to run after i
        (1, 2, 4, False, False),  # a gap: layer 1 is held by neither
        (5, 2, 4, False, False),  # i is already past j
    ],
)
def test_edge_rule(end_i: int, start_j: int, end_j: int, exact: bool, partial: bool) -> None:
    assert edge_enabled(end_i, start_j, end_j, partial_inference=False) is exact
    assert edge_enabled(end_i, start_j, end_j, partial_inference=True) is partial


def test_partial_inference_enables_overlapping_ranges() -> None:
    cluster = two_stage()
    placement = P(a=(0, 3), b=(2, 4))
    assert_max_flow(cluster, placement, 0.0, partial_inference=False)
    # a: A100 holding 3 layers (400); b: L4 holding 2 layers is charged its full 2-layer capacity
    # (300) even though it runs only layer 3 for this flow: the documented conservative choice
    flows = assert_max_flow(cluster, placement, 300.0, partial_inference=True)
    assert flows == {(SOURCE, "a"): 300.0, ("a", "b"): 300.0, ("b", SINK): 300.0}


def test_partial_inference_has_no_edge_to_a_node_with_nothing_left() -> None:
    cluster = two_stage()
    placement = P(a=(0, 4), b=(2, 4))
    graph = build_flow_graph(cluster, placement, partial_inference=True)
    assert {(e.src, e.dst) for e in graph.edges} == {(SOURCE, "a"), ("a", SINK), ("b", SINK)}
    assert_max_flow(cluster, placement, 300.0, partial_inference=True)


def test_partial_inference_edge_set() -> None:
    cluster = make_cluster([node("a", A100), node("b", L4), node("c", T4)], num_layers=4)
    placement = P(a=(0, 2), b=(1, 3), c=(2, 4))
    exact = {(e.src, e.dst) for e in build_flow_graph(cluster, placement, False).edges}
    partial = {(e.src, e.dst) for e in build_flow_graph(cluster, placement, True).edges}
    assert exact == {(SOURCE, "a"), ("a", "c"), ("c", SINK)}
    assert partial == exact | {("a", "b"), ("b", "c")}
    # c (T4 holding 2 layers: 120) is the only way to the sink
    assert_max_flow(cluster, placement, 120.0, partial_inference=True)


def test_partial_inference_still_needs_a_link() -> None:
    assert_max_flow(two_stage(links="none"), P(a=(0, 3), b=(2, 4)), 0.0, partial_inference=True)


# ---------------------------------------------------------------------------------------- check_flows


def diamond() -> tuple[Cluster, Placement]:
    cluster = make_cluster(
        [node("a", A100), node("b", L4), node("c", T4), node("d", A100)],
        num_layers=6,
        links=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d", 100.0)],
    )
    return cluster, P(a=(0, 2), b=(2, 4), c=(2, 4), d=(4, 6))


def F(*edges: tuple[str, str, float]) -> list[EdgeFlow]:
    return [EdgeFlow(src, dst, v) for src, dst, v in edges]


def test_check_flows_accepts_any_feasible_flow_and_returns_its_value() -> None:
    cluster, placement = diamond()
    flows = F(("source", "a", 150.0), ("a", "b", 100.0), ("a", "c", 50.0), ("b", "d", 100.0),
              ("c", "d", 50.0), ("d", "sink", 150.0))  # fmt: skip
    assert check_flows(cluster, placement, flows) == 150.0
    assert check_flows(cluster, placement, []) == 0.0


@pytest.mark.parametrize(
    "flows,problem",
    [
        (
            F(("source", "b", 10.0), ("b", "d", 10.0), ("d", "sink", 10.0)),
            "source -> b, which this placement",
        ),
        (F(("source", "a", 10.0), ("a", "d", 10.0), ("d", "sink", 10.0)), "a -> d, which this placement"),
        (F(("source", "a", 10.0), ("a", "ghost", 10.0)), "a -> ghost, which this placement"),
        (
            F(("source", "a", 120.0), ("a", "c", 120.0), ("c", "d", 120.0), ("d", "sink", 120.0)),
            "120.0 on c -> d exceeds its capacity 100.0",
        ),
        (
            F(("source", "a", 10.0), ("a", "b", 10.0), ("b", "d", 5.0), ("d", "sink", 5.0)),
            "node b: 10.0 tokens/s in but 5.0 out",
        ),
        (F(("source", "a", 10.0), ("a", "b", 10.0)), "node b: 10.0 tokens/s in but 0.0 out"),
        (
            F(("source", "a", 400.0), ("a", "b", 400.0), ("b", "d", 400.0), ("d", "sink", 400.0)),
            "node b: 400.0 tokens/s exceeds its capacity 300.0",
        ),
        (
            F(("source", "a", -1.0), ("a", "b", -1.0), ("b", "d", -1.0), ("d", "sink", -1.0)),
            "-1.0 on source -> a",
        ),
        (
            F(("source", "a", math.nan), ("a", "b", math.nan), ("b", "d", math.nan), ("d", "sink", math.nan)),
            "nan on source -> a",
        ),
        # the same edge listed twice: each entry fits (<= 100) but together they exceed c -> d
        (
            F(
                ("source", "a", 120.0),
                ("a", "c", 120.0),
                ("c", "d", 60.0),
                ("c", "d", 60.0),
                ("d", "sink", 120.0),
            ),
            "c -> d listed twice",
        ),
    ],
)
def test_check_flows_rejects(flows: list[EdgeFlow], problem: str) -> None:
    cluster, placement = diamond()
    with pytest.raises(ValueError) as info:
        check_flows(cluster, placement, flows)
    assert problem in str(info.value)
    assert isinstance(info.value, HelixError)  # a corrupted plan file is the user's to fix


def test_check_flows_with_partial_inference_edges() -> None:
    cluster, placement = two_stage(), P(a=(0, 3), b=(2, 4))
    flows = F(("source", "a", 10.0), ("a", "b", 10.0), ("b", "sink", 10.0))
    assert check_flows(cluster, placement, flows, partial_inference=True) == 10.0
    with pytest.raises(ValueError, match="a -> b, which this placement does not enable"):
        check_flows(cluster, placement, flows, partial_inference=False)


# ----------------------------------------------------------------------------------- the flow graph


def test_solve_flow_graph_directly() -> None:
    graph = FlowGraph(
        {NodeId("a"): 5.0, NodeId("b"): 3.0},
        (
            FlowEdge(SOURCE, "a", 10.0),
            FlowEdge("a", "b", 10.0),
            FlowEdge("b", SINK, 10.0),
            FlowEdge("a", SINK, 1.0),
        ),
    )
    result = solve_flow_graph(graph)
    assert result.value_tokens_per_s == 4.0
    assert result.node_flow_tokens_per_s == {"a": 4.0, "b": 3.0}
    assert solve_flow_graph(FlowGraph({}, ())).value_tokens_per_s == 0.0


# --------------------------------------------------- random cases against an independent reference


def reference_max_flow(cluster: Cluster, placement: Placement, partial_inference: bool) -> int:
    """OR-Tools' max flow on a graph built here from DESIGN.md's rules (integer capacities)."""
    L = cluster.model.num_layers
    solver = ortools_max_flow.SimpleMaxFlow()
    ids = {n: i for i, n in enumerate(placement)}
    source, sink = 2 * len(ids), 2 * len(ids) + 1

    def add(tail: int, head: int, capacity: float) -> None:
        assert capacity == int(capacity)
        if capacity > 0:
            solver.add_arc_with_capacity(tail, head, int(capacity))

    for n, (start, end) in placement.items():
        spec = cluster.node_by_id[n]
        nic = min(spec.nic_in_bytes_per_s, spec.nic_out_bytes_per_s) / cluster.model.activation_bytes
        add(2 * ids[n], 2 * ids[n] + 1, min(spec.tokens_per_s[end - start - 1], nic))
        coordinator = cluster.coordinator_by_node.get(n)
        if start == 0 and coordinator:
            add(source, 2 * ids[n], coordinator.out_bytes_per_s / cluster.model.token_bytes)
        if end == L and coordinator:
            add(2 * ids[n] + 1, sink, coordinator.in_bytes_per_s / cluster.model.token_bytes)
    for link in cluster.links:
        if link.src in placement and link.dst in placement:
            end_i = placement[link.src][1]
            start_j, end_j = placement[link.dst]
            ok = start_j <= end_i < end_j if partial_inference else end_i == start_j
            if ok:
                add(
                    2 * ids[link.src] + 1,
                    2 * ids[link.dst],
                    link.bytes_per_s / cluster.model.activation_bytes,
                )
    if solver.num_arcs() == 0:
        return 0
    assert solver.solve(source, sink) == solver.OPTIMAL
    return solver.optimal_flow()


def random_case(rng: random.Random, num_nodes: int, num_layers: int) -> tuple[Cluster, Placement]:
    """Random integer tables, links, coordinator links and placement (including unplaced nodes)."""
    nodes = []
    for i in range(num_nodes):
        max_layers = rng.randint(1, num_layers)
        table = Hardware(f"gpu{i % 3}", tuple(float(rng.randint(1, 500)) for _ in range(max_layers)))
        nic = float(rng.choice([rng.randint(1, 500), 10**6]))
        nodes.append(node(f"n{i}", table, nic_in_tokens_per_s=nic))
    links = [
        (s.id, d.id, float(rng.randint(1, 400)))
        for s in nodes
        for d in nodes
        if s.id != d.id and rng.random() < 0.6
    ]
    coordinator = {
        n.id: (float(rng.choice([0, rng.randint(1, 900)])), float(rng.choice([0, rng.randint(1, 900)])))
        for n in nodes
        if rng.random() < 0.8
    }
    cluster = make_cluster(nodes, num_layers=num_layers, links=links, coordinator=coordinator)
    placement: dict[NodeId, tuple[int, int]] = {}
    for spec in nodes:
        if rng.random() < 0.85:
            k = rng.randint(1, spec.max_layers)
            start = rng.randint(0, num_layers - k)
            placement[spec.id] = (start, start + k)
    return cluster, placement


@pytest.mark.parametrize("partial_inference", [False, True])
def test_random_cases_match_an_independent_max_flow(partial_inference: bool) -> None:
    rng = random.Random(20250)
    for _ in range(150):
        cluster, placement = random_case(rng, num_nodes=rng.randint(1, 9), num_layers=rng.randint(1, 6))
        expected = reference_max_flow(cluster, placement, partial_inference)
        assert_max_flow(cluster, placement, float(expected), partial_inference)


def test_a_larger_layered_cluster_matches_the_reference() -> None:
    """120 nodes in 6 stages with random links between consecutive stages: the max flow is exact and
    the iterative augmenting search does not hit any recursion limit."""
    rng = random.Random(7)
    stages, per_stage = 6, 20
    nodes = [
        node(f"s{s}-{i}", Hardware("g", tuple(float(rng.randint(50, 500)) for _ in range(2))))
        for s in range(stages)
        for i in range(per_stage)
    ]
    links = [
        (f"s{s}-{i}", f"s{s + 1}-{j}", float(rng.randint(1, 60)))
        for s in range(stages - 1)
        for i in range(per_stage)
        for j in range(per_stage)
        if rng.random() < 0.3
    ]
    cluster = make_cluster(nodes, num_layers=2 * stages, links=links)
    placement = {spec.id: (2 * int(spec.id[1]), 2 * int(spec.id[1]) + 2) for spec in nodes}
    assert_max_flow(cluster, placement, float(reference_max_flow(cluster, placement, False)))


# ------------------------------------------------------------------------------------ bundled clusters


@pytest.mark.parametrize("name", BUNDLED_CLUSTERS)
def test_compute_upper_bound_matches_published(name: str) -> None:
    cluster = bundled_cluster(name)
    published = cluster.published["validation"]["compute_upper_bound_ours"]
    assert cluster.compute_upper_bound_tokens_per_s() == pytest.approx(published, rel=1e-12)


def test_compute_upper_bound_by_hand() -> None:
    # layer-throughput k * tokens_per_s[k-1]: A100 1200, L4 600, T4 240, KV_BOUND max(1000, 800, 600)
    cluster = make_cluster([node("a", A100), node("b", L4), node("c", T4), node("d", KV_BOUND)], num_layers=4)
    assert cluster.compute_upper_bound_tokens_per_s() == (1200 + 600 + 240 + 1000) / 4
    # the NIC caps every k: A100 capped at 100 tokens/s is worth 100 * 4 (it holds at most 4 of 4 layers)
    capped = make_cluster([node("a", A100, nic_tokens_per_s=100.0)], num_layers=4)
    assert capped.compute_upper_bound_tokens_per_s() == 100.0


def test_compute_upper_bound_counts_only_layers_the_model_has() -> None:
    """A node that could hold 6 layers of a 4-layer model holds at most 4: its best k * capacity(k)
    must be taken over k <= 4, or the bound is looser than it needs to be."""
    growing = Hardware("growing", (100.0, 60.0, 45.0, 40.0, 39.0, 38.0))  # k * T(k): 100..160..228
    cluster = make_cluster([node("g", growing)], num_layers=4)
    assert cluster.compute_upper_bound_tokens_per_s() == 40.0  # 4 * 40 / 4 layers
    assert_max_flow(cluster, P(g=(0, 4)), 40.0)  # and one node holding all 4 layers reaches it


@pytest.mark.parametrize("name", BUNDLED_CLUSTERS)
@pytest.mark.parametrize("baseline", [petals_placement, swarm_placement, separate_pipelines_placement])
def test_max_flow_of_baseline_placements_on_bundled_clusters(name: str, baseline: object) -> None:
    cluster = bundled_cluster(name)
    placement = baseline(cluster)  # type: ignore[operator]
    result = max_flow(cluster, placement)
    assert_max_flow(cluster, placement, result.value_tokens_per_s)
    assert result.value_tokens_per_s <= cluster.compute_upper_bound_tokens_per_s() * (1 + 1e-12)
