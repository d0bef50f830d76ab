"""The baselines (Petals, Swarm, separate pipelines) on small cases whose answers are worked out by
hand in the comments, the `plan()` entry point's errors, and every baseline on every bundled cluster."""

from __future__ import annotations

import functools
from collections import Counter

import pytest
from builders import (
    A100,
    BUNDLED_CLUSTERS,
    L4,
    T4,
    assert_plan_consistent,
    bundled_cluster,
    make_cluster,
    node,
    nodes_of,
)

from helix_p2p.cluster import Cluster
from helix_p2p.errors import HelixError
from helix_p2p.flow import max_flow
from helix_p2p.plan import Placement, PlanError
from helix_p2p.planner import METHODS, PlanOptions, plan, plan_from_placement
from helix_p2p.planner.baselines import (
    balanced_pipeline,
    even_split,
    petals_placement,
    separate_pipelines_placement,
    swarm_placement,
)

BASELINES = ["petals", "swarm", "sp"]


def ranges(placement: Placement) -> Counter[tuple[int, int]]:
    """How many nodes hold each range (for answers that do not depend on which node is which)."""
    return Counter(placement.values())


# -------------------------------------------------------------------------------------------- Petals


@pytest.mark.parametrize("seed", range(6))
def test_petals_identical_nodes_fill_the_weakest_window(seed: int) -> None:
    """Four L4s of 2 layers on 4 layers: the first takes [0, 2) (all windows tie at zero, the lowest
    start wins), the second the still-empty [2, 4), the third ties again and takes [0, 2), the
    fourth the weaker [2, 4). Two per stage whatever the order: 2 * 300 tokens/s."""
    cluster = make_cluster(nodes_of(L4, 4, max_layers=2), num_layers=4)
    result = plan(cluster, PlanOptions(method="petals", seed=seed))
    assert ranges(result.placement) == {(0, 2): 2, (2, 4): 2}
    assert result.objective_tokens_per_s == 600.0
    assert_plan_consistent(cluster, result)


@pytest.mark.parametrize("seed", range(4))
def test_petals_windows_are_compared_sorted_and_lexicographically(seed: int) -> None:
    """L4s of 2 layers on a 3-layer model, per-layer throughput after each join (c = 300):
    1st: windows [0,0] [0,0] tie -> [0, 2)                          -> [c, c, 0]
    2nd: [c,c] vs sorted [0,c] -> [1, 3)                            -> [c, 2c, c]
    3rd: sorted [c,2c] vs sorted [c,2c] tie -> [0, 2)               -> [2c, 3c, c]
    4th: sorted [2c,3c] vs sorted [c,3c] -> [1, 3)                  -> [2c, 4c, 2c]"""
    cluster = make_cluster(nodes_of(L4, 4, max_layers=2), num_layers=3)
    placement = petals_placement(cluster, seed=seed)
    assert ranges(placement) == {(0, 2): 2, (1, 3): 2}


def test_petals_is_scored_with_partial_inference() -> None:
    """[0, 2) then [1, 3) only meet if a server may start mid-range, which is how Petals routes; the
    plan says so, and its flow (an L4 holding 2 layers: 300) needs that edge."""
    cluster = make_cluster(nodes_of(L4, 2, max_layers=2), num_layers=3)
    result = plan(cluster, PlanOptions(method="petals"))
    assert ranges(result.placement) == {(0, 2): 1, (1, 3): 1}
    assert result.partial_inference is True
    assert result.objective_tokens_per_s == 300.0
    assert max_flow(cluster, result.placement, partial_inference=False).value_tokens_per_s == 0.0
    assert_plan_consistent(cluster, result)


def test_petals_order_decides_the_outcome_and_the_seed_decides_the_order() -> None:
    """Two A100s and two L4s of 2 layers each (A = 600, L = 300 tokens/s) on 4 layers. By join order
    of the types (ties go to the lowest start):
    AALL: A [0,2), A [2,4), L [0,2) (tie), L [2,4)     -> A+L | A+L  -> 900
    ALAL: A [0,2), L [2,4), A [2,4), L [0,2)           -> A+L | L+A  -> 900
    LAAL: L [0,2), A [2,4), A [0,2), L [2,4)           -> L+A | A+L  -> 900
    LLAA: L [0,2), L [2,4), A [0,2) (tie), A [2,4)     -> L+A | L+A  -> 900
    ALLA: A [0,2), L [2,4), L [2,4), A [0,2) (tie)     -> A+A | L+L  -> 600
    LALA: L [0,2), A [2,4), L [0,2), A [0,2) (tie)     -> L+L+A | A  -> 600"""
    cluster = make_cluster(nodes_of(A100, 2, max_layers=2) + nodes_of(L4, 2, max_layers=2), num_layers=4)
    two_and_two, three_and_one = {(0, 2): 2, (2, 4): 2}, {(0, 2): 3, (2, 4): 1}
    outcomes = Counter()
    for seed in range(40):
        result = plan(cluster, PlanOptions(method="petals", seed=seed))
        first_stage = sorted(n.split("-")[0] for n, rng in result.placement.items() if rng == (0, 2))
        assert result.objective_tokens_per_s == (900.0 if first_stage in (["a100", "l4"],) else 600.0)
        assert ranges(result.placement) in (two_and_two, three_and_one)
        outcomes[(tuple(first_stage), result.objective_tokens_per_s)] += 1
    # each of the three shapes above shows up for some seed
    assert {k[0] for k in outcomes} >= {("a100", "l4"), ("a100", "a100")} | {("a100", "l4", "l4")}


