"""The simulator's inputs: GPU profiles (interpolation, limits, KV budgets), trace sampling the way
Helix does it, and churn files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import bundled_cluster

from helix_p2p.sim import (
    ChurnError,
    LatencyCurve,
    LengthSampler,
    ProfileError,
    TraceError,
    load_lengths,
    load_profile,
    online_arrivals,
    parse_churn,
    profiles_for,
    read_churn,
)


def test_latency_curve_interpolates_and_clamps() -> None:
    curve = LatencyCurve.from_points([(0, 0), (2, 7.1), (4, 7.2), (10, 10.2)], unit_s=1e-3)
    assert curve(0) == 0.0
    assert curve(1) == pytest.approx(0.0071)  # below the first point: that point's time
    assert curve(3) == pytest.approx(0.00715)
    assert curve(7) == pytest.approx(0.0087)
    assert curve(16) == pytest.approx(0.0132)  # the last segment extended
    with pytest.raises(ValueError):
        LatencyCurve((2.0, 1.0), (1.0, 2.0))


def test_bundled_profile_a100_llama70b() -> None:
    profile = load_profile("llama-2-70b", "A100")
    # decode_bs2time.csv: 2 -> 1.4 ms; prompt_bs2time.csv: 250 -> 2 ms, 500 -> 4 ms (per layer)
    assert profile.decode_layer_s(2) == pytest.approx(0.0014)
    assert profile.prompt_layer_s(375) == pytest.approx(0.003)
    assert profile.max_layers == 12
    limits = profile.limits_for(12)
    assert limits.kv_tokens == 16 * 17591  # vLLM blocks of 16 tokens
    assert (limits.prompt_max_requests, limits.prompt_max_tokens) == (3, 6144)
    assert (limits.decode_max_sequences, limits.decode_max_context_tokens) == (300, 300_000)
    # 1.53e9 bytes per layer from a 1e9 B/s disk
    assert profile.load_s_per_layer == pytest.approx(1.53)
    with pytest.raises(ProfileError):
        profile.limits_for(13)


def test_every_bundled_cluster_has_profiles() -> None:
    for name in ("single24-llama70b", "single24-llama30b", "cluster10-llama30b"):
        cluster = bundled_cluster(name)
        profiles = profiles_for(cluster)
        assert set(profiles) == {n.id for n in cluster.nodes}
        for spec in cluster.nodes:
            assert profiles[spec.id].max_layers >= spec.max_layers


def test_unknown_gpu_is_a_profile_error() -> None:
    with pytest.raises(ProfileError, match="H100"):
        load_profile("llama-2-70b", "H100")


def test_lengths_are_the_azure_trace() -> None:
    pairs = load_lengths()
    assert len(pairs) == 16657
    assert sum(a for a, _ in pairs) / len(pairs) == pytest.approx(763.0785, abs=1e-4)
    sampler = LengthSampler(pairs, seed=1)
    draws = [sampler.draw() for _ in range(5)]
    assert draws == [LengthSampler(pairs, seed=1).draw() for _ in range(1)] + draws[1:]
    assert draws != [LengthSampler(pairs, seed=2).draw() for _ in range(5)]


def test_online_arrivals_hit_the_target_rate() -> None:
    arrivals = online_arrivals(2000.0, 3600.0, seed=0)
    tokens = sum(a.prompt_tokens + a.output_tokens for a in arrivals)
    assert tokens / 3600.0 == pytest.approx(2000.0, rel=0.05)
    times = [a.arrival_s for a in arrivals]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 3600.0
    # bursty like the trace, not a constant stream: per-3-s counts vary
    per_bucket = [0] * 1200
    for t in times:
        per_bucket[int(t // 3)] += 1
    assert max(per_bucket) > 2 * (sum(per_bucket) / 1200)
    assert online_arrivals(2000.0, 60.0, seed=4) == online_arrivals(2000.0, 60.0, seed=4)
    with pytest.raises(TraceError):
        online_arrivals(0.0, 60.0)


def test_churn_file_round_trip_and_errors(tmp_path: Path) -> None:
    doc = {
        "format": "helix-churn/1",
        "events": [{"time_s": 30, "join": ["b"]}, {"time_s": 10, "leave": ["a"]}],
        "initially_absent": ["b"],
        "replan": {"method": "swarm", "time_limit_s": 5},
        "load_s_per_layer": 0.25,
    }
    path = tmp_path / "churn.json"
    path.write_text(json.dumps(doc))
    schedule = read_churn(path)
    assert [e.time_s for e in schedule.events] == [10.0, 30.0]  # sorted by time
    assert schedule.initially_absent == ("b",) and schedule.replan_method == "swarm"
    assert schedule.replan_time_limit_s == 5.0 and schedule.load_s_per_layer == 0.25
    for bad, words in [
        ({**doc, "format": "helix-churn/2"}, "format"),
        ({**doc, "events": [{"time_s": -1, "leave": ["a"]}]}, "time_s"),
        ({**doc, "events": [{"time_s": 1}]}, "neither"),
        ({**doc, "events": [{"time_s": 1, "leave": "a"}]}, "leave"),
        ({**doc, "events": [{"time_s": 1, "leave": ["a"], "when": 3}]}, "unknown"),
    ]:
        with pytest.raises(ChurnError, match=words):
            parse_churn(bad)
    with pytest.raises(ChurnError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        read_churn(tmp_path / "bad.json")
    with pytest.raises(ChurnError, match="cannot read"):
        read_churn(tmp_path / "missing.json")
