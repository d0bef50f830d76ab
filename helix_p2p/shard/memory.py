"""Memory accounting from the config alone: what k layers of a model cost in weights and KV cache,
and how many layers fit a memory budget. Nothing here loads a weight.

Weights are counted by instantiating one decoder layer of the family on the `meta` device (no
memory, exact parameter shapes), so biases, GQA and odd head sizes are counted as the model has
them rather than by a hand-written formula."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from helix_p2p.cluster import ModelShape
from helix_p2p.shard.errors import DeviceError
from helix_p2p.shard.families import check_supported, head_dim, num_key_value_heads

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"bf16"`, `"bfloat16"` or `torch.bfloat16` -> `torch.bfloat16`; other dtypes are refused."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise DeviceError(f"dtype {dtype!r} is not supported (use one of: float32, bfloat16, float16)")


def dtype_bytes(dtype: str | torch.dtype) -> int:
    return torch.empty((), dtype=parse_dtype(dtype)).element_size()


def parameters_per_layer(config: PretrainedConfig) -> int:
    """Parameters of one decoder layer (attention, MLP, both norms, biases if any)."""
    family = check_supported(config)
    with torch.device("meta"):
        layer = family.decoder_layer(config, 0)
    return sum(p.numel() for p in layer.parameters())


def bytes_per_layer(config: PretrainedConfig, dtype: str | torch.dtype) -> int:
    """Weight bytes of one decoder layer."""
    return parameters_per_layer(config) * dtype_bytes(dtype)


def embedding_bytes(config: PretrainedConfig, dtype: str | torch.dtype) -> int:
    """Weight bytes of the token embedding (held by the shard that holds layer 0)."""
    return config.vocab_size * config.hidden_size * dtype_bytes(dtype)


def head_bytes(config: PretrainedConfig, dtype: str | torch.dtype) -> int:
    """Weight bytes of the final norm and LM head (held by the shard that holds the last layer).
    With tied embeddings the head is still a full vocab x hidden matrix on that shard, since the
    shard holding the last layer usually does not hold the embedding."""
    return (config.vocab_size * config.hidden_size + config.hidden_size) * dtype_bytes(dtype)


def kv_bytes_per_token_per_layer(config: PretrainedConfig, dtype: str | torch.dtype) -> int:
    """Bytes of one token's keys and values in one layer."""
    return 2 * num_key_value_heads(config) * head_dim(config) * dtype_bytes(dtype)


def shard_weight_bytes(config: PretrainedConfig, dtype: str | torch.dtype, start: int, end: int) -> int:
    """Weight bytes of a shard holding layers [start, end), with the embedding if start == 0 and
    the head if end == num_layers. A shard holding both ends shares a tied matrix."""
    total = (end - start) * bytes_per_layer(config, dtype)
    if start == 0:
        total += embedding_bytes(config, dtype)
    if end == config.num_hidden_layers:
        total += head_bytes(config, dtype)
        if start == 0 and getattr(config, "tie_word_embeddings", False):
            total -= embedding_bytes(config, dtype)
    return total


def max_layers_for_budget(
    config: PretrainedConfig,
    dtype: str | torch.dtype,
    memory_bytes: float,
    *,
    kv_reserve_bytes: float = 0,
    kv_tokens_per_layer: int = 0,
    include_embedding: bool = False,
    include_head: bool = False,
) -> int:
    """The most layers (0 .. num_layers) that fit in `memory_bytes` once `kv_reserve_bytes` are set
    aside for the KV cache: their weights, `kv_tokens_per_layer` tokens of KV cache for each of
    them (a per-layer reservation, for callers who size KV in tokens), and the embedding and head
    if asked."""
    memory_bytes -= kv_reserve_bytes
    fixed = 0
    if include_embedding:
        fixed += embedding_bytes(config, dtype)
    if include_head:
        fixed += head_bytes(config, dtype)
    per_layer = bytes_per_layer(config, dtype) + kv_tokens_per_layer * kv_bytes_per_token_per_layer(
        config, dtype
    )
    if memory_bytes <= fixed:
        return 0
    return int(min(config.num_hidden_layers, (memory_bytes - fixed) // per_layer))


def token_bytes(config: PretrainedConfig) -> int:
    """Bytes of one token id on the wire: 2 while ids fit in 16 bits (as in Helix), else 4."""
    return 2 if config.vocab_size <= 1 << 16 else 4


def model_shape(config: PretrainedConfig, dtype: str | torch.dtype, name: str) -> ModelShape:
    """The planner's view of the model (`helix-cluster/1` "model")."""
    return ModelShape(
        name=name,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        activation_bytes=config.hidden_size * dtype_bytes(dtype),
        token_bytes=token_bytes(config),
    )
