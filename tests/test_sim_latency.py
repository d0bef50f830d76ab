"""Latencies worked out by hand on one- and two-node clusters.

Units chosen so the arithmetic is easy: `token_bytes` = 2 and `activation_bytes` = 1000; every link
has 1 ms latency; per layer a prompt batch of t tokens takes t/10,000 s (10 ms per 100 tokens) and a
decode batch takes 5 ms whatever its size (profiles below)."""

from __future__ import annotations

import pytest
from builders import A100, make_cluster, node

from helix_p2p.cluster import NodeId
from helix_p2p.planner import plan_from_placement
from helix_p2p.sim import BatchLimits, GpuProfile, LatencyCurve, RequestSpec, SimConfig, simulate

LAT = 0.001  # every link's latency


def profile(max_layers: int = 6, kv_tokens: int = 100_000) -> GpuProfile:
    limits = BatchLimits(
        prompt_max_requests=4,
        prompt_max_tokens=100_000,
        decode_max_sequences=64,
        decode_max_context_tokens=10**9,
        kv_tokens=kv_tokens,
    )
    return GpuProfile(
        model="test-model",
        gpu="A100",
        prompt_layer_s=LatencyCurve((100.0, 1000.0), (0.01, 0.1)),
        decode_layer_s=LatencyCurve((1.0, 1000.0), (0.005, 0.005)),
        limits=(limits,) * max_layers,
    )


def run(cluster, placement, arrivals, **config):
    plan = plan_from_placement(cluster, placement, method="hand", solve_seconds=0)
    cfg = SimConfig(
        mode="online",
        arrivals=tuple(arrivals),
        duration_s=10.0,
        warmup_s=0.0,
        drain=True,
        **config,
    )
    return simulate(cluster, plan, cfg, profiles={n.id: profile() for n in cluster.nodes})


def test_one_node_by_hand() -> None:
    # Client links of 1000 tokens/s = 2000 B/s. Prompt of 100 tokens, 3 output tokens.
    cluster = make_cluster([node("a", A100)], num_layers=2, coordinator_tokens_per_s=1000)
    result = run(cluster, {NodeId("a"): (0, 2)}, [RequestSpec(0.0, 100, 3)])
    # prompt step: 200 B / 2000 B/s + 1 ms  = 0.101 in
    #              2 layers * 100 tokens / 10,000 = 0.020 compute
    #              2 B / 2000 B/s + 1 ms = 0.002 out           -> first token at 0.123
    assert result.prompt_latency_s.mean == pytest.approx(0.123)
    # decode step: 0.002 in + 2 * 0.005 compute + 0.002 out = 0.014, twice (3 tokens = prompt + 2)
    assert result.decode_latency_s.count == 2
    assert result.decode_latency_s.mean == pytest.approx(0.014)
    assert result.decode_latency_s.p95 == pytest.approx(0.014)
    assert result.completed == 1 and result.end_s == pytest.approx(10.0)
    assert result.decode_tokens_per_s == pytest.approx(2 / 10.0)


def test_two_nodes_by_hand() -> None:
    # a holds layer 0, b layer 1; a -> b carries 500 tokens/s of activations = 500,000 B/s.
    cluster = make_cluster(
        [node("a", A100), node("b", A100)],
        num_layers=2,
        links="chain",
        link_tokens_per_s=500,
        coordinator_tokens_per_s=1000,
    )
    result = run(cluster, {NodeId("a"): (0, 1), NodeId("b"): (1, 2)}, [RequestSpec(0.0, 100, 2)])
    # prompt: 0.101 to a, 0.010 on a, 100 * 1000 B / 500,000 B/s + 1 ms = 0.201 to b, 0.010 on b,
    #         0.002 to the client                                            -> 0.324
    assert result.prompt_latency_s.mean == pytest.approx(0.324)
    # decode: 0.002 + 0.005 + (1000 B / 500,000 + 0.001 = 0.003) + 0.005 + 0.002 = 0.017
    assert result.decode_latency_s.mean == pytest.approx(0.017)
    carried = {(e.src, e.dst): e.carried_tokens_per_s for e in result.edges}
    # every edge carried the prompt (100 tokens) and one decode token, over the 10 s window
    assert carried[("source", "a")] == pytest.approx(10.1)
    assert carried[("a", "b")] == pytest.approx(10.1)
    assert carried[("b", "sink")] == pytest.approx(10.1)


