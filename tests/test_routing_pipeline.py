"""Per-request pipelines over a plan: hop ranges, IWRR's split over the plan's flows, KV-aware
skipping with backtracking, the reasons a request cannot be routed, and admission with a bounded
wait queue."""

from __future__ import annotations

import itertools
import random

import pytest
from builders import A100, L4, T4, make_cluster, node

from helix_p2p.cluster import NodeId
from helix_p2p.planner import plan_from_placement
from helix_p2p.routing import (
    AdmissionQueue,
    Admitted,
    Hop,
    IwrrRouter,
    NodeStatus,
    NoRoute,
    NoRouteReason,
    Pipeline,
    Queued,
    Rejected,
    RejectReason,
    RouteGraph,
    RouteRequest,
    make_router,
)

BIG = 10**9


def loads_for(ids, free: int = BIG, **overrides: NodeStatus) -> dict[NodeId, NodeStatus]:
    out = {NodeId(i): NodeStatus(free, max(free, 1)) for i in ids}
    out.update({NodeId(k): v for k, v in overrides.items()})
    return out


def two_stage():
    """Stage 1 (layers 0-2): a (A100, 2 layers = 600 tokens/s) and b (L4, 2 layers = 300 tokens/s);
    stage 2 (layers 2-4): c (A100, 600) and t (T4, 2 layers = 120). Complete links, fast."""
    cluster = make_cluster([node("a", A100), node("b", L4), node("c", A100), node("t", T4)], num_layers=4)
    placement = {NodeId("a"): (0, 2), NodeId("b"): (0, 2), NodeId("c"): (2, 4), NodeId("t"): (2, 4)}
    return cluster, plan_from_placement(cluster, placement, method="test", solve_seconds=0.0)


def test_a_pipeline_is_a_list_of_peer_and_layer_range() -> None:
    cluster = make_cluster([node("a", A100), node("b", L4)], num_layers=4, links="chain")
    plan = plan_from_placement(
        cluster, {NodeId("a"): (0, 3), NodeId("b"): (3, 4)}, method="t", solve_seconds=0
    )
    router = IwrrRouter(RouteGraph(plan, cluster))
    pipeline = router.route(RouteRequest(100, 20), loads_for("ab"))
    assert isinstance(pipeline, Pipeline)
    assert pipeline.as_list() == [("a", (0, 3)), ("b", (3, 4))]
    assert pipeline.hops == (Hop(NodeId("a"), 0, 3), Hop(NodeId("b"), 3, 4))
    assert pipeline.kv_tokens == 120


def test_iwrr_long_run_split_matches_the_plans_flows() -> None:
    cluster, plan = two_stage()
    flows = {(f.src, f.dst): f.tokens_per_s for f in plan.flows}
    router = IwrrRouter(RouteGraph(plan, cluster), seed=5)
    rng = random.Random(2)
    counts: dict[tuple[str, str], float] = {}
    for _ in range(6000):
        request = RouteRequest(rng.randint(7, 2047), rng.randint(7, 1000))
        pipeline = router.route(request, loads_for("abct"))
        assert isinstance(pipeline, Pipeline)
        path = ["source", *pipeline.peers, "sink"]
        for edge in itertools.pairwise(path):
            counts[edge] = counts.get(edge, 0.0) + request.workload_tokens
    for vertex in ("source", "a", "b"):
        out = {e: v for e, v in flows.items() if e[0] == vertex}
        total_planned = sum(out.values())
        total_routed = sum(v for e, v in counts.items() if e[0] == vertex)
        for edge, planned in out.items():
            assert counts.get(edge, 0.0) / total_routed == pytest.approx(planned / total_planned, abs=0.01), (
                edge
            )
    # The split is also visible from the router itself.
    split = router.split("source")
    assert split["a"] == pytest.approx(flows[("source", "a")] / plan.objective_tokens_per_s, abs=0.01)


def test_edges_without_planned_flow_are_never_used_by_iwrr() -> None:
    # b -> t has capacity in the graph but the max flow puts nothing on it when t's 120 tokens/s
    # are all fed from a; whichever edges are empty, IWRR must not take them.
    cluster, plan = two_stage()
    empty = {(e[0], e[1]) for e in [("a", "c"), ("a", "t"), ("b", "c"), ("b", "t")]} - {
        (f.src, f.dst) for f in plan.flows if f.tokens_per_s > 0
    }
    router = IwrrRouter(RouteGraph(plan, cluster))
    for _ in range(500):
        pipeline = router.route(RouteRequest(50, 50), loads_for("abct"))
        assert isinstance(pipeline, Pipeline)
        assert (pipeline.peers[0], pipeline.peers[1]) not in empty


