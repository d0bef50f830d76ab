"""Random-weight checkpoints of a real family, for tests, benchmarks and the demo.

A tiny model is made the way a real one ships: a `transformers` config of the family,
`save_pretrained` of the randomly initialised model (safetensors, sharded when asked), and a
byte-level BPE tokenizer trained here with the `tokenizers` library on a built-in text, saved so
that `AutoTokenizer.from_pretrained(out_dir)` works with no download. Everything downstream loads it
exactly as it would load a real model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from helix_p2p.shard.errors import ShardError, UnsupportedModelError
from helix_p2p.shard.families import FAMILIES
from helix_p2p.shard.memory import parse_dtype

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2: bos, eos, pad
#: 256 byte tokens and the special tokens are the smallest vocabulary a byte-level BPE can have
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# The tokenizer's training text: enough words for a few hundred merges.
CORPUS = """\
A swarm of volunteers pools its graphics cards to serve a large language model. Each node holds a
contiguous range of the model's layers, the first one also the embedding, the last one also the
final norm and the head that turns hidden states into the next token. Requests travel from node to
node along a pipeline chosen by weighted round robin over the flows of a plan, and the plan is the
placement with the largest flow from the clients to the model's last layer and back.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump! Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.
Once upon a time there was a small model that wanted to be as good as the whole model, and so it
was split into shards, and every shard gave exactly the same answer as the whole, token by token.
Numbers too: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096, and punctuation; (yes)!
def main(): return sum(x * x for x in range(10))  # code, now and then
"""


@dataclass(frozen=True)
class TinyModelSpec:
    """The shape of a random model. Defaults give a ~4-layer, 64-wide model in well under a second."""

    family: str = "llama"
    num_layers: int = 4
    hidden_size: int = 64
    num_heads: int = 4
    #: fewer than num_heads gives grouped-query attention
    num_kv_heads: int = 2
    #: None: 2 x hidden_size
    intermediate_size: int | None = None
    vocab_size: int = 320
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    #: Mistral: every layer; Qwen2: layers from `max_window_layers` on. None: full attention.
    sliding_window: int | None = None
    max_window_layers: int = 2
    #: a `rope_parameters` dict other than the default (e.g. llama3 scaling); None: the family's default
    rope_parameters: dict[str, Any] | None = None
    #: Llama only (Qwen2 always has q/k/v biases, Mistral none)
    attention_bias: bool = False
    #: std of the random weights (transformers' `initializer_range`)
    initializer_range: float = 0.02
    seed: int = 0
    dtype: str = "float32"
    #: e.g. "200KB": write a sharded checkpoint with model.safetensors.index.json
    max_shard_size: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UnsupportedModelError(
                f"family {self.family!r} is not supported (use one of: {', '.join(FAMILIES)})"
            )
        if min(self.num_layers, self.hidden_size, self.num_heads, self.num_kv_heads) < 1:
            raise ShardError("layers, hidden size, heads and kv heads must be >= 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ShardError(
                f"hidden size {self.hidden_size} must divide into {self.num_heads} heads, "
                f"and heads into {self.num_kv_heads} kv heads"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ShardError("head size (hidden / heads) must be even for rotary embeddings")
        if self.vocab_size < MIN_VOCAB:
            raise ShardError(
                f"vocab size must be >= {MIN_VOCAB} (256 bytes and {len(SPECIAL_TOKENS)} special tokens)"
            )
        parse_dtype(self.dtype)

    def config(self) -> PretrainedConfig:
        kwargs: dict[str, Any] = {
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.hidden_size // self.num_heads,
            "intermediate_size": self.intermediate_size or 2 * self.hidden_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
        }
        if self.rope_parameters is not None:
            kwargs["rope_parameters"] = dict(self.rope_parameters)
        if self.family == "llama":
            kwargs["attention_bias"] = self.attention_bias
        elif self.family == "mistral":
            kwargs["sliding_window"] = self.sliding_window
        elif self.family == "qwen2":
            kwargs["use_sliding_window"] = self.sliding_window is not None
            kwargs["sliding_window"] = self.sliding_window
            kwargs["max_window_layers"] = self.max_window_layers
        return AutoConfig.for_model(self.family, **kwargs)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with at most `vocab_size` tokens (fewer if the corpus runs out of merges),
    bos `<s>` added to every encoded text as Llama-style tokenizers do."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=2048,
    )


def make_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a random-weight checkpoint and its tokenizer to `out_dir`; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    config = spec.config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        # initialised directly in the stored dtype: a bf16 8B model never exists in fp32 here
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(spec.dtype))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per tiny checkpoint is noise in tests and demos
    try:
        if spec.max_shard_size:
            model.save_pretrained(out, max_shard_size=spec.max_shard_size)
        else:
            model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)
    return out