def test_petals_node_takes_as_many_layers_as_it_can() -> None:
    """The A100 could hold 6 layers of a 4-layer model: it takes all 4 (the only window). The T4
    takes its 2 at [0, 2) in either order: first, every window is zero; after the A100, every
    window is [300, 300]; ties go to the lowest start."""
    cluster = make_cluster([node("a", A100), node("t", T4)], num_layers=4)
    for seed in range(8):
        assert petals_placement(cluster, seed=seed) == {"a": (0, 4), "t": (0, 2)}


def test_petals_is_deterministic_for_a_seed() -> None:
    cluster = bundled_cluster("single24-llama70b")
    first = plan(cluster, PlanOptions(method="petals", seed=7))
    again = plan(cluster, PlanOptions(method="petals", seed=7))
    assert first.placement == again.placement and first.flows == again.flows
    assert first.objective_tokens_per_s == again.objective_tokens_per_s
    others = {tuple(sorted(petals_placement(cluster, seed=s).items())) for s in range(8)}
    assert len(others) > 1  # the seed does change the join order


# --------------------------------------------------------------------------------------------- Swarm


def test_swarm_hand_case() -> None:
    """The smallest max_layers (T4: 2) fixes the stages: [0, 2) and [2, 4). Strongest first by
    2-layer capacity: A100 (600) -> stage 0 (tie, lower stage); L4 (300) -> stage 1 (empty);
    each T4 (120) -> the stage with less throughput, stage 1 (300, then 420 < 600).
    Flow: min(600, 300 + 120 + 120) = 540."""
    cluster = make_cluster([node("a100", A100), node("l4", L4), *nodes_of(T4, 2)], num_layers=4)
    result = plan(cluster, PlanOptions(method="swarm"))
    assert result.placement == {"a100": (0, 2), "l4": (2, 4), "t4-0": (2, 4), "t4-1": (2, 4)}
    assert result.objective_tokens_per_s == 540.0
    assert result.upper_bound_tokens_per_s is None and result.partial_inference is False
    assert_plan_consistent(cluster, result)


def test_swarm_uneven_stages() -> None:
    """5 layers in stages of at most 2: [0, 2) [2, 4) [4, 5). By 2-layer capacity A100 600 -> stage 0,
    L4 300 -> stage 1, T4 120 -> stage 2 (empty), T4 -> stage 2 (its 1-layer 240 < 300).
    Stage throughputs: 600, 300, 240 + 240 -> flow 300."""
    cluster = make_cluster([node("a100", A100), node("l4", L4), *nodes_of(T4, 2)], num_layers=5)
    result = plan(cluster, PlanOptions(method="swarm"))
    assert result.placement == {"a100": (0, 2), "l4": (2, 4), "t4-0": (4, 5), "t4-1": (4, 5)}
    assert result.objective_tokens_per_s == 300.0
    assert_plan_consistent(cluster, result)


def test_swarm_ties_go_to_the_lower_stage_and_the_node_listed_first() -> None:
    cluster = make_cluster(nodes_of(L4, 4, max_layers=2), num_layers=4)
    expected = {"l4-0": (0, 2), "l4-1": (2, 4), "l4-2": (0, 2), "l4-3": (2, 4)}
    assert swarm_placement(cluster, seed=0) == expected
    assert swarm_placement(cluster, seed=99) == expected  # no randomness


# ------------------------------------------------------------------------------ separate pipelines


def test_separate_pipelines_one_per_type() -> None:
    """A100s hold the 4-layer model alone (300 tokens/s each); T4s need 2 per pipeline, [0, 2) and
    [2, 4) at 120 tokens/s: 2 * 300 + 2 * 120 = 840."""
    cluster = make_cluster(nodes_of(A100, 2) + nodes_of(T4, 4), num_layers=4)
    result = plan(cluster, PlanOptions(method="sp"))
    assert result.placement == {
        "a100-0": (0, 4),
        "a100-1": (0, 4),
        "t4-0": (0, 2),
        "t4-1": (2, 4),
        "t4-2": (0, 2),
        "t4-3": (2, 4),
    }
    assert result.objective_tokens_per_s == 840.0
    assert_plan_consistent(cluster, result)


