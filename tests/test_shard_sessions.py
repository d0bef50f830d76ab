"""Sessions on a shard: every bad input refused with its named error before any tensor work,
idle timeout and close free the KV cache, rewinds, stop tokens, KV admission, sub-range sessions."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from shard_fixtures import FAMILY_SPECS, FP32_TOLERANCE, load_chain, prompt, tiny_model_dirs_fixture  # noqa: F401

from helix_p2p.errors import HelixError
from helix_p2p.shard import (
    BadStepError,
    KVCapacityError,
    LayersNotHeldError,
    LocalChain,
    SamplingError,
    SamplingParams,
    SessionClosedError,
    SessionExistsError,
    SessionLengthError,
    Shard,
    ShardSpec,
    StepRequest,
    UnknownSessionError,
    load_shard,
)

pytestmark = pytest.mark.timeout(60)
HIDDEN = FAMILY_SPECS["llama"].hidden_size
LAYERS = FAMILY_SPECS["llama"].num_layers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def llama(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture
def middle(llama: Path) -> Shard:
    """Layers [1, 3): takes and returns hidden states."""
    return load_shard(ShardSpec(str(llama), 1, 3, max_kv_tokens=100))


def hidden(n: int, dtype: torch.dtype = torch.float32, size: int = HIDDEN) -> torch.Tensor:
    return torch.randn(n, size, generator=torch.Generator().manual_seed(n)).to(dtype)


@pytest.mark.parametrize(
    ("request_", "error", "words"),
    [
        (StepRequest("s", hidden_states=hidden(3, size=HIDDEN + 1)), BadStepError, "hidden size 65"),
        (StepRequest("s", hidden_states=hidden(3, torch.float16)), BadStepError, "torch.float16"),
        (StepRequest("s", hidden_states=hidden(3)[None]), BadStepError, "[tokens, hidden]"),
        (StepRequest("s", hidden_states=hidden(0)), BadStepError, "at least one token"),
        (StepRequest("s", token_ids=torch.tensor([1, 2])), BadStepError, "send hidden_states"),
        (
            StepRequest("s", hidden_states=hidden(2), token_ids=torch.tensor([1])),
            BadStepError,
            "1 token ids for 2",
        ),
        (StepRequest("s", hidden_states=hidden(11)), SessionLengthError, "max_length 10"),
        (StepRequest("s", hidden_states=hidden(1), position=1), SessionLengthError, "gap"),
        (StepRequest("s", hidden_states=hidden(1), position=-1), SessionLengthError, ">= 0"),
        (StepRequest("nope", hidden_states=hidden(1)), UnknownSessionError, "'nope' is not open"),
        (StepRequest("s", hidden_states=hidden(1), layers=(0, 3)), LayersNotHeldError, "holds [1, 3)"),
        (StepRequest("s", hidden_states=hidden(1), layers=(3, 5)), LayersNotHeldError, "not held"),
        (StepRequest("s", hidden_states=hidden(1), layers=(1, 2)), BadStepError, "runs layers [1, 3)"),
        (StepRequest("s", hidden_states=hidden(1), return_logits=True), BadStepError, "logits"),
    ],
)
def test_bad_step_is_refused_by_name(middle: Shard, request_: StepRequest, error: type, words: str) -> None:
    middle.open_session("s", 10)
    with pytest.raises(error, match=None) as info:
        middle.step(request_)
    assert words in str(info.value)
    assert isinstance(info.value, HelixError)
    assert middle.session("s").length == 0, "a refused step changes nothing"


def test_first_shard_refuses_bad_token_ids(llama: Path) -> None:
    first = load_shard(ShardSpec(str(llama), 0, 1))
    first.open_session("s", 10)
    vocab = FAMILY_SPECS["llama"].vocab_size
    for bad, words in [
        (StepRequest("s", token_ids=torch.tensor([1, vocab])), f"[0, {vocab})"),
        (StepRequest("s", token_ids=torch.tensor([-1])), f"[0, {vocab})"),
        (StepRequest("s", token_ids=torch.tensor([1.0])), "int64"),
        (StepRequest("s", token_ids=torch.tensor([[1]])), "1-D"),
        (StepRequest("s", hidden_states=hidden(1)), "send token_ids"),
        (StepRequest("s"), "send token_ids"),
    ]:
        with pytest.raises(BadStepError, match=None) as info:
            first.step(bad)
        assert words in str(info.value)


def test_a_bad_request_stops_the_whole_batch_before_any_work(middle: Shard) -> None:
    middle.open_session("good", 10)
    middle.open_session("bad", 10)
    with pytest.raises(BadStepError):
        middle.step_batch(
            [
                StepRequest("good", hidden_states=hidden(2)),
                StepRequest("bad", hidden_states=hidden(2, torch.bfloat16)),
            ]
        )
    assert middle.session("good").length == 0
    with pytest.raises(BadStepError, match="twice"):
        middle.step_batch(
            [StepRequest("good", hidden_states=hidden(1)), StepRequest("good", hidden_states=hidden(1))]
        )
    middle.validate(StepRequest("good", hidden_states=hidden(2)))  # the node's per-request check
    assert middle.step_batch([]) == []
    with pytest.raises(BadStepError):
        middle.validate(StepRequest("bad", hidden_states=hidden(2, torch.bfloat16)))


def test_session_lifecycle_errors(middle: Shard) -> None:
    middle.open_session("s", 10)
    with pytest.raises(SessionExistsError):
        middle.open_session("s", 10)
    with pytest.raises(SessionLengthError):
        middle.open_session("t", 0)
    with pytest.raises(SessionLengthError):
        middle.open_session("t", 10**9)  # past max_position_embeddings
    with pytest.raises(LayersNotHeldError):
        middle.open_session("t", 10, layers=(0, 2))
    with pytest.raises(BadStepError):
        middle.open_session("", 10)
    with pytest.raises(KVCapacityError, match="90 free"):
        middle.open_session("t", 91)  # the cap is 100 positions, "s" holds 10
    middle.close_session("s")
    with pytest.raises(SessionClosedError, match="closed"):
        middle.step(StepRequest("s", hidden_states=hidden(1)))
    with pytest.raises(SessionClosedError):
        middle.close_session("s")
    with pytest.raises(UnknownSessionError):
        middle.close_session("never")
    middle.open_session("s", 100)  # the id can be reused, and the reservation was freed
    assert middle.free_kv_tokens == 0


def test_bad_sampling_parameters_are_refused() -> None:
    for kwargs in (
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"repetition_penalty": 0.0},
        {"stop_token_ids": (-3,)},
    ):
        with pytest.raises(SamplingError):
            SamplingParams(**kwargs)


def test_stop_token_outside_vocab_and_penalty_without_ids_are_refused(llama: Path) -> None:
    last = load_shard(ShardSpec(str(llama), 3, LAYERS))
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        last.open_session("s", 10, SamplingParams(stop_token_ids=(10**6,)))
    last.open_session("p", 10, SamplingParams(repetition_penalty=1.2))
    with pytest.raises(BadStepError, match="repetition penalty"):
        last.step(StepRequest("p", hidden_states=hidden(2)))


def test_idle_timeout_closes_sessions_and_frees_their_kv(llama: Path) -> None:
    clock = FakeClock()
    shard = load_shard(ShardSpec(str(llama), 1, 3, idle_timeout_s=30.0, max_kv_tokens=64), clock=clock)
    shard.open_session("idle", 32)
    shard.open_session("busy", 32)
    keys = weakref.ref(shard._table.get("idle").kv.keys)  # the KV tensor itself must be released
    assert (
        shard.session("idle").kv_bytes == 2 * 2 * 2 * 32 * 16 * 4
    )  # k+v, 2 layers, 2 kv heads, 32 pos, 16 dims
    clock.now += 20
    shard.step(StepRequest("busy", hidden_states=hidden(1)))
    clock.now += 20  # idle for 40 s, busy for 20 s
    assert shard.expire_idle() == ["idle"]
    gc.collect()
    assert keys() is None
    assert shard.reserved_kv_tokens == 32 and shard.free_kv_tokens == 32
    with pytest.raises(SessionClosedError, match="expired after 30 s idle"):
        shard.step(StepRequest("idle", hidden_states=hidden(1)))
    clock.now += 31  # steps and opens expire idle sessions themselves; no caller has to remember
    with pytest.raises(SessionClosedError):
        shard.step(StepRequest("busy", hidden_states=hidden(1)))
    assert shard.sessions() == []


def test_rewind_recomputes_from_an_earlier_position(tiny_model_dirs: dict[str, Path]) -> None:
    chain = load_chain(tiny_model_dirs["llama"])
    chain.open_session("s", 32)
    ids = prompt(10, seed=8)
    first = chain.step("s", ids, return_logits=True)
    chain.step("s", torch.tensor([5]))
    # replay positions 6..9 (a client recovering a hop replays the session's tokens)
    results = chain.shards[0].step(StepRequest("s", token_ids=ids[6:], position=6))
    results = chain.shards[1].step(StepRequest("s", hidden_states=results.hidden_states, position=6))
    again = chain.shards[2].step(
        StepRequest("s", hidden_states=results.hidden_states, position=6, return_logits=True)
    )
    torch.testing.assert_close(again.logits, first.logits[6:], rtol=0, atol=FP32_TOLERANCE)
    assert chain.shards[2].session("s").length == 10


def test_stop_token_and_full_session_finish(tiny_model_dirs: dict[str, Path]) -> None:
    chain = load_chain(tiny_model_dirs["llama"])
    ids = prompt(6, seed=9).tolist()
    free = chain.generate(ids, 8, session_id="free")
    stop = free[3]
    stopped = chain.generate(ids, 8, SamplingParams(stop_token_ids=(stop,)), session_id="stopped")
    assert stopped == free[: free.index(stop) + 1]
    chain.open_session("full", 7)
    assert not chain.step("full", torch.tensor(ids)).finished
    assert chain.step("full", torch.tensor([1])).finished  # 7 positions used: no room for the next token


def test_sub_range_session_runs_only_its_layers(tiny_model_dirs: dict[str, Path]) -> None:
    """Partial inference: a shard holding [1, 3) serves a session for [2, 3) only; chaining
    [0, 2) of another shard with it equals the full [1, 3) path."""
    path = tiny_model_dirs["llama"]
    chain = load_chain(path)
    first_two = load_shard(ShardSpec(str(path), 0, 2))
    middle, last = chain.shards[1], chain.shards[2]
    ids = prompt(8, seed=12)
    chain.open_session("full", 16)
    want = chain.step("full", ids, return_logits=True)
    first_two.open_session("p", 16)
    middle.open_session("p", 16, layers=(2, 3))
    last.open_session("p", 16)
    h = first_two.step(StepRequest("p", token_ids=ids)).hidden_states
    h = middle.step(StepRequest("p", hidden_states=h, layers=(2, 3))).hidden_states
    got = last.step(StepRequest("p", hidden_states=h, return_logits=True))
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=FP32_TOLERANCE)
    assert middle.session("p").kv_bytes * 2 == middle.session("full").kv_bytes


def test_local_chain_refuses_shards_that_do_not_tile(llama: Path) -> None:
    from helix_p2p.shard import LayerRangeError

    a, b = load_shard(ShardSpec(str(llama), 0, 2)), load_shard(ShardSpec(str(llama), 3, LAYERS))
    with pytest.raises(LayerRangeError, match="starting at 2"):
        LocalChain([a, b])
    with pytest.raises(LayerRangeError, match="end at layer 2"):
        LocalChain([a])
