"""A model split into uneven shards gives what the whole `transformers` model gives: the same
logits (fp32, 1e-5) for a prompt and 20 decode steps, the same greedy tokens as `generate`, the
same tokens as `generate(do_sample=True)` under the same seed, and the same results for a session
whether it runs alone or batched beside sessions of other lengths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shard_fixtures import (  # noqa: F401 (a fixture)
    FAMILIES,
    FAMILY_SPECS,
    FP32_TOLERANCE,
    load_chain,
    prompt,
    tiny_model_dirs_fixture,
    whole_model,
)
from transformers import DynamicCache

from helix_p2p.shard import LocalChain, SamplingParams, ShardSpec, load_shard

pytestmark = pytest.mark.timeout(120)
DECODE_STEPS = 20


@pytest.mark.parametrize("family", FAMILIES)
def test_split_logits_match_whole_model_for_prompt_and_decode(
    family: str, tiny_model_dirs: dict[str, Path]
) -> None:
    path = tiny_model_dirs[family]
    whole = whole_model(path)
    chain = load_chain(path)
    ids = prompt(12, seed=1)
    chain.open_session("s", 64)
    with torch.no_grad():
        cache = DynamicCache(config=whole.config)
        expected = whole(ids[None], past_key_values=cache, use_cache=True).logits[0]
    result = chain.step("s", ids, return_logits=True)
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=FP32_TOLERANCE)
    assert result.token_id == int(expected[-1].argmax())
    token = result.token_id
    for _ in range(DECODE_STEPS):
        with torch.no_grad():
            expected = whole(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0]
        result = chain.step("s", torch.tensor([token]), return_logits=True)
        torch.testing.assert_close(result.logits, expected, rtol=0, atol=FP32_TOLERANCE)
        assert result.token_id == int(expected[-1].argmax())
        token = result.token_id
    # 12 + 20 positions: past the sliding window (8) of mistral and qwen2
    assert chain.shards[-1].session("s").length == 12 + DECODE_STEPS


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_generate(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    path = tiny_model_dirs[family]
    whole = whole_model(path)
    chain = load_chain(path)
    for seed, length in ((2, 5), (3, 19)):
        ids = prompt(length, seed)
        expected = whole.generate(ids[None], max_new_tokens=DECODE_STEPS, do_sample=False, eos_token_id=None)
        assert chain.generate(ids.tolist(), DECODE_STEPS) == expected[0, length:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_equals_generate_with_the_same_seed(
    family: str, tiny_model_dirs: dict[str, Path]
) -> None:
    path = tiny_model_dirs[family]
    whole = whole_model(path)
    chain = load_chain(path)
    ids = prompt(7, seed=4)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3, seed=11)
    ours = chain.generate(ids.tolist(), DECODE_STEPS, params)
    assert ours == chain.generate(ids.tolist(), DECODE_STEPS, params), "same seed, same tokens"
    assert ours != chain.generate(ids.tolist(), DECODE_STEPS, SamplingParams(temperature=0.8, seed=12))
    torch.manual_seed(params.seed)
    expected = whole.generate(
        ids[None], max_new_tokens=DECODE_STEPS, do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
        repetition_penalty=1.3, eos_token_id=None,
    )  # fmt: skip
    assert ours == expected[0, len(ids) :].tolist()


@pytest.mark.parametrize("padding", ["default", "one-forward"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_sessions_of_different_lengths_equal_each_alone(
    family: str, padding: str, tiny_model_dirs: dict[str, Path]
) -> None:
    """4 sessions with prompts of 5, 17, 1 and 30 tokens prefill in one batch and decode together;
    a fifth joins mid-way with its prompt while the others decode (continuous batching), and one
    samples with a seed. Each gets the logits and tokens it gets alone. "one-forward" lets any
    padding happen, so every step is a single forward of ragged, padded rows."""
    ratio = 1.25 if padding == "default" else 1000.0
    chain = load_chain(tiny_model_dirs[family], max_padding_ratio=ratio)
    prompts = [prompt(n, seed=10 + n) for n in (5, 17, 1, 30, 9)]
    sampling = [None, None, SamplingParams(temperature=1.0, seed=3), None, None]

    def alone(i: int) -> tuple[list[torch.Tensor], list[int]]:
        chain.open_session(f"alone{i}", 64, sampling[i])
        result = chain.step(f"alone{i}", prompts[i], return_logits=True)
        logits, tokens = [result.logits], [result.token_id]
        for _ in range(6):
            result = chain.step(f"alone{i}", torch.tensor([tokens[-1]]), return_logits=True)
            logits.append(result.logits)
            tokens.append(result.token_id)
        chain.close_session(f"alone{i}")
        return logits, tokens

    expected = [alone(i) for i in range(5)]
    for i in range(5):
        chain.open_session(f"b{i}", 64, sampling[i])
    logits: list[list[torch.Tensor]] = [[] for _ in range(5)]
    tokens: list[list[int]] = [[] for _ in range(5)]
    for step in range(7):
        batch = []
        for i in range(4):
            batch.append((f"b{i}", prompts[i] if step == 0 else torch.tensor([tokens[i][-1]])))
        if step >= 3:  # the late session: prompt at step 3, then decodes beside the others
            batch.append(("b4", prompts[4] if step == 3 else torch.tensor([tokens[4][-1]])))
        for (sid, _), result in zip(batch, chain.step_batch(batch, return_logits=True)):
            i = int(sid[1:])
            logits[i].append(result.logits)
            tokens[i].append(result.token_id)
    for i in range(4):
        assert tokens[i] == expected[i][1]
        for got, want in zip(logits[i], expected[i][0]):
            torch.testing.assert_close(got, want, rtol=0, atol=FP32_TOLERANCE)
    assert tokens[4] == expected[4][1][:4]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_forward(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    path = tiny_model_dirs[family]
    whole_chain = load_chain(path)
    chunked = load_chain(path, max_chunk_tokens=4, max_batch_tokens=8)
    ids = prompt(23, seed=5)
    for chain in (whole_chain, chunked):
        chain.open_session("s", 64)
    want = whole_chain.step("s", ids, return_logits=True)
    got = chunked.step("s", ids, return_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=FP32_TOLERANCE)
    assert got.token_id == want.token_id
    assert chunked.shards[1].session("s").length == 23


def test_one_shard_holding_everything_equals_the_chain(tiny_model_dirs: dict[str, Path]) -> None:
    path = tiny_model_dirs["qwen2"]
    single = LocalChain([load_shard(ShardSpec(str(path), 0, FAMILY_SPECS["qwen2"].num_layers))])
    # with tied embeddings, one shard holding both ends shares one matrix
    assert single.shards[0].lm_head.weight is single.shards[0].embed_tokens.weight
    ids = prompt(9, seed=6).tolist()
    assert single.generate(ids, 10) == load_chain(path).generate(ids, 10)


def test_eager_attention_equals_sdpa(tiny_model_dirs: dict[str, Path]) -> None:
    path = tiny_model_dirs["mistral"]
    sdpa, eager = load_chain(path), load_chain(path, attn_implementation="eager")
    ids = prompt(14, seed=7)
    for chain in (sdpa, eager):
        chain.open_session("s", 32)
    want = sdpa.step("s", ids, return_logits=True)
    got = eager.step("s", ids, return_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=FP32_TOLERANCE)
    for _ in range(10):  # past the window: eager needs the sliding mask on single-token steps too
        want = sdpa.step("s", torch.tensor([want.token_id]), return_logits=True)
        got = eager.step("s", torch.tensor([got.token_id]), return_logits=True)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=FP32_TOLERANCE)
