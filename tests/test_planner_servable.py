"""The planner's servable stage (helix_p2p/planner/servable.py): among the max-flow placement and
shallower stage placements it publishes the one of most flow per hop, F / D, where D is the mean
number of nodes a token passes. Expected numbers are worked out by hand from tests/builders.py's
tables and checked against the exact max flow."""

from __future__ import annotations

import pytest
from builders import A100, KV_BOUND, make_cluster, nodes_of

from helix_p2p.flow import max_flow
from helix_p2p.planner import PlanOptions, plan
from helix_p2p.planner.heuristics import shallow_stage_placement
from helix_p2p.planner.servable import servability

SERVABLE = PlanOptions(method="milp", time_limit_s=10)
MAX_FLOW_ONLY = PlanOptions(method="milp", time_limit_s=10, servable=False)


def kv_bound_cluster():
    """Four V100-like GPUs (1000, 400, 200 tokens/s holding 1, 2, 3 layers: throughput falls
    faster than 1/k, as in Helix's tables), a 4-layer model. The max flow is one chain of single
    layers, 1000 tokens/s in 4 hops (250 per hop); two stages of two replicas holding 2 layers
    carry 2 * 400 = 800 in 2 hops (400 per hop)."""
    return make_cluster(nodes_of(KV_BOUND, 4), num_layers=4)


def test_max_flow_alone_picks_the_deep_chain() -> None:
    cluster = kv_bound_cluster()
    deep = plan(cluster, MAX_FLOW_ONLY)
    figures = servability(cluster, deep.placement)
    assert deep.objective_tokens_per_s == pytest.approx(1000.0)
    assert sorted(end - start for start, end in deep.placement.values()) == [1, 1, 1, 1]
    assert figures.mean_hops == pytest.approx(4.0)


def test_servable_plan_trades_flow_for_fewer_hops_by_flow_per_hop() -> None:
    cluster = kv_bound_cluster()
    deep = plan(cluster, MAX_FLOW_ONLY)
    chosen = plan(cluster, SERVABLE)
    deep_figures = servability(cluster, deep.placement)
    chosen_figures = servability(cluster, chosen.placement)
    # two stages of two replicas holding two layers each
    assert sorted(end - start for start, end in chosen.placement.values()) == [2, 2, 2, 2]
    assert chosen_figures.flow_tokens_per_s == pytest.approx(2 * KV_BOUND.capacity(2))
    assert chosen_figures.mean_hops == pytest.approx(2.0)
    # the reason, from the numbers: more flow per hop (400 against 250), though less flow
    chosen_per_hop = chosen_figures.flow_tokens_per_s / chosen_figures.mean_hops
    deep_per_hop = deep_figures.flow_tokens_per_s / deep_figures.mean_hops
    assert chosen_per_hop > deep_per_hop
    assert chosen_figures.flow_tokens_per_s < deep_figures.flow_tokens_per_s
    details = chosen.details["servable"]
    assert details["max_flow_placement_tokens_per_s"] == pytest.approx(deep_figures.flow_tokens_per_s)
    assert details["chosen_flow_per_hop_tokens_per_s"] == pytest.approx(chosen_per_hop)
    # honest figures: the objective is the chosen placement's exact max flow, the bound is still
    # the proven bound on any placement's flow (so the gap shows what was given up)
    assert chosen.objective_tokens_per_s == pytest.approx(
        max_flow(cluster, chosen.placement).value_tokens_per_s
    )
    assert chosen.upper_bound_tokens_per_s == pytest.approx(deep.objective_tokens_per_s)


def test_a_max_flow_placement_that_is_also_shallowest_is_kept() -> None:
    """Two A100s (1200 / k tokens/s) and a 4-layer model: the best flow, 600, is reached both by
    a 2-hop chain and by two whole-model replicas in 1 hop; the servable stage publishes the
    replicas and gives up no flow."""
    cluster = make_cluster(nodes_of(A100, 2), num_layers=4)
    chosen = plan(cluster, SERVABLE)
    assert chosen.objective_tokens_per_s == pytest.approx(plan(cluster, MAX_FLOW_ONLY).objective_tokens_per_s)
    assert chosen.objective_tokens_per_s == pytest.approx(600.0)
    assert servability(cluster, chosen.placement).mean_hops == pytest.approx(1.0)


def test_shallow_stage_placement_uses_fewest_stages_for_a_target() -> None:
    cluster = kv_bound_cluster()
    nodes = list(cluster.nodes)
    # 800 = two replicas at 2 layers: 2 stages; 1000 needs single layers: 4 stages
    assert sorted(e - s for s, e in shallow_stage_placement(cluster, nodes, 800.0).values()) == [2, 2, 2, 2]
    assert sorted(e - s for s, e in shallow_stage_placement(cluster, nodes, 1000.0).values()) == [1, 1, 1, 1]
    # 1001 needs two replicas even at one layer: 4 stages of 2 = 8 nodes, and there are 4
    assert shallow_stage_placement(cluster, nodes, 1001.0) == {}


def test_servable_off_publishes_the_max_flow_placement() -> None:
    cluster = kv_bound_cluster()
    off = plan(cluster, MAX_FLOW_ONLY)
    assert off.details["servable"] == {}
    assert off.objective_tokens_per_s == pytest.approx(1000.0)
