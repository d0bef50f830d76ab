"""The wire form of data-plane messages: hivemind's `ExpertRequest` / `ExpertResponse` protobufs,
with the fields in JSON `metadata` and tensors as `runtime_pb2.Tensor` (uncompressed).

Decoding trusts nothing: the protobuf must parse, the JSON must have exactly the expected keys with
the expected types, and every tensor's dtype, rank, dimensions and byte length are checked before
its buffer is read (hivemind's own deserializer would hand any dtype string to numpy). Anything
wrong raises `MalformedMessageError` naming the field."""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from google.protobuf.message import DecodeError
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from helix_p2p.protocol.errors import ErrorCode, MalformedMessageError
from helix_p2p.protocol.limits import DataPlaneLimits
from helix_p2p.protocol.messages import (
    Closed,
    CloseSession,
    Failure,
    Generated,
    Opened,
    OpenSession,
    Reply,
    Request,
    RouteHop,
    Step,
    sampling_from_fields,
)

VERSION = 1
#: the widest hidden size accepted on the wire
MAX_HIDDEN = 1 << 16
#: reply metadata is small; anything bigger is not a reply of ours
MAX_REPLY_BYTES = 64 * 1024
#: request metadata is at most a route of 256 hops and the sampling fields (~20 KiB); the cap keeps a
#: stranger from making the node parse megabytes of JSON inside a request that is mostly tensors
MAX_METADATA_BYTES = 64 * 1024
_DTYPES: dict[str, torch.dtype] = {
    "int64": torch.int64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_KINDS = ("open", "step", "close")


# --- requests ------------------------------------------------------------------------------------


def encode_request(message: Request) -> bytes:
    tensors: list[torch.Tensor] = []
    if isinstance(message, OpenSession):
        s = message.sampling
        meta: dict[str, Any] = {
            "session_id": message.session_id,
            "route": [[h.peer_id, h.start, h.end] for h in message.route],
            "hop_index": message.hop_index,
            "max_length": message.max_length,
            "sampling": {
                "temperature": s.temperature,
                "top_k": s.top_k,
                "top_p": s.top_p,
                "repetition_penalty": s.repetition_penalty,
                "seed": s.seed,
                "stop_token_ids": list(s.stop_token_ids),
            },
        }
        kind = "open"
    elif isinstance(message, Step):
        meta = {
            "session_id": message.session_id,
            "position": message.position,
            "token_ids": message.token_ids is not None,
            "hidden_states": message.hidden_states is not None,
        }
        tensors = [t for t in (message.token_ids, message.hidden_states) if t is not None]
        kind = "step"
    elif isinstance(message, CloseSession):
        meta = {"session_id": message.session_id}
        kind = "close"
    else:
        raise TypeError(f"not a data-plane request: {type(message).__name__}")
    meta["v"] = VERSION
    request = runtime_pb2.ExpertRequest(
        uid=kind,
        metadata=json.dumps(meta, separators=(",", ":")).encode(),
        tensors=[_serialize(t) for t in tensors],
    )
    return request.SerializeToString()


def _serialize(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype != torch.bfloat16:
        return serialize_torch_tensor(tensor)
    # hivemind widens bfloat16 to float32 by default (its legacy mode); send the 2-byte values as
    # they are, which its deserializer reads back as bfloat16.
    return runtime_pb2.Tensor(
        buffer=tensor.view(torch.int16).numpy().tobytes(), size=tensor.shape, dtype="bfloat16"
    )


def decode_request(data: bytes, limits: DataPlaneLimits) -> Request:
    if len(data) > limits.max_request_bytes:
        raise MalformedMessageError(
            f"a request of {len(data)} bytes passes the {limits.max_request_bytes}-byte limit"
        )
    try:
        request = runtime_pb2.ExpertRequest.FromString(data)
    except DecodeError as e:
        raise MalformedMessageError(f"the request is not an ExpertRequest protobuf ({e})") from None
    return decode_request_message(request, limits)


def decode_request_message(request: runtime_pb2.ExpertRequest, limits: DataPlaneLimits) -> Request:
    kind = request.uid
    if kind not in _KINDS:
        raise MalformedMessageError(
            f"unknown request kind {kind[:40]!r} (expected one of {', '.join(_KINDS)})"
        )
    if kind == "open":
        meta = _json(
            request.metadata, {"v", "session_id", "route", "hop_index", "max_length", "sampling"}, kind
        )
        _no_tensors(request, kind)
        route = meta["route"]
        if not isinstance(route, list) or not all(isinstance(h, list) and len(h) == 3 for h in route):
            raise MalformedMessageError("open: route must be a list of [peer_id, start, end]")
        sampling = meta["sampling"]
        keys = {"temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop_token_ids"}
        if not isinstance(sampling, dict) or set(sampling) != keys:
            raise MalformedMessageError(f"open: sampling must have exactly the keys {sorted(keys)}")
        return OpenSession(
            session_id=meta["session_id"],
            route=tuple(RouteHop(*h) for h in route),
            max_length=meta["max_length"],
            sampling=sampling_from_fields(sampling),
            hop_index=meta["hop_index"],
        )
    if kind == "step":
        meta = _json(request.metadata, {"v", "session_id", "position", "token_ids", "hidden_states"}, kind)
        has_ids, has_hidden = meta["token_ids"], meta["hidden_states"]
        if type(has_ids) is not bool or type(has_hidden) is not bool:
            raise MalformedMessageError(
                "step: 'token_ids' and 'hidden_states' say whether each tensor is sent (bools)"
            )
        expected = int(has_ids) + int(has_hidden)
        if len(request.tensors) != expected:
            raise MalformedMessageError(
                f"step: {len(request.tensors)} tensors sent, the metadata announces {expected}"
            )
        tensors = list(request.tensors)
        ids = _tensor(tensors.pop(0), "token_ids", 1, limits, ints=True) if has_ids else None
        hidden = _tensor(tensors.pop(0), "hidden_states", 2, limits, ints=False) if has_hidden else None
        return Step(
            session_id=meta["session_id"], position=meta["position"], token_ids=ids, hidden_states=hidden
        )
    meta = _json(request.metadata, {"v", "session_id"}, kind)
    _no_tensors(request, kind)
    return CloseSession(meta["session_id"])


def _loads(raw: bytes, what: str) -> Any:
    """JSON from a stranger: NaN and infinities refused, nesting too deep for the parser refused."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise MalformedMessageError(f"{what} is not JSON ({str(e)[:100]})") from None
    except RecursionError:
        raise MalformedMessageError(f"{what} is nested too deeply") from None


def _json(raw: bytes, keys: set[str], kind: str) -> dict[str, Any]:
    if len(raw) > MAX_METADATA_BYTES:
        raise MalformedMessageError(
            f"{kind}: metadata of {len(raw)} bytes passes the {MAX_METADATA_BYTES}-byte limit"
        )
    return parse_metadata(raw, keys, kind)


def parse_metadata(raw: bytes, keys: set[str], kind: str) -> dict[str, Any]:
    """A message's JSON metadata, with exactly `keys`, at this protocol version. The caller caps
    its size (a forward call carries a whole prefix's token ids here, so its cap is its own)."""
    meta = _loads(raw, f"{kind}: metadata")
    if not isinstance(meta, dict) or set(meta) != keys:
        got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise MalformedMessageError(f"{kind}: metadata must have exactly the keys {sorted(keys)}, got {got}")
    if meta["v"] != VERSION:
        raise MalformedMessageError(f"{kind}: protocol version {meta['v']!r} (this peer speaks {VERSION})")
    return meta


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number the protocol accepts")


def _no_tensors(request: runtime_pb2.ExpertRequest, kind: str) -> None:
    if request.tensors:
        raise MalformedMessageError(f"{kind}: carries no tensors, got {len(request.tensors)}")


def _tensor(
    proto: runtime_pb2.Tensor, name: str, ndim: int, limits: DataPlaneLimits, *, ints: bool
) -> torch.Tensor:
    """Check a tensor's header against its buffer, then read it."""
    if proto.compression != runtime_pb2.CompressionType.NONE or proto.chunks:
        raise MalformedMessageError(f"step: {name} must be sent whole and uncompressed")
    dtype = _DTYPES.get(proto.dtype)
    if dtype is None or (dtype == torch.int64) != ints:
        allowed = "int64" if ints else "float32, bfloat16 or float16"
        raise MalformedMessageError(f"step: {name} has dtype {proto.dtype[:20]!r}, expected {allowed}")
    shape = list(proto.size)
    if len(shape) != ndim:
        raise MalformedMessageError(f"step: {name} has {len(shape)} dimensions, expected {ndim}")
    if not 1 <= shape[0] <= limits.max_step_tokens:
        raise MalformedMessageError(
            f"step: {name} has {shape[0]} tokens, a step carries 1 to {limits.max_step_tokens}"
        )
    if ndim == 2 and not 1 <= shape[1] <= MAX_HIDDEN:
        raise MalformedMessageError(f"step: {name} has hidden size {shape[1]}, expected 1 to {MAX_HIDDEN}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(proto.buffer) != expected:
        raise MalformedMessageError(
            f"step: {name} of shape {shape} and dtype {proto.dtype} needs {expected} bytes, got {len(proto.buffer)}"
        )
    if proto.requires_grad:
        raise MalformedMessageError(f"step: {name} must not require grad")
    tensor = deserialize_torch_tensor(proto)
    if not ints and not bool(torch.isfinite(tensor).all()):
        # NaN or inf would run through every later layer and sampling: refuse them where they arrive
        raise MalformedMessageError(f"step: {name} holds NaN or infinite values")
    return tensor


# --- replies -------------------------------------------------------------------------------------


def encode_reply(reply: Reply) -> bytes:
    return reply_message(reply).SerializeToString()


def reply_message(reply: Reply) -> runtime_pb2.ExpertResponse:
    if isinstance(reply, Opened):
        meta: dict[str, Any] = {"kind": "opened", "session_id": reply.session_id, "hops": reply.hops}
    elif isinstance(reply, Generated):
        meta = {
            "kind": "generated",
            "session_id": reply.session_id,
            "position": reply.position,
            "num_tokens": reply.num_tokens,
            "token_id": reply.token_id,
            "finished": reply.finished,
        }
    elif isinstance(reply, Closed):
        meta = {"kind": "closed", "session_id": reply.session_id}
    elif isinstance(reply, Failure):
        meta = {
            "kind": "failure",
            "code": reply.code.value,
            "message": reply.message,
            "peer_id": reply.peer_id,
        }
    else:
        raise TypeError(f"not a data-plane reply: {type(reply).__name__}")
    meta["v"] = VERSION
    return runtime_pb2.ExpertResponse(metadata=json.dumps(meta, separators=(",", ":")).encode())


_REPLY_KEYS = {
    "opened": {"session_id", "hops"},
    "generated": {"session_id", "position", "num_tokens", "token_id", "finished"},
    "closed": {"session_id"},
    "failure": {"code", "message", "peer_id"},
}


def decode_reply(data: bytes) -> Reply:
    """A reply from a peer; a malformed one raises `MalformedMessageError`."""
    if len(data) > MAX_REPLY_BYTES:
        raise MalformedMessageError(f"a reply of {len(data)} bytes is larger than any reply of this protocol")
    try:
        response = runtime_pb2.ExpertResponse.FromString(data)
    except DecodeError as e:
        raise MalformedMessageError(f"the reply is not an ExpertResponse protobuf ({e})") from None
    meta = _loads(response.metadata, "reply metadata")
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if not isinstance(kind, str) or kind not in _REPLY_KEYS or set(meta) != _REPLY_KEYS[kind] | {"kind", "v"} or meta["v"] != VERSION:
        raise MalformedMessageError(f"reply metadata is not a reply of protocol version {VERSION}")
    fields = {k: v for k, v in meta.items() if k not in ("kind", "v")}
    if kind == "opened":
        return Opened(**fields)
    if kind == "generated":
        return Generated(**fields)
    if kind == "closed":
        return Closed(**fields)
    try:
        code = ErrorCode(fields["code"])
    except ValueError:
        code = ErrorCode.INTERNAL  # a newer peer's code: still an error, reported as such
    return Failure(code, fields["message"], fields["peer_id"])