def test_a_hop_without_free_kv_is_skipped() -> None:
    cluster, plan = two_stage()
    router = IwrrRouter(RouteGraph(plan, cluster))
    loads = loads_for("abct", a=NodeStatus(free_kv_tokens=99, kv_budget_tokens=1000))
    for _ in range(50):
        pipeline = router.route(RouteRequest(60, 40), loads)  # needs 100 KV tokens per hop
        assert isinstance(pipeline, Pipeline) and pipeline.peers[0] == "b"


def test_backtracks_out_of_a_dead_end_and_charges_only_the_hops_taken() -> None:
    # a -> c and b -> t only; c is full, so every request must go b -> t even though IWRR would
    # pick a first (a has twice b's flow).
    cluster = make_cluster(
        [node("a", A100), node("b", L4), node("c", A100), node("t", L4)],
        num_layers=4,
        links=[("a", "c"), ("b", "t")],
    )
    placement = {NodeId("a"): (0, 2), NodeId("b"): (0, 2), NodeId("c"): (2, 4), NodeId("t"): (2, 4)}
    plan = plan_from_placement(cluster, placement, method="t", solve_seconds=0)
    router = IwrrRouter(RouteGraph(plan, cluster))
    loads = loads_for("abct", c=NodeStatus(0, 1000))
    for _ in range(5):
        pipeline = router.route(RouteRequest(10, 10), loads)
        assert isinstance(pipeline, Pipeline) and pipeline.peers == ("b", "t")
    assert router.split("source") == {"a": 0.0, "b": 1.0}


@pytest.mark.parametrize(
    ("loads", "reason"),
    [
        # a route exists but every first-stage node is full now
        (
            {
                "a": NodeStatus(10, 1000),
                "b": NodeStatus(10, 1000),
                "c": NodeStatus(BIG, BIG),
                "t": NodeStatus(BIG, BIG),
            },
            NoRouteReason.KV_FULL,
        ),
        # a route would have room but its nodes are still loading layers
        (
            {
                "a": NodeStatus(BIG, BIG, accepting=False),
                "b": NodeStatus(BIG, BIG, accepting=False),
                "c": NodeStatus(BIG, BIG),
                "t": NodeStatus(BIG, BIG),
            },
            NoRouteReason.NOT_READY,
        ),
        # even an empty cache is smaller than the request's context
        (
            {
                "a": NodeStatus(50, 50),
                "b": NodeStatus(50, 50),
                "c": NodeStatus(BIG, BIG),
                "t": NodeStatus(BIG, BIG),
            },
            NoRouteReason.TOO_LONG,
        ),
        # the second stage is gone
        ({"a": NodeStatus(BIG, BIG), "b": NodeStatus(BIG, BIG)}, NoRouteReason.NO_PATH),
    ],
)
def test_why_a_request_cannot_be_routed(loads, reason) -> None:
    cluster, plan = two_stage()
    for name in ("iwrr", "random", "shortest-queue", "swarm"):
        router = make_router(name, RouteGraph(plan, cluster))
        outcome = router.route(RouteRequest(60, 40), {NodeId(k): v for k, v in loads.items()})
        assert isinstance(outcome, NoRoute) and outcome.reason == reason, name
        assert outcome.detail


def test_partial_inference_hops_run_only_the_layers_still_missing() -> None:
    cluster = make_cluster([node("a", A100), node("b", A100)], num_layers=5, links="chain")
    plan = plan_from_placement(
        cluster,
        {NodeId("a"): (0, 3), NodeId("b"): (1, 5)},
        method="t",
        solve_seconds=0,
        partial_inference=True,
    )
    pipeline = IwrrRouter(RouteGraph(plan, cluster)).route(RouteRequest(5, 5), loads_for("ab"))
    assert isinstance(pipeline, Pipeline)
    assert pipeline.as_list() == [("a", (0, 3)), ("b", (3, 5))]


