"""The stateless forward call, by which a client checks one hop's arithmetic (`--verify-rate`).

`Forward(layers, token_ids | hidden_states)` asks a peer to run layers [start, end) over a whole
prefix from position 0, with no session and no KV cache kept afterwards, and to answer
`Forwarded` with the output: the hidden states [n, hidden] after layer `end - 1`, or, when `end`
is the model's last layer, the fp32 logits of the last position [vocab] (before any sampling). The
first range takes token ids and every later one hidden states, as in a step. Two honest replicas
of the same layers given the same input answer the same numbers within floating-point noise; the
client compares them (`helix_p2p.client.verify`).

Wire form: the data plane's `ExpertRequest` with `uid = "forward"` and `ExpertResponse` with one
tensor; both are checked as strictly as the other messages (`wire.py`). A failure is an ordinary
`Failure` reply. The reply can be large (a long prefix's hidden states), so the client reads it
over a stream when it may pass the unary cap (`transport.exchange`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from helix_p2p.protocol.errors import MalformedMessageError
from helix_p2p.protocol.limits import DataPlaneLimits
from helix_p2p.protocol.messages import HIDDEN_DTYPES, MAX_LAYERS, TOKEN_DTYPE, Failure, Reply
from helix_p2p.protocol.wire import MAX_HIDDEN, VERSION, _serialize, decode_reply, parse_metadata

FORWARD_KIND = "forward"
#: the widest vocabulary a logits reply may carry
MAX_VOCAB = 1 << 20
_DTYPES: dict[str, torch.dtype] = {
    "int64": torch.int64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Forward:
    """Run layers [start, end) over positions [0, n) and answer the output (no session)."""

    start: int
    end: int
    token_ids: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not (
            type(self.start) is int and type(self.end) is int and 0 <= self.start < self.end <= MAX_LAYERS
        ):
            raise MalformedMessageError(
                f"forward: layers [{self.start!r}, {self.end!r}) are not a non-empty range"
            )
        ids, hidden = self.token_ids, self.hidden_states
        if (ids is None) == (hidden is None):
            raise MalformedMessageError("forward: carries token_ids (first range) or hidden_states, not both")
        if self.start == 0 and ids is None:
            raise MalformedMessageError("forward: layers from 0 take token_ids")
        if self.start > 0 and hidden is None:
            raise MalformedMessageError(f"forward: layers from {self.start} take hidden_states")
        if ids is not None and not (
            isinstance(ids, torch.Tensor) and ids.ndim == 1 and ids.dtype == TOKEN_DTYPE
        ):
            raise MalformedMessageError("forward: token_ids must be a 1-D int64 tensor")
        if hidden is not None and not (
            isinstance(hidden, torch.Tensor) and hidden.ndim == 2 and hidden.dtype in HIDDEN_DTYPES
        ):
            raise MalformedMessageError("forward: hidden_states must be a [tokens, hidden] float tensor")
        if self.num_tokens < 1:
            raise MalformedMessageError("forward: needs at least one token")

    @property
    def layers(self) -> tuple[int, int]:
        return (self.start, self.end)

    @property
    def num_tokens(self) -> int:
        x = self.token_ids if self.token_ids is not None else self.hidden_states
        assert x is not None
        return int(x.shape[0])


@dataclass(frozen=True)
class Forwarded:
    """A forward's output: `hidden_states` [n, hidden], or `logits` [vocab] of the last position."""

    start: int
    end: int
    output: torch.Tensor
    is_logits: bool

    def __post_init__(self) -> None:
        if not isinstance(self.output, torch.Tensor) or self.output.ndim != (1 if self.is_logits else 2):
            raise MalformedMessageError("forward reply: logits are [vocab], hidden states [tokens, hidden]")


# --- wire ----------------------------------------------------------------------------------------


def encode_forward(message: Forward) -> bytes:
    meta = {
        "v": VERSION,
        "layers": [message.start, message.end],
        "token_ids": message.token_ids is not None,
    }
    tensor = message.token_ids if message.token_ids is not None else message.hidden_states
    assert tensor is not None
    request = runtime_pb2.ExpertRequest(
        uid=FORWARD_KIND,
        metadata=json.dumps(meta, separators=(",", ":")).encode(),
        tensors=[_serialize(tensor)],
    )
    return request.SerializeToString()


def is_forward(request: runtime_pb2.ExpertRequest) -> bool:
    return request.uid == FORWARD_KIND


