"""The model families a shard can run, and what each family's config says about its layers.

A family is the set of `transformers` module classes that build its decoder layer, final norm and
rotary embedding; the shard instantiates those classes directly (no copied layer code). Llama,
Mistral and Qwen2 share the checkpoint naming below, which is why one loader serves all three."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import transformers
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from helix_p2p.shard.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """The `transformers` classes that make up one family's model."""

    model_type: str
    decoder_layer: type[nn.Module]
    norm: type[nn.Module]
    rotary_embedding: type[nn.Module]


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding),
    "mistral": Family("mistral", MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding),
    "qwen2": Family("qwen2", Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding),
}

#: Attention kernels the shard can drive with its own explicit 4D masks. Flash-attention kernels
#: take no such mask (they want packed sequences), so they are not offered.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")

# Checkpoint tensor names shared by the supported families (their `*ForCausalLM` layout).
EMBEDDING_TENSOR = "model.embed_tokens.weight"
FINAL_NORM_TENSOR = "model.norm.weight"
LM_HEAD_TENSOR = "lm_head.weight"


def layer_prefix(layer_index: int) -> str:
    """The checkpoint name prefix of decoder layer `layer_index` (global index)."""
    return f"model.layers.{layer_index}."


def family_of(config: PretrainedConfig) -> Family:
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise UnsupportedModelError(
            f"model family {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    return family


#: The decoder layers' calling convention the runner relies on (position_embeddings passed in, a
#: tensor returned, the cache's `update(k, v, layer_idx)`) is that of transformers 5.
MIN_TRANSFORMERS_MAJOR = 5


def check_supported(config: PretrainedConfig) -> Family:
    """The family of `config`, after refusing settings the shard cannot reproduce exactly."""
    major = int(transformers.__version__.split(".")[0])
    if major < MIN_TRANSFORMERS_MAJOR:
        raise UnsupportedModelError(
            f"transformers {transformers.__version__} is installed; shards need transformers >= {MIN_TRANSFORMERS_MAJOR}"
        )
    family = family_of(config)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{family.model_type}: encoder-decoder configs are not supported")
    heads = config.num_attention_heads
    kv_heads = num_key_value_heads(config)
    if heads % kv_heads:
        raise UnsupportedModelError(
            f"{family.model_type}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    return family


def num_key_value_heads(config: PretrainedConfig) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def head_dim(config: PretrainedConfig) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def sliding_window_of_layer(config: PretrainedConfig, layer_index: int) -> int | None:
    """The attention window of one layer in tokens, None for full causal attention.

    Configs with `layer_types` (Qwen2) say per layer; Mistral's `sliding_window` applies to every
    layer; Llama has none. The mask the shard builds must match what the family's own model builds,
    because the attention kernels see only the mask (they ignore the window argument)."""
    layer_types: Any = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return int(window) if layer_types[layer_index] == "sliding_attention" and window else None
    return int(window) if window else None


def tie_word_embeddings(config: PretrainedConfig) -> bool:
    """Whether the LM head reuses the embedding matrix (then the checkpoint has no lm_head tensor)."""
    return bool(getattr(config, "tie_word_embeddings", False))
