"""What can go wrong when loading or running a shard, as types a caller (the node) can catch by name.
Every one is a `HelixError`: each is caused by the input (a checkpoint, a request, a flag), and its
message names the thing at fault."""

from __future__ import annotations

from helix_p2p.errors import HelixError


class ShardError(HelixError):
    """Base of every shard error."""


# --- loading -----------------------------------------------------------------------------------


class CheckpointError(ShardError):
    """The checkpoint cannot be read: no such directory, no config.json, no safetensors files."""


class UnsupportedModelError(ShardError):
    """The checkpoint's family (config `model_type`) or a setting in its config is not supported."""


class MissingTensorError(CheckpointError):
    """A tensor the held layers need is not in the checkpoint (or has the wrong shape)."""


class LayerRangeError(ShardError):
    """A layer range is empty or outside the model's layers."""


class ShardSpecError(ShardError):
    """A `ShardSpec` setting is out of range (chunk sizes, timeouts, KV cap)."""


class DeviceError(ShardError):
    """The device or dtype asked for cannot be used on this machine (e.g. cuda:1 without CUDA)."""


# --- running -----------------------------------------------------------------------------------


class BadStepError(ShardError):
    """A step's input is malformed: wrong kind (token ids vs hidden states), shape, hidden size,
    dtype, or a token id outside the vocabulary. Raised before any tensor work."""


class LayersNotHeldError(BadStepError):
    """A step or session asks for layers this shard does not hold."""


class SessionError(ShardError):
    """Base of errors about a session's identity or state."""


class UnknownSessionError(SessionError):
    """No session with this id was ever opened here (or it was forgotten long ago)."""


class SessionClosedError(UnknownSessionError):
    """The session was closed, or expired after idling; its KV cache is gone."""


class SessionExistsError(SessionError):
    """A session with this id is already open."""


class SessionLengthError(SessionError):
    """A step would write past the session's max length, or leave a gap after its last position."""


class KVCapacityError(SessionError):
    """Opening the session would reserve more KV cache than this shard may hold."""


class SamplingError(BadStepError):
    """Sampling parameters are invalid (negative temperature, top_p outside (0, 1], ...)."""