def decode_forward(request: runtime_pb2.ExpertRequest, limits: DataPlaneLimits) -> Forward:
    meta = parse_metadata(request.metadata, {"v", "layers", "token_ids"}, "forward")
    layers, has_ids = meta["layers"], meta["token_ids"]
    if not (isinstance(layers, list) and len(layers) == 2 and all(type(x) is int for x in layers)):
        raise MalformedMessageError("forward: layers must be [start, end]")
    if type(has_ids) is not bool:
        raise MalformedMessageError("forward: 'token_ids' says whether token ids are sent (a bool)")
    if len(request.tensors) != 1:
        raise MalformedMessageError(f"forward: carries one tensor, got {len(request.tensors)}")
    if has_ids:
        ids = _read_tensor(request.tensors[0], "token_ids", 1, limits.max_step_tokens, ints=True)
        return Forward(layers[0], layers[1], token_ids=ids)
    hidden = _read_tensor(request.tensors[0], "hidden_states", 2, limits.max_step_tokens, ints=False)
    return Forward(layers[0], layers[1], hidden_states=hidden)


def forwarded_message(reply: Forwarded) -> runtime_pb2.ExpertResponse:
    meta = {
        "v": VERSION,
        "kind": "forwarded",
        "layers": [reply.start, reply.end],
        "output": "logits" if reply.is_logits else "hidden_states",
    }
    return runtime_pb2.ExpertResponse(
        metadata=json.dumps(meta, separators=(",", ":")).encode(), tensors=[_serialize(reply.output)]
    )


def decode_forwarded(data: bytes, request: Forward, max_bytes: int) -> Forwarded | Failure:
    """A peer's answer to `request`: its output checked against what was asked (layers, tokens,
    hidden size), or the `Failure` it sent. Raises `MalformedMessageError` otherwise."""
    if len(data) > max_bytes:
        raise MalformedMessageError(f"a forward reply of {len(data)} bytes passes the {max_bytes}-byte limit")
    try:
        response = runtime_pb2.ExpertResponse.FromString(data)
    except DecodeError as e:
        raise MalformedMessageError(f"the forward reply is not an ExpertResponse protobuf ({e})") from None
    if not response.tensors:
        reply: Reply = decode_reply(data)
        if isinstance(reply, Failure):
            return reply
        raise MalformedMessageError(f"a forward was answered with {type(reply).__name__}")
    meta = parse_metadata(response.metadata, {"v", "kind", "layers", "output"}, "forward reply")
    if meta["kind"] != "forwarded" or meta["layers"] != [request.start, request.end]:
        raise MalformedMessageError(
            f"forward reply: expected layers [{request.start}, {request.end}), got {meta['layers']!r}"
        )
    if meta["output"] not in ("logits", "hidden_states") or len(response.tensors) != 1:
        raise MalformedMessageError("forward reply: one tensor of logits or hidden_states")
    is_logits = meta["output"] == "logits"
    if is_logits:
        output = _read_tensor(response.tensors[0], "logits", 1, MAX_VOCAB, ints=False)
    else:
        output = _read_tensor(response.tensors[0], "hidden_states", 2, request.num_tokens, ints=False)
        if output.shape[0] != request.num_tokens:
            raise MalformedMessageError(
                f"forward reply: {output.shape[0]} hidden states for {request.num_tokens} tokens"
            )
        if request.hidden_states is not None and output.shape[1] != request.hidden_states.shape[1]:
            raise MalformedMessageError(
                f"forward reply: hidden size {output.shape[1]}, the input's is {request.hidden_states.shape[1]}"
            )
    return Forwarded(request.start, request.end, output, is_logits)


def reply_bytes_bound(request: Forward, hidden_size: int, vocab_size: int) -> int:
    """The most bytes an honest reply to `request` takes (fp32 at worst), plus envelope."""
    rows = max(request.num_tokens * hidden_size, vocab_size)
    return 4 * rows + 64 * 1024


def _read_tensor(
    proto: runtime_pb2.Tensor, name: str, ndim: int, max_rows: int, *, ints: bool
) -> torch.Tensor:
    """Check a tensor's header against its buffer, then read it (as `wire.py` does for steps)."""
    if proto.compression != runtime_pb2.CompressionType.NONE or proto.chunks or proto.requires_grad:
        raise MalformedMessageError(f"forward: {name} must be sent whole, uncompressed, without grad")
    dtype = _DTYPES.get(proto.dtype)
    if dtype is None or (dtype == torch.int64) != ints:
        raise MalformedMessageError(f"forward: {name} has dtype {proto.dtype[:20]!r}")
    shape = list(proto.size)
    if len(shape) != ndim or not 1 <= shape[0] <= max_rows or (ndim == 2 and not 1 <= shape[1] <= MAX_HIDDEN):
        raise MalformedMessageError(
            f"forward: {name} has shape {shape[:4]}, expected {ndim} dimensions within limits"
        )
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(proto.buffer) != expected:
        raise MalformedMessageError(
            f"forward: {name} of shape {shape} needs {expected} bytes, got {len(proto.buffer)}"
        )
    return deserialize_torch_tensor(proto)