def test_separate_pipelines_leftovers_form_a_mixed_pipeline() -> None:
    """The L4 holds the model alone (150); three T4s make one T4 pipeline and one left over; the
    A100 (limited to 2 layers) cannot make a pipeline alone. The leftovers, strongest first, form a
    mixed pipeline: the A100 takes layers while it is the faster (its 2 layers: 600 vs T4 120),
    then the T4 the rest: A100 [0, 2), T4 [2, 4). Stage [2, 4) holds two T4s (240 together), so
    150 + min(600 + 120, 240) = 390."""
    cluster = make_cluster([node("a100", A100, max_layers=2), node("l4", L4), *nodes_of(T4, 3)], num_layers=4)
    result = plan(cluster, PlanOptions(method="sp"))
    assert result.placement == {"l4": (0, 4), "t4-0": (0, 2), "t4-1": (2, 4), "a100": (0, 2), "t4-2": (2, 4)}
    assert result.objective_tokens_per_s == 390.0
    assert_plan_consistent(cluster, result)


def test_separate_pipelines_leave_out_nodes_that_cannot_complete_one() -> None:
    cluster = make_cluster([node("l4", L4), node("t4", T4)], num_layers=4)
    assert separate_pipelines_placement(cluster) == {"l4": (0, 4)}


def test_balanced_pipeline_and_even_split() -> None:
    assert even_split(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert even_split(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert even_split(80, 1) == [(0, 80)]
    # every node holds 1 layer, then each further layer goes to whoever is fastest holding one more:
    # A100 at 2 layers (600) beats L4 at 2 (300); A100 at 3 (400) too; A100 at 4 (300) ties the L4
    # and the first listed wins; then A100 at 5 (240) loses to the L4 at 2 (300)
    placement = balanced_pipeline([node("a", A100), node("b", L4)], 6, activation_bytes=1000)
    assert placement == {"a": (0, 4), "b": (4, 6)}


# ------------------------------------------------------------------------------------------ plan()


@pytest.mark.parametrize("method", [*BASELINES, "milp"])
def test_plan_refuses_a_cluster_that_cannot_hold_the_model(method: str) -> None:
    cluster = make_cluster(nodes_of(T4, 2), num_layers=5, name="two-t4", model_name="tiny-5")
    with pytest.raises(PlanError) as info:
        plan(cluster, PlanOptions(method=method))
    message = str(info.value)
    assert "'two-t4' cannot hold the model" in message
    assert "at most 4 layers" in message and "'tiny-5' has 5" in message
    assert isinstance(info.value, HelixError)


def test_max_layers_beyond_the_model_count_only_once() -> None:
    """An A100 (max_layers 6) cannot hold an 8-layer model alone; it can hold a 4-layer one, and its
    6 count as 4 there."""
    with pytest.raises(PlanError, match="at most 6 layers"):
        plan(make_cluster([node("a", A100)], num_layers=8), PlanOptions(method="swarm"))
    # one node holding the whole 4-layer model is enough
    result = plan(make_cluster([node("a", A100)], num_layers=4), PlanOptions(method="sp"))
    assert result.placement == {"a": (0, 4)} and result.objective_tokens_per_s == 300.0


def test_plan_refuses_an_unknown_method() -> None:
    cluster = make_cluster(nodes_of(T4, 2), num_layers=4)
    with pytest.raises(PlanError) as info:
        plan(cluster, PlanOptions(method="gurobi"))
    assert "unknown planning method 'gurobi'" in str(info.value)
    for method in METHODS:
        assert method in str(info.value)
    assert set(METHODS) >= {"milp", "petals", "swarm", "sp"}


@pytest.mark.parametrize("method", ["swarm", "sp"])
def test_partial_inference_option_is_carried_into_the_plan(method: str) -> None:
    cluster = make_cluster([node("a100", A100), node("l4", L4), *nodes_of(T4, 2)], num_layers=4)
    result = plan(cluster, PlanOptions(method=method, partial_inference=True))
    assert result.partial_inference is True
    assert_plan_consistent(cluster, result)


def test_plan_from_placement_never_reports_a_bound_below_its_flow() -> None:
    cluster = make_cluster([node("a", A100)], num_layers=4)
    result = plan_from_placement(
        cluster, {"a": (0, 4)}, method="test", solve_seconds=0.5, upper_bound_tokens_per_s=299.9999
    )
    assert result.objective_tokens_per_s == 300.0
    assert result.upper_bound_tokens_per_s == 300.0 and result.gap == 0.0
    assert (result.method, result.cluster, result.solve_seconds) == ("test", cluster.name, 0.5)


# ------------------------------------------------------------------------- every bundled cluster


@functools.cache
def _bundled(name: str) -> Cluster:
    return bundled_cluster(name)


@pytest.mark.parametrize("name", BUNDLED_CLUSTERS)
@pytest.mark.parametrize("method", BASELINES)
def test_baselines_on_bundled_clusters(name: str, method: str) -> None:
    cluster = _bundled(name)
    result = plan(cluster, PlanOptions(method=method, seed=1))
    assert result.method == method and result.cluster == cluster.name
    assert result.upper_bound_tokens_per_s is None and result.solve_seconds >= 0
    assert_plan_consistent(cluster, result)
    assert 0 < result.objective_tokens_per_s <= cluster.compute_upper_bound_tokens_per_s()
    # every node's layers count against its own max_layers, and every layer is held by someone
    held = set()
    for start, end in result.placement.values():
        held.update(range(start, end))
    assert held == set(range(cluster.model.num_layers))