def test_a_link_sends_one_message_at_a_time() -> None:
    # Two prompts leave the client at t=0 over the same 2000 B/s link: the second waits 0.1 s.
    cluster = make_cluster([node("a", A100)], num_layers=2, coordinator_tokens_per_s=1000)
    result = run(cluster, {NodeId("a"): (0, 2)}, [RequestSpec(0.0, 100, 1), RequestSpec(0.0, 100, 1)])
    # first: 0.123 as above; second reaches a at 0.201, computes to 0.221, and its token is sent
    # right after the first's (the a -> client link is idle by then): 0.223
    assert result.prompt_latency_s.mean == pytest.approx((0.123 + 0.223) / 2)
    assert result.prompt_latency_s.p95 == pytest.approx(0.123 + 0.95 * (0.223 - 0.123))


def test_prompts_waiting_for_a_busy_node_run_together_in_one_batch() -> None:
    # Fast client links (1e6 tokens/s: 100 tokens in 0.1 ms). r0 arrives at 0; r1 and r2 at 5 ms,
    # while a still computes r0's prompt (until 0.0011 + 0.020 = 0.0211).
    cluster = make_cluster([node("a", A100)], num_layers=2, coordinator_tokens_per_s=1e6)
    arrivals = [RequestSpec(0.0, 100, 2), RequestSpec(0.005, 100, 1), RequestSpec(0.005, 100, 1)]
    result = run(cluster, {NodeId("a"): (0, 2)}, arrivals)
    # r1 and r2 then run as one batch of 200 prompt tokens: 2 layers * 0.020 = 0.040, done at 0.0611;
    # both tokens travel in one 4-byte message: 0.0611 + 0.000002 + 0.001 = 0.062102
    r0 = 0.0001 + LAT + 0.020 + 0.000001 + LAT
    r12 = 0.0611 + 4 / 2e6 + LAT - 0.005
    assert result.prompt_latency_s.count == 3
    assert result.prompt_latency_s.mean == pytest.approx((r0 + 2 * r12) / 3)
    # r0's decode step reached a at 0.0221 + 0.001001 and waited for that batch: it runs 0.0611 to
    # 0.0711 and its token is back at 0.0711 + 0.000001 + 0.001
    decode = 0.0711 + 0.000001 + LAT - (r0)
    assert result.decode_latency_s.mean == pytest.approx(decode)


def test_partial_inference_runs_only_the_missing_layers() -> None:
    # a holds [0, 3), b holds [1, 5): a request runs 0-2 on a and only 3-4 on b.
    cluster = make_cluster(
        [node("a", A100), node("b", A100)], num_layers=5, links="chain", coordinator_tokens_per_s=1000
    )
    plan = plan_from_placement(
        cluster,
        {NodeId("a"): (0, 3), NodeId("b"): (1, 5)},
        method="hand",
        solve_seconds=0,
        partial_inference=True,
    )
    config = SimConfig(
        mode="online", arrivals=(RequestSpec(0.0, 100, 2),), duration_s=10.0, warmup_s=0.0, drain=True
    )
    result = simulate(cluster, plan, config, profiles={n.id: profile() for n in cluster.nodes})
    # a -> b is the default fast link (1e6 tokens/s): 100 tokens * 1000 B / 1e9 B/s = 0.0001 s + 1 ms
    # decode: 0.002 in + 3 * 0.005 on a + (0.000001 + 0.001) + 2 * 0.005 on b + 0.002 out
    assert result.decode_latency_s.mean == pytest.approx(0.002 + 0.015 + 0.001001 + 0.010 + 0.002)
    # prompt: 0.101 + 3 * 0.010 + 0.0011 + 2 * 0.010 + 0.002
    assert result.prompt_latency_s.mean == pytest.approx(0.101 + 0.030 + 0.0011 + 0.020 + 0.002)
