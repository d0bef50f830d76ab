"""The node's parts on their own: configuration checks, the throughput file, its derived state,
session admission, and make-before-break loading of a real tiny checkpoint."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
from helix_p2p.node.config import (
    NodeConfig,
    NodeConfigError,
    PlannerOptions,
    default_model_id,
    read_throughput,
)
from helix_p2p.node.layers import LayerHost, ShardLoader
from helix_p2p.node.sessions import SessionGate
from helix_p2p.node.state import derive_state

from helix_p2p.swarm.records import NodeState

PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmNhSRP5Q6XgHLUr48Rmns1FDLUhEeoRYLhSM5AwRUWBf7"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from helix_p2p.shard import TinyModelSpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", TinyModelSpec(num_layers=8))


def config(**overrides) -> NodeConfig:
    return replace(NodeConfig(initial_peers=(PEER,), model="m", model_id="m"), **overrides)


# ------------------------------------------------------------------------------------------- config


def test_defaults_pass_and_timings_derive_from_the_ttl():
    c = config().check()
    assert c.refresh_period_s == 15.0 and c.poll_s == 7.5
    assert config(ttl_s=8).check().refresh_period_s == 2.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"initial_peers": ()}, "--initial-peers"),
        ({"swarm": "a/b"}, "--swarm"),
        ({"ttl_s": 0.0}, "--ttl-s"),
        ({"ttl_s": float("inf")}, "--ttl-s"),
        ({"refresh_s": 40.0}, "--refresh-s"),
        ({"max_layers": 0}, "--max-layers"),
        ({"port": 70000}, "--port"),
        ({"probe_bytes": 10}, "--probe-bytes"),
        ({"probe_peers": 100}, "--probe-peers"),
        ({"grace_s": -1.0}, "--grace-s"),
        ({"planner": PlannerOptions(min_gain=-0.5)}, "--replan-min-gain"),
        ({"planner": PlannerOptions(time_limit_s=0)}, "--planner-time-limit-s"),
        ({"public_name": "x" * 65}, "--public-name"),
        ({"planner": PlannerOptions(method="magic")}, "--planner-method"),
        ({"no_listen": True, "use_relay": False, "use_auto_relay": False}, "--no-listen"),
        ({"no_listen": True, "use_auto_relay": False}, "--no-auto-relay"),
    ],
)
def test_bad_settings_name_their_flag(overrides, message):
    with pytest.raises(NodeConfigError, match=message.replace("-", "\\-")):
        config(**overrides).check()


def test_throughput_files(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text("[300, 160.5, 110]")
    assert read_throughput(plain).tokens_per_s == (300.0, 160.5, 110.0)
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"gpu": "A100", "tokens_per_s": [900, 450]}))
    assert read_throughput(named).gpu == "A100"
    for text, message in [
        ("[]", "non-empty JSON list"),
        ("[1, -2]", "entry 1 must be a positive number"),
        ("[1, true]", "entry 1"),
        ('{"tokens_per_s": "fast"}', "non-empty JSON list"),
        ("[1,", "not valid JSON"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(NodeConfigError, match=message):
            read_throughput(bad)
    with pytest.raises(NodeConfigError, match="no such file"):
        read_throughput(tmp_path / "missing.json")


def test_model_id_defaults_to_the_folder_or_the_hub_id(tmp_path):
    (tmp_path / "my-model").mkdir()
    assert default_model_id(str(tmp_path / "my-model")) == "my-model"
    assert default_model_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


# -------------------------------------------------------------------------------- state and sessions


def test_state_follows_what_the_node_holds():
    assert derive_state(leaving=False, serving=False, loading=False, has_plan=False) == NodeState.JOINING
    assert derive_state(leaving=False, serving=False, loading=True, has_plan=True) == NodeState.LOADING
    assert derive_state(leaving=False, serving=True, loading=True, has_plan=True) == NodeState.SERVING
    assert derive_state(leaving=False, serving=False, loading=False, has_plan=True) == NodeState.STANDBY
    assert derive_state(leaving=True, serving=True, loading=False, has_plan=True) == NodeState.LEAVING


def test_leaving_stops_admissions_and_waits_for_running_sessions():
    async def scenario():
        gate = SessionGate()
        assert gate.admit() and gate.admit()
        gate.close()
        assert not gate.admit()
        asyncio.get_running_loop().call_later(0.05, gate.finish)
        assert await gate.drain(0.3) == 1  # one finished in time, the other is cut at the grace end
        gate.finish()
        assert await gate.drain(0.0) == 0
        with pytest.raises(RuntimeError):
            gate.finish()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------- layers


async def until(condition, what: str, timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class RecordingLoader:
    """The real shard loader, with a log of what happened in which order."""

    def __init__(self, inner: ShardLoader) -> None:
        self.inner = inner
        self.events: list[str] = []

    def load(self, start: int, end: int):
        self.events.append(f"load {start}-{end} begins")
        shard = self.inner.load(start, end)
        self.events.append(f"load {start}-{end} done")
        return shard

    def release(self, handle) -> None:
        self.events.append(f"release {handle.start}-{handle.end}")
        self.inner.release(handle)

    def free_kv_tokens(self, handle) -> int:
        return self.inner.free_kv_tokens(handle)


def test_layers_move_make_before_break(tiny_model):
    async def scenario():
        loader = RecordingLoader(ShardLoader(str(tiny_model), "cpu", "float32", memory_bytes=64 << 20))
        changes: list[tuple] = []
        host = LayerHost(loader, on_change=lambda: changes.append((host.served, host.loading)))
        runner = asyncio.create_task(host.run())

        async def settle(target):
            host.set_target(target)
            await until(lambda: host.served == target and host.loading is None, f"layers settled on {target}")

        await settle((0, 4))
        first = host.handle
        assert (first.start, first.end, first.holds_embedding) == (0, 4, True)
        assert host.free_kv_tokens() > 0
        await settle((4, 8))
        assert host.handle.holds_head
        # the old range is released on a worker thread after the switch: wait for it, then check
        # that it served until the new one was loaded, and was dropped only then
        await until(lambda: "release 0-4" in loader.events, "the old layers released")
        assert loader.events == [
            "load 0-4 begins",
            "load 0-4 done",
            "load 4-8 begins",
            "load 4-8 done",
            "release 0-4",
        ]
        assert ((0, 4), (4, 8)) in changes  # serving [0,4) while loading [4,8)
        await settle(None)
        await until(lambda: loader.events[-1] == "release 4-8", "the last layers released")
        assert host.handle is None
        runner.cancel()

    asyncio.run(scenario())


def test_a_failed_load_keeps_the_old_layers(tiny_model):
    async def scenario():
        host = LayerHost(
            ShardLoader(str(tiny_model), "cpu", "float32", memory_bytes=64 << 20), on_change=lambda: None
        )
        runner = asyncio.create_task(host.run())
        host.set_target((0, 2))
        await until(lambda: host.served == (0, 2), "layers [0, 2) served")
        host.set_target((6, 9))  # past the model's 8 layers: the shard library refuses it
        await until(lambda: host.failed is not None, "the load to fail")
        assert host.served == (0, 2) and host.loading is None
        assert "layers" in host.failed[1]
        runner.cancel()

    asyncio.run(scenario())


@pytest.mark.slow
def test_throughput_auto_profiles_the_device_once_then_reads_the_cache(tiny_model, tmp_path, monkeypatch):
    from helix_p2p.node.cli import profile_throughput

    monkeypatch.setenv("HELIX_P2P_CACHE_DIR", str(tmp_path))
    c = config(model=str(tiny_model), device="cpu", dtype="float32", max_memory_bytes=1 << 30)
    first = profile_throughput(c)
    assert len(first.tokens_per_s) == 8 and all(x > 0 for x in first.tokens_per_s)
    # more layers per token cost more time: the table falls
    assert list(first.tokens_per_s) == sorted(first.tokens_per_s, reverse=True)
    assert first.gpu.startswith("CPU")
    assert list(tmp_path.glob("profiles/*.json"))
    assert profile_throughput(c) == first
