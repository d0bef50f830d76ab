"""Tiny random checkpoints of each family, made once per test session through `make_tiny_model`
(the code path of `helix make-model`), and helpers to compare shards with the whole model.

Each family's model is chosen to exercise what that family brings:
- llama: grouped-query attention (4 heads, 2 kv heads), untied head, llama3 RoPE scaling;
- mistral: one kv head, a sliding window (8) shorter than the test sequences;
- qwen2: q/k/v biases, tied embeddings, sliding window on layers 2.., sharded checkpoint with an index.
The weights' std (0.1) makes next-token distributions peaked, so a wrong mask or position changes
the argmax instead of hiding in a near-uniform softmax."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from helix_p2p.shard import LocalChain, ShardSpec, TinyModelSpec, load_shard, make_tiny_model

FAMILY_SPECS: dict[str, TinyModelSpec] = {
    "llama": TinyModelSpec(
        family="llama",
        num_layers=5,
        initializer_range=0.1,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": TinyModelSpec(family="mistral", num_kv_heads=1, sliding_window=8, initializer_range=0.1),
    "qwen2": TinyModelSpec(
        family="qwen2",
        tie_embeddings=True,
        sliding_window=8,
        max_window_layers=2,
        initializer_range=0.1,
        max_shard_size="60KB",
    ),
}
FAMILIES = tuple(FAMILY_SPECS)
#: the issue's uneven split: [0, 1), [1, 3), [3, L)
SPLIT_POINTS = (1, 3)
FP32_TOLERANCE = 1e-5

hf_logging.disable_progress_bar()


@pytest.fixture(scope="session", name="tiny_model_dirs")
def tiny_model_dirs_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: make_tiny_model(root / family, spec) for family, spec in FAMILY_SPECS.items()}


def uneven_ranges(num_layers: int) -> list[tuple[int, int]]:
    bounds = (0, *SPLIT_POINTS, num_layers)
    return list(itertools.pairwise(bounds))


def load_chain(path: Path, **spec_kwargs: object) -> LocalChain:
    """The family's model at `path` as three shards on the uneven split."""
    num_layers = FAMILY_SPECS[path.name].num_layers
    return LocalChain(
        [load_shard(ShardSpec(str(path), a, b, **spec_kwargs)) for a, b in uneven_ranges(num_layers)]
    )


def whole_model(path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def whole_model_greedy(path: Path | str, text: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, the whole model's greedy continuation stopping at eos): what a swarm must match."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.encode(text)
    out = whole_model(Path(path)).generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return ids, out[0, len(ids) :].tolist()


def prompt(length: int, seed: int, vocab: int = 320) -> torch.Tensor:
    """Random token ids (beyond the 3 special tokens) of one prompt."""
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed))