def test_routing_is_deterministic_for_a_seed() -> None:
    cluster, plan = two_stage()
    rng = random.Random(4)
    requests = [RouteRequest(rng.randint(1, 2000), rng.randint(1, 500)) for _ in range(300)]
    for name in ("iwrr", "random", "shortest-queue", "swarm"):
        runs = []
        for _ in range(2):
            router = make_router(name, RouteGraph(plan, cluster), seed=9)
            runs.append([router.route(r, loads_for("abct")).peers for r in requests])  # type: ignore[union-attr]
        assert runs[0] == runs[1], name


def test_a_graph_without_the_cluster_keeps_only_edges_with_flow() -> None:
    cluster, plan = two_stage()
    without = RouteGraph(plan)
    assert without.num_layers == 4
    for vertex, dsts in without.out_edges.items():
        assert all(w > 0 for w in without.planned_tokens_per_s[vertex]), (vertex, dsts)
    full = RouteGraph(plan, cluster)
    assert set(full.out_edges["a"]) == {"c", "t"}


def test_unknown_scheduler_is_a_clear_error() -> None:
    cluster, plan = two_stage()
    with pytest.raises(ValueError, match="unknown scheduler 'fastest'"):
        make_router("fastest", RouteGraph(plan, cluster))


# ------------------------------------------------------------------------------------ admission


def test_admission_waits_in_fifo_order_then_drains_as_kv_frees() -> None:
    cluster = make_cluster([node("a", A100)], num_layers=2)
    plan = plan_from_placement(cluster, {NodeId("a"): (0, 2)}, method="t", solve_seconds=0)
    queue: AdmissionQueue[str] = AdmissionQueue(IwrrRouter(RouteGraph(plan, cluster)), capacity=2)
    free = {"a": 150}

    def loads():
        return {NodeId("a"): NodeStatus(free["a"], 150)}

    first = queue.offer("r1", RouteRequest(50, 50), loads())
    assert isinstance(first, Admitted)
    free["a"] -= first.pipeline.kv_tokens
    assert queue.offer("r2", RouteRequest(50, 50), loads()) == Queued(0)
    assert queue.offer("r3", RouteRequest(10, 10), loads()) == Queued(1)  # would fit, but r2 is first
    rejected = queue.offer("r4", RouteRequest(10, 10), loads())
    assert isinstance(rejected, Rejected) and rejected.reason == RejectReason.QUEUE_FULL
    assert list(queue.drain(loads())) == []  # still no room: nothing moves
    free["a"] = 150  # r1 ended
    admitted = []
    for item, outcome in queue.drain(loads()):
        assert isinstance(outcome, Admitted)
        free["a"] -= outcome.pipeline.kv_tokens
        admitted.append(item)
    assert admitted == ["r2", "r3"] and len(queue) == 0


def test_admission_rejects_what_can_never_fit_without_queueing_it() -> None:
    cluster = make_cluster([node("a", A100)], num_layers=2)
    plan = plan_from_placement(cluster, {NodeId("a"): (0, 2)}, method="t", solve_seconds=0)
    queue: AdmissionQueue[str] = AdmissionQueue(IwrrRouter(RouteGraph(plan, cluster)), capacity=5)
    outcome = queue.offer("huge", RouteRequest(1000, 1000), {NodeId("a"): NodeStatus(150, 150)})
    assert isinstance(outcome, Rejected) and outcome.reason == RejectReason.TOO_LONG
    outcome = queue.offer("x", RouteRequest(1, 1), {})
    assert isinstance(outcome, Rejected) and outcome.reason == RejectReason.NO_PATH
    assert len(queue) == 0


def test_a_request_that_lost_its_route_goes_ahead_of_the_queue() -> None:
    cluster = make_cluster([node("a", A100)], num_layers=2)
    plan = plan_from_placement(cluster, {NodeId("a"): (0, 2)}, method="t", solve_seconds=0)
    queue: AdmissionQueue[str] = AdmissionQueue(IwrrRouter(RouteGraph(plan, cluster)), capacity=3)
    full = {NodeId("a"): NodeStatus(0, 150)}
    queue.offer("new", RouteRequest(10, 10), full)
    assert queue.offer("rerouted", RouteRequest(10, 10), full, front=True) == Queued(0)
    assert queue.waiting() == ["rerouted", "new"]
    drained = [item for item, _ in queue.drain({NodeId("a"): NodeStatus(150, 150)})]
    assert drained == ["rerouted", "new"]
    leftover = queue.reject_all(RejectReason.NO_PATH, "shutting down")
    assert leftover == []
