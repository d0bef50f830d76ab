"""The spreading post-step: the same total flow, shared by parallel replicas, so IWRR uses them all.

Hand-made cluster (2 layers): replicas a and b hold layer 0, c holds layer 1; every number below is
worked out from the builders' round tables."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from builders import A100, L4, T4, assert_plan_consistent, make_cluster, node

from helix_p2p.cluster import NodeId
from helix_p2p.flow import max_flow
from helix_p2p.plan import Plan
from helix_p2p.planner import PlanOptions, plan, plan_from_placement
from helix_p2p.planner.spread import spread_plan
from helix_p2p.routing import IwrrRouter, NodeStatus, RouteGraph, RouteRequest

# a: T4 holding 1 layer = 240 tokens/s; b: A100 holding 1 layer = 1200; c: L4 holding 1 layer = 600.
# Max flow = 600 (c is the bottleneck). Spread: LP 1 raises the least-used node: x_a + x_b = 600 and
# x_a >= 240 t, x_b >= 1200 t give t = 600 / 1440, so x_a = 100, x_b = 500 (utilisation 5/12 each:
# the split follows capacity); c carries 600 (utilisation 1), which LP 2 cannot lower.
A, B, C = node("a", T4), node("b", A100), node("c", L4)
CLUSTER = make_cluster([A, B, C], num_layers=2)
PLACEMENT = {A.id: (0, 1), B.id: (0, 1), C.id: (1, 2)}


def through(p: Plan) -> dict[str, float]:
    out: dict[str, float] = {}
    for f in p.flows:
        if f.dst != "sink":
            out[f.dst] = out.get(f.dst, 0.0) + f.tokens_per_s
    return out


def test_replicas_share_the_flow_in_proportion_to_capacity() -> None:
    before = plan_from_placement(CLUSTER, PLACEMENT, method="test", solve_seconds=0.0)
    after = spread_plan(CLUSTER, before)
    assert after.objective_tokens_per_s == before.objective_tokens_per_s == 600.0
    assert_plan_consistent(CLUSTER, after)  # feasible, and carries exactly the objective
    flows = through(after)
    assert flows["a"] == pytest.approx(100.0, rel=1e-4)
    assert flows["b"] == pytest.approx(500.0, rel=1e-4)
    assert flows["c"] == pytest.approx(600.0, rel=1e-9)
    assert after.details["flows"] == "spread"


def test_dinic_alone_fills_one_replica_first() -> None:
    # The premise of the step: the plain max flow runs a at its capacity and b at 360 / 1200, and
    # with a downstream stage no faster than one replica, the other gets nothing at all.
    plain = through(plan_from_placement(CLUSTER, PLACEMENT, method="t", solve_seconds=0.0))
    assert (plain["a"], plain["b"]) == (240.0, 360.0)
    slow = make_cluster([node("a", A100), node("b", L4), node("c", T4)], num_layers=2)
    idle = through(plan_from_placement(slow, PLACEMENT, method="t", solve_seconds=0.0))
    assert min(idle.get("a", 0.0), idle.get("b", 0.0)) == 0.0
    spread = through(spread_plan(slow, plan_from_placement(slow, PLACEMENT, method="t", solve_seconds=0.0)))
    assert spread["a"] == pytest.approx(240 * 1200 / 1800, rel=1e-4)  # 160, and b 80: 2 : 1
    assert spread["b"] == pytest.approx(240 * 600 / 1800, rel=1e-4)


def test_plan_spreads_by_default_and_keeps_placement_and_value() -> None:
    options = PlanOptions(method="milp", time_limit_s=10, threads=1)
    spread = plan(CLUSTER, options)
    plain = plan(CLUSTER, replace(options, spread_flows=False))
    assert spread.placement == plain.placement
    assert spread.objective_tokens_per_s == plain.objective_tokens_per_s
    assert spread.upper_bound_tokens_per_s == plain.upper_bound_tokens_per_s
    assert plain.flows == max_flow(CLUSTER, plain.placement).flows
    assert spread.details["flows"] == "spread" and "flows" not in plain.details
    assert_plan_consistent(CLUSTER, spread)


def test_iwrr_then_routes_over_both_replicas_by_their_share() -> None:
    spread = spread_plan(CLUSTER, plan_from_placement(CLUSTER, PLACEMENT, method="t", solve_seconds=0.0))
    router = IwrrRouter(RouteGraph(spread))
    loads = {n: NodeStatus(free_kv_tokens=10**9, kv_budget_tokens=10**9) for n in ("a", "b", "c")}
    firsts = [router.route(RouteRequest(100, 100), loads).hops[0].peer for _ in range(600)]  # type: ignore[union-attr]
    assert firsts.count("a") == pytest.approx(100, abs=2)
    assert firsts.count("b") == pytest.approx(500, abs=2)


def test_a_node_off_every_path_does_not_stop_the_spreading() -> None:
    # d holds layer 1 but no link reaches it: it can carry nothing, and must not pin t at 0.
    d = node("d", L4)
    cluster = make_cluster([A, B, C, d], num_layers=2, links=[("a", "c"), ("b", "c")])
    placement = {**PLACEMENT, d.id: (1, 2)}
    after = spread_plan(cluster, plan_from_placement(cluster, placement, method="t", solve_seconds=0.0))
    assert after.details.get("flows") == "spread"
    assert through(after)["a"] == pytest.approx(100.0, rel=1e-4)
    assert "d" not in through(after)


def test_a_plan_without_flow_is_returned_unchanged() -> None:
    cluster = make_cluster([A, C], num_layers=2, links="none")
    empty = plan_from_placement(cluster, {A.id: (0, 1), C.id: (1, 2)}, method="t", solve_seconds=0.0)
    assert empty.objective_tokens_per_s == 0.0
    assert spread_plan(cluster, empty) is empty


def test_a_graph_over_the_size_cap_keeps_the_max_flow_split(monkeypatch: pytest.MonkeyPatch) -> None:
    from helix_p2p.planner import spread

    monkeypatch.setattr(spread, "MAX_EDGES", 2)  # this placement has 4 edges
    before = plan_from_placement(CLUSTER, PLACEMENT, method="t", solve_seconds=0.0)
    assert spread_plan(CLUSTER, before) is before


# Two stages of two equal L4 replicas (600 tokens/s each at 1 layer): max flow 1200. An LP answer is
# a vertex, so its edge flows pin each first-stage replica to one second-stage replica (two disjoint
# chains, and IWRR, which uses only edges with planned flow, serves 2 pipelines of the 4 the placement
# allows). Step 3 re-splits each layer boundary in proportion: 600 * 600 / 1200 = 300 on every edge.
STAGES = make_cluster([node(n, L4) for n in ("p", "q", "r", "s")], num_layers=2)
STAGED = {NodeId("p"): (0, 1), NodeId("q"): (0, 1), NodeId("r"): (1, 2), NodeId("s"): (1, 2)}


def test_each_boundary_is_split_in_proportion_so_iwrr_mixes_every_pipeline() -> None:
    after = spread_plan(STAGES, plan_from_placement(STAGES, STAGED, method="t", solve_seconds=0.0))
    assert_plan_consistent(STAGES, after)
    middle = {(f.src, f.dst): f.tokens_per_s for f in after.flows if f.src != "source" and f.dst != "sink"}
    assert middle == pytest.approx({(u, v): 300.0 for u in ("p", "q") for v in ("r", "s")}, rel=1e-9)
    router = IwrrRouter(RouteGraph(after))
    loads = {n: NodeStatus(free_kv_tokens=10**9, kv_budget_tokens=10**9) for n in STAGED}
    pipelines = Counter(router.route(RouteRequest(100, 100), loads).peers for _ in range(400))  # type: ignore[union-attr]
    assert sorted(pipelines.values()) == [100, 100, 100, 100]


def test_a_boundary_whose_proportional_split_breaks_a_link_keeps_the_lp_split() -> None:
    # p -> s can carry 100 tokens/s, less than the 300 a proportional split puts there.
    links = [("p", "r"), ("q", "r"), ("q", "s"), ("p", "s", 100.0)]
    cluster = make_cluster([node(n, L4) for n in ("p", "q", "r", "s")], num_layers=2, links=links)
    after = spread_plan(cluster, plan_from_placement(cluster, STAGED, method="t", solve_seconds=0.0))
    assert after.details["flows"] == "spread"
    assert_plan_consistent(cluster, after)  # includes every link's capacity
    assert after.objective_tokens_per_s == 1200.0
    assert {(f.src, f.dst): f.tokens_per_s for f in after.flows}.get(("p", "s"), 0.0) <= 100.0 + 1e-9


def test_twins_between_a_lone_least_used_node_and_a_lone_bottleneck_share_evenly() -> None:
    # a (A100, 1200) is the least-used node at 240 / 1200 = 0.2 and z (T4, 240) the bottleneck at 1:
    # LPs 1 and 2 then only ask each T4 twin for >= 0.2 * 240 = 48, and LP 3 evens them out.
    a, p, q, z = node("a", A100), node("p", T4), node("q", T4), node("z", T4)
    cluster = make_cluster([a, p, q, z], num_layers=3)
    placement = {a.id: (0, 1), p.id: (1, 2), q.id: (1, 2), z.id: (2, 3)}
    after = spread_plan(cluster, plan_from_placement(cluster, placement, method="t", solve_seconds=0.0))
    assert_plan_consistent(cluster, after)
    flows = through(after)
    assert flows["p"] == pytest.approx(120.0, abs=240 / 20)
    assert flows["q"] == pytest.approx(120.0, abs=240 / 20)
