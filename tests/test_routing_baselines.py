"""The baseline schedulers: random over every enabled edge, shortest queue, and SWARM's EWMA
priorities. Each is checked for the rule that defines it."""

from __future__ import annotations

import pytest
from builders import A100, L4, make_cluster, node

from helix_p2p.cluster import NodeId
from helix_p2p.planner import plan_from_placement
from helix_p2p.routing import (
    NodeStatus,
    Pipeline,
    RandomRouter,
    RouteGraph,
    RouteRequest,
    ShortestQueueRouter,
    SwarmRouter,
)

BIG = 10**9


def three_way():
    """Three parallel one-node pipelines of unequal capacity: a (A100: 1200/2=600), b (A100, 600),
    c (L4, 300), each holding both layers."""
    cluster = make_cluster([node("a", A100), node("b", A100), node("c", L4)], num_layers=2)
    placement = {NodeId("a"): (0, 2), NodeId("b"): (0, 2), NodeId("c"): (0, 2)}
    return cluster, plan_from_placement(cluster, placement, method="t", solve_seconds=0)


def loads(queued: dict[str, int] | None = None) -> dict[NodeId, NodeStatus]:
    queued = queued or {}
    return {NodeId(n): NodeStatus(BIG, BIG, queued_tokens=queued.get(n, 0)) for n in "abc"}


def first_hops(router, n: int, request: RouteRequest | None = None, view=None) -> list[str]:
    request = request or RouteRequest(10, 10)
    out = []
    for _ in range(n):
        pipeline = router.route(request, view or loads())
        assert isinstance(pipeline, Pipeline)
        out.append(pipeline.peers[0])
    return out


def test_random_spreads_uniformly_ignoring_the_flows() -> None:
    cluster, plan = three_way()
    picks = first_hops(RandomRouter(RouteGraph(plan, cluster), seed=1), 3000)
    for peer in "abc":
        assert picks.count(peer) / 3000 == pytest.approx(1 / 3, abs=0.03)


def test_random_uses_edges_the_max_flow_left_empty() -> None:
    # a (L4, one layer: 600 tokens/s) feeds b or c (A100, one layer: 1200 each): the max flow needs
    # only one of them and leaves the other's edge empty; random does not read the flows.
    cluster = make_cluster([node("a", L4), node("b", A100), node("c", A100)], num_layers=2)
    placement = {NodeId("a"): (0, 1), NodeId("b"): (1, 2), NodeId("c"): (1, 2)}
    plan = plan_from_placement(cluster, placement, method="t", solve_seconds=0)
    used = {f.dst for f in plan.flows if f.src == "a" and f.tokens_per_s > 0}
    assert len(used) == 1
    router = RandomRouter(RouteGraph(plan, cluster), seed=2)
    view = {NodeId(n): NodeStatus(BIG, BIG) for n in "abc"}
    seconds = set()
    for _ in range(200):
        pipeline = router.route(RouteRequest(1, 1), view)
        assert isinstance(pipeline, Pipeline)
        seconds.add(pipeline.peers[1])
    assert seconds == {"b", "c"}


def test_shortest_queue_picks_the_least_loaded_next_node() -> None:
    cluster, plan = three_way()
    router = ShortestQueueRouter(RouteGraph(plan, cluster))
    assert first_hops(router, 5, view=loads({"a": 500, "b": 20, "c": 40})) == ["b"] * 5
    assert first_hops(router, 5, view=loads({"a": 0, "b": 20, "c": 40})) == ["a"] * 5


def test_swarm_round_robins_until_it_has_observations() -> None:
    cluster, plan = three_way()
    picks = first_hops(SwarmRouter(RouteGraph(plan, cluster), seed=3), 30)
    assert sorted(picks.count(p) for p in "abc") == [10, 10, 10]


def test_swarm_sends_in_inverse_proportion_to_observed_hop_times() -> None:
    cluster, plan = three_way()
    router = SwarmRouter(RouteGraph(plan, cluster), seed=3, smoothing=1.0)
    router.observe_hop("source", "a", 0.1)
    router.observe_hop("source", "b", 0.1)
    router.observe_hop("source", "c", 0.4)
    picks = first_hops(router, 900)
    # each pick adds the hop's EWMA to its priority: shares 1/0.1 : 1/0.1 : 1/0.4 = 4 : 4 : 1
    assert picks.count("a") / 900 == pytest.approx(4 / 9, abs=0.01)
    assert picks.count("c") / 900 == pytest.approx(1 / 9, abs=0.01)


def test_swarm_counts_requests_not_tokens() -> None:
    cluster, plan = three_way()
    router = SwarmRouter(RouteGraph(plan, cluster), seed=0)
    picks = [first_hops(router, 1, RouteRequest(2000 if i % 3 == 0 else 5, 5))[0] for i in range(300)]
    # one request per candidate in turn, whatever its length
    assert sorted(picks.count(p) for p in "abc") == [100, 100, 100]


def test_swarm_ewma_smooths_observations() -> None:
    cluster, plan = three_way()
    router = SwarmRouter(RouteGraph(plan, cluster), initial_hop_s=1.0, smoothing=0.5)
    router.observe_hop("source", "a", 3.0)
    assert router.ewma_s[("source", "a")] == pytest.approx(2.0)
    router.observe_hop("source", "a", 0.0)
    assert router.ewma_s[("source", "a")] == pytest.approx(1.0)
    router.observe_hop("nowhere", "a", 1.0)  # unknown edges are ignored, not an error
    with pytest.raises(ValueError):
        SwarmRouter(RouteGraph(plan, cluster), smoothing=0.0)
