"""Building a `Shard` from a checkpoint: the held layers made with the family's own `transformers`
classes on the meta device (no memory, no random weights), then filled with their checkpoint
tensors; the embedding where the shard holds layer 0, the final norm and LM head where it holds
the last (the embedding matrix when the model ties them)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from helix_p2p.progress import track
from helix_p2p.shard.api import ShardSpec
from helix_p2p.shard.errors import DeviceError, LayerRangeError, MissingTensorError, ShardSpecError
from helix_p2p.shard.families import (
    EMBEDDING_TENSOR,
    FINAL_NORM_TENSOR,
    LM_HEAD_TENSOR,
    check_supported,
    layer_prefix,
    tie_word_embeddings,
)
from helix_p2p.shard.loading import Checkpoint, open_checkpoint
from helix_p2p.shard.memory import parse_dtype
from helix_p2p.shard.runner import Shard

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`, checked against this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {device!r} is not a device name (use cpu, cuda or cuda:N)") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but CUDA is not available on this machine")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise DeviceError(
            f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


def load_shard(spec: ShardSpec, *, clock: Callable[[], float] = time.monotonic) -> Shard:
    """Build layers [spec.start, spec.end) of the checkpoint with the family's own `transformers`
    modules, reading only their tensors (and the embedding / final norm and head where held)."""
    device = resolve_device(spec.device)
    dtype = parse_dtype(spec.dtype)
    checkpoint = open_checkpoint(spec.model_path, attn_implementation=spec.attn_implementation)
    config = checkpoint.config
    family = check_supported(config)
    num_layers = int(config.num_hidden_layers)
    if not (
        isinstance(spec.start, int) and isinstance(spec.end, int) and 0 <= spec.start < spec.end <= num_layers
    ):
        raise LayerRangeError(
            f"{spec.model_path}: layers [{spec.start}, {spec.end}) are not a non-empty range of its {num_layers} layers"
        )
    if spec.max_chunk_tokens < 1 or spec.max_batch_tokens < spec.max_chunk_tokens:
        raise ShardSpecError("max_chunk_tokens must be >= 1 and max_batch_tokens >= max_chunk_tokens")
    if not spec.idle_timeout_s > 0 or (spec.max_kv_tokens is not None and spec.max_kv_tokens < 0):
        raise ShardSpecError("idle_timeout_s must be > 0 and max_kv_tokens >= 0 (or None)")
    if not spec.max_padding_ratio >= 1:
        raise ShardSpecError(f"max_padding_ratio must be >= 1, got {spec.max_padding_ratio}")

    layers = nn.ModuleList()
    span = range(spec.start, spec.end)
    for index in track(span, f"loading layers [{spec.start}, {spec.end})", len(span), unit="layer"):
        with torch.device("meta"):
            layer = family.decoder_layer(config, index)
        _assign(layer, checkpoint, layer_prefix(index), device, dtype)
        layers.append(layer)

    embed_tokens = None
    if spec.start == 0:
        with torch.device("meta"):
            embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        _assign(embed_tokens, checkpoint, EMBEDDING_TENSOR.removesuffix("weight"), device, dtype)

    norm = lm_head = None
    if spec.end == num_layers:
        with torch.device("meta"):
            norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
            lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        _assign(norm, checkpoint, FINAL_NORM_TENSOR.removesuffix("weight"), device, dtype)
        if tie_word_embeddings(config):
            if embed_tokens is not None:
                lm_head.weight = embed_tokens.weight
            else:
                _assign(lm_head, checkpoint, "", device, dtype, names={"weight": EMBEDDING_TENSOR})
        else:
            _assign(lm_head, checkpoint, LM_HEAD_TENSOR.removesuffix("weight"), device, dtype)

    rotary_emb = family.rotary_embedding(config=config).to(device)
    shard = Shard(spec, config, family, layers, embed_tokens, norm, lm_head, rotary_emb, device, dtype, clock)
    for module in (layers, embed_tokens, norm, lm_head, rotary_emb):
        if module is not None:
            module.eval().requires_grad_(False)
    logger.info(
        "loaded %s layers [%d, %d) of %d on %s as %s%s%s",
        spec.model_path, spec.start, spec.end, num_layers, device, dtype,
        " with embedding" if embed_tokens is not None else "", " with head" if lm_head is not None else "",
    )  # fmt: skip
    return shard


def _assign(
    module: nn.Module,
    checkpoint: Checkpoint,
    prefix: str,
    device: torch.device,
    dtype: torch.dtype,
    names: dict[str, str] | None = None,
) -> None:
    """Fill a module built on the meta device with its checkpoint tensors (every parameter and
    persistent buffer, shapes checked), so no random initial weights are ever allocated."""
    expected = {key: tensor.shape for key, tensor in module.state_dict().items()}
    names = names or {key: prefix + key for key in expected}
    loaded = checkpoint.load(names.values(), device=device, dtype=dtype)
    state = {}
    for key, shape in expected.items():
        tensor = loaded[names[key]]
        if tensor.shape != shape:
            raise MissingTensorError(
                f"{checkpoint.source}: tensor {names[key]!r} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}"
            )
        state[key] = tensor
    module.load_state_dict(state, strict=True, assign=True)
