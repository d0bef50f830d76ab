"""Model shards: layers [start, end) of a Hugging Face causal LM, run exactly as the whole model
runs them, for many sessions at once (`Shard`), plus what a node needs around them: memory
accounting from the config (`memory`), a device profiler (`profile`), and a tiny-model maker for
tests and demos (`tiny`). One module per idea: `api` (the records that cross the boundary), `families`
(which transformers classes), `loading` (safetensors range reads), `build` (a Shard from a
checkpoint), `sessions`, `kv_cache`, `runner` (validation, batching, forwards), `sampling`, `chain`
(shards in one process).

    shard = load_shard(ShardSpec("path/to/model", start=0, end=8))
    shard.open_session("s1", max_length=1024)
    result = shard.step(StepRequest("s1", token_ids=torch.tensor([1, 2, 3])))
    result.hidden_states  # [3, hidden], for the shard holding layers [8, ...)
"""

import importlib
from typing import TYPE_CHECKING, Any

# Nothing is imported up front: a client needs only `sampling` and `errors`, and `build`, `families`
# and `chain` pull in transformers' model classes and torch's compiler stack, about 3.5 s of CPU at
# the start of every `helix generate`, `helix serve` or library client. Names load on first use.
_HOMES = {
    "api": ("SessionId", "SessionInfo", "ShardSpec", "StepRequest", "StepResult"),
    "build": ("load_shard", "resolve_device"),
    "chain": ("LocalChain",),
    "errors": (
        "BadStepError",
        "CheckpointError",
        "DeviceError",
        "KVCapacityError",
        "LayerRangeError",
        "LayersNotHeldError",
        "MissingTensorError",
        "SamplingError",
        "SessionClosedError",
        "SessionError",
        "SessionExistsError",
        "SessionLengthError",
        "ShardError",
        "ShardSpecError",
        "UnknownSessionError",
        "UnsupportedModelError",
    ),
    "families": ("FAMILIES",),
    "loading": ("Checkpoint", "open_checkpoint"),
    "memory": (
        "bytes_per_layer",
        "dtype_bytes",
        "embedding_bytes",
        "head_bytes",
        "kv_bytes_per_token_per_layer",
        "max_layers_for_budget",
        "model_shape",
        "parse_dtype",
        "shard_weight_bytes",
    ),
    "profile": ("DeviceProfile", "ProfileError", "ProfileOptions", "cached_profile", "profile_device"),
    "runner": ("Shard",),
    "sampling": ("GREEDY", "SamplingParams"),
    "tiny": ("TinyModelSpec", "make_tiny_model"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from helix_p2p.shard.api import SessionId, SessionInfo, ShardSpec, StepRequest, StepResult
    from helix_p2p.shard.build import load_shard, resolve_device
    from helix_p2p.shard.chain import LocalChain
    from helix_p2p.shard.errors import (
        BadStepError,
        CheckpointError,
        DeviceError,
        KVCapacityError,
        LayerRangeError,
        LayersNotHeldError,
        MissingTensorError,
        SamplingError,
        SessionClosedError,
        SessionError,
        SessionExistsError,
        SessionLengthError,
        ShardError,
        ShardSpecError,
        UnknownSessionError,
        UnsupportedModelError,
    )
    from helix_p2p.shard.families import FAMILIES
    from helix_p2p.shard.loading import Checkpoint, open_checkpoint
    from helix_p2p.shard.memory import (
        bytes_per_layer,
        dtype_bytes,
        embedding_bytes,
        head_bytes,
        kv_bytes_per_token_per_layer,
        max_layers_for_budget,
        model_shape,
        parse_dtype,
        shard_weight_bytes,
    )
    from helix_p2p.shard.profile import (
        DeviceProfile,
        ProfileError,
        ProfileOptions,
        cached_profile,
        profile_device,
    )
    from helix_p2p.shard.runner import Shard
    from helix_p2p.shard.sampling import GREEDY, SamplingParams
    from helix_p2p.shard.tiny import TinyModelSpec, make_tiny_model

__all__ = [
    "FAMILIES",
    "GREEDY",
    "BadStepError",
    "Checkpoint",
    "CheckpointError",
    "DeviceError",
    "DeviceProfile",
    "KVCapacityError",
    "LayerRangeError",
    "LayersNotHeldError",
    "LocalChain",
    "MissingTensorError",
    "ProfileError",
    "ProfileOptions",
    "SamplingError",
    "SamplingParams",
    "SessionClosedError",
    "SessionError",
    "SessionExistsError",
    "SessionId",
    "SessionInfo",
    "SessionLengthError",
    "Shard",
    "ShardError",
    "ShardSpec",
    "ShardSpecError",
    "StepRequest",
    "StepResult",
    "TinyModelSpec",
    "UnknownSessionError",
    "UnsupportedModelError",
    "bytes_per_layer",
    "cached_profile",
    "dtype_bytes",
    "embedding_bytes",
    "head_bytes",
    "kv_bytes_per_token_per_layer",
    "load_shard",
    "make_tiny_model",
    "max_layers_for_budget",
    "model_shape",
    "open_checkpoint",
    "parse_dtype",
    "profile_device",
    "resolve_device",
    "shard_weight_bytes",
]
