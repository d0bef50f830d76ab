"""The data plane's messages, wire form and limits, without a network: every message survives its
round trip, and every malformed one (wrong type, extra key, bad id, bad route, bad tensor header,
oversized) is refused with `MalformedMessageError` before any tensor is built from it."""

from __future__ import annotations

import json

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2

from helix_p2p.errors import HelixError
from helix_p2p.protocol import (
    BusyError,
    Closed,
    CloseSession,
    DataPlaneLimits,
    ErrorCode,
    Failure,
    Generated,
    LimitsError,
    MalformedMessageError,
    Opened,
    OpenSession,
    PeerQuota,
    RouteHop,
    SessionNotFoundError,
    Step,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    route_from_pipeline,
)
from helix_p2p.routing import Hop, Pipeline
from helix_p2p.shard import SamplingParams

PEERS = (
    "12D3KooWK8wfRVJfwy85ah9yKcvDD96fijcPEy4s77w3qgCZ9YNK",
    "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
)
ROUTE = (RouteHop(PEERS[0], 0, 2), RouteHop(PEERS[1], 2, 4))
LIMITS = DataPlaneLimits(max_step_tokens=64, max_request_bytes=1 << 20)


def roundtrip(message):
    return decode_request(encode_request(message), LIMITS)


def raw(kind: str, meta: dict, tensors: list[runtime_pb2.Tensor] | None = None) -> bytes:
    return runtime_pb2.ExpertRequest(
        uid=kind, metadata=json.dumps(meta).encode(), tensors=tensors or []
    ).SerializeToString()


def open_meta(**changes) -> dict:
    meta = json.loads(
        runtime_pb2.ExpertRequest.FromString(encode_request(OpenSession("s1", ROUTE, 32))).metadata
    )
    meta.update(changes)
    return meta


def test_requests_round_trip() -> None:
    params = SamplingParams(
        temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2, seed=3, stop_token_ids=(1,)
    )
    message = OpenSession("s-1.a:b", ROUTE, 128, params, hop_index=1)
    assert roundtrip(message) == message
    assert roundtrip(CloseSession("s1")) == CloseSession("s1")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        hidden = torch.randn(5, 16).to(dtype)
        step = roundtrip(Step("s1", 7, token_ids=torch.arange(5), hidden_states=hidden))
        assert step.position == 7 and step.num_tokens == 5
        assert torch.equal(step.token_ids, torch.arange(5)) and torch.equal(step.hidden_states, hidden)
        assert step.hidden_states.dtype == dtype


def test_replies_round_trip() -> None:
    for reply in (
        Opened("s1", 3),
        Generated("s1", 4, 1, 17, False),
        Closed("s1"),
        Failure(ErrorCode.BUSY, "full", PEERS[1]),
    ):
        assert decode_reply(encode_reply(reply)) == reply
    error = Failure(ErrorCode.BUSY, "no room in the KV budget", PEERS[1]).exception()
    assert isinstance(error, BusyError) and isinstance(error, HelixError) and error.peer_id == PEERS[1]
    assert PEERS[1] in str(error)


@pytest.mark.parametrize(
    "session_id", ["", "a" * 65, "-starts-with-dash", "has space", "ünï", 7, None, "semi;colon"]
)
def test_bad_session_ids_are_refused(session_id) -> None:
    with pytest.raises(MalformedMessageError, match="session id"):
        decode_request(raw("close", {"v": 1, "session_id": session_id}), LIMITS)


@pytest.mark.parametrize(
    ("route", "match"),
    [
        ([], "1 to 256 hops"),
        ([[PEERS[0], 1, 4]], "starts at layer 0"),
        ([[PEERS[0], 0, 2], [PEERS[1], 3, 4]], "tile the layers"),
        ([[PEERS[0], 0, 0]], "non-empty range"),
        ([[PEERS[0], 0, True]], "non-empty range"),
        ([["not-a-peer-id!", 0, 4]], "base58 peer id"),
        ([[PEERS[0], 0]], "list of"),
        ("route", "list of"),
    ],
)
def test_bad_routes_are_refused(route, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        decode_request(raw("open", open_meta(route=route)), LIMITS)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"hop_index": 2}, "outside the route"),
        ({"hop_index": -1}, "outside the route"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": 1.5}, "max_length"),
        ({"max_length": True}, "max_length"),
        ({"v": 2}, "protocol version"),
        ({"extra": 1}, "exactly the keys"),
        ({"sampling": {"temperature": -1.0}}, "exactly the keys"),
    ],
)
def test_bad_open_fields_are_refused(changes: dict, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        decode_request(raw("open", open_meta(**changes)), LIMITS)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("temperature", -0.5, "temperature"),
        ("temperature", "hot", "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_k", 2.5, "top_k"),
        ("seed", -1, "seed"),
        ("stop_token_ids", list(range(100)), "stop_token_ids"),
        ("repetition_penalty", None, "repetition_penalty"),
    ],
)
def test_bad_sampling_is_refused(field: str, value, match: str) -> None:
    meta = open_meta()
    meta["sampling"][field] = value
    with pytest.raises(MalformedMessageError, match=match):
        decode_request(raw("open", meta), LIMITS)


def test_non_finite_numbers_and_garbage_are_refused() -> None:
    text = encode_request(OpenSession("s1", ROUTE, 32))
    request = runtime_pb2.ExpertRequest.FromString(text)
    request.metadata = request.metadata.replace(b'"temperature":0.0', b'"temperature":NaN')
    with pytest.raises(MalformedMessageError, match="not JSON"):
        decode_request(request.SerializeToString(), LIMITS)
    with pytest.raises(MalformedMessageError, match="not an ExpertRequest"):
        decode_request(b"\xff\xff\xff garbage", LIMITS)
    with pytest.raises(MalformedMessageError, match="unknown request kind"):
        decode_request(raw("delete-everything", {"v": 1}), LIMITS)
    with pytest.raises(MalformedMessageError, match="not JSON"):
        decode_request(runtime_pb2.ExpertRequest(uid="close", metadata=b"\x80").SerializeToString(), LIMITS)


def step_meta(ids: bool = True, hidden: bool = False) -> dict:
    return {"v": 1, "session_id": "s1", "position": 0, "token_ids": ids, "hidden_states": hidden}


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (runtime_pb2.Tensor(buffer=b"\0" * 8, size=[1], dtype="object"), "dtype"),
        (runtime_pb2.Tensor(buffer=b"\0" * 8, size=[1], dtype="float32"), "dtype"),  # ids must be int64
        (runtime_pb2.Tensor(buffer=b"\0" * 7, size=[1], dtype="int64"), "needs 8 bytes"),
        (runtime_pb2.Tensor(buffer=b"\0" * 16, size=[1], dtype="int64"), "needs 8 bytes"),
        (runtime_pb2.Tensor(buffer=b"\0" * 16, size=[2, 1], dtype="int64"), "dimensions"),
        (runtime_pb2.Tensor(buffer=b"", size=[0], dtype="int64"), "1 to 64"),
        (runtime_pb2.Tensor(buffer=b"\0" * 8 * 65, size=[65], dtype="int64"), "1 to 64"),
        (runtime_pb2.Tensor(buffer=b"\0" * 8, size=[1], dtype="int64", compression=2), "uncompressed"),
        (runtime_pb2.Tensor(buffer=b"\0" * 8, size=[1], dtype="int64", chunks=3), "uncompressed"),
    ],
)
def test_bad_tensor_headers_are_refused(tensor: runtime_pb2.Tensor, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        decode_request(raw("step", step_meta(), [tensor]), LIMITS)


def test_bad_steps_are_refused() -> None:
    ids = serialize_torch_tensor(torch.arange(3))
    hidden = serialize_torch_tensor(torch.zeros(2, 8))
    with pytest.raises(MalformedMessageError, match="metadata announces 1"):
        decode_request(raw("step", step_meta(), [ids, ids]), LIMITS)
    with pytest.raises(MalformedMessageError, match="carries token_ids or hidden_states"):
        decode_request(raw("step", step_meta(ids=False), []), LIMITS)
    with pytest.raises(MalformedMessageError, match="3 token ids for 2 hidden states"):
        decode_request(raw("step", step_meta(hidden=True), [ids, hidden]), LIMITS)
    with pytest.raises(MalformedMessageError, match="bools"):
        decode_request(raw("step", {**step_meta(), "token_ids": 1}, [ids]), LIMITS)
    with pytest.raises(MalformedMessageError, match="position"):
        decode_request(raw("step", {**step_meta(), "position": -1}, [ids]), LIMITS)
    with pytest.raises(MalformedMessageError, match="hidden size"):
        wide = runtime_pb2.Tensor(buffer=b"", size=[1, 0], dtype="float32")
        decode_request(raw("step", step_meta(ids=False, hidden=True), [wide]), LIMITS)
    with pytest.raises(MalformedMessageError, match="passes the 1048576-byte limit"):
        big = torch.zeros(64, 8192)
        decode_request(encode_request(Step("s1", 0, hidden_states=big)), LIMITS)
    with pytest.raises(MalformedMessageError, match="carries no tensors"):
        decode_request(raw("close", {"v": 1, "session_id": "s1"}, [ids]), LIMITS)


def test_bad_replies_are_refused() -> None:
    for meta in (
        {
            "v": 1,
            "kind": "generated",
            "session_id": "s1",
            "position": 0,
            "num_tokens": 1,
            "token_id": -3,
            "finished": False,
        },
        {
            "v": 1,
            "kind": "generated",
            "session_id": "s1",
            "position": 0,
            "num_tokens": 1,
            "token_id": 3,
            "finished": 1,
        },
        {"v": 1, "kind": "opened", "session_id": "s1"},
        {"v": 1, "kind": "shrug"},
        [],
    ):
        data = runtime_pb2.ExpertResponse(metadata=json.dumps(meta).encode()).SerializeToString()
        with pytest.raises(MalformedMessageError):
            decode_reply(data)
    future_code = runtime_pb2.ExpertResponse(
        metadata=json.dumps(
            {"v": 1, "kind": "failure", "code": "new-code", "message": "m", "peer_id": ""}
        ).encode()
    ).SerializeToString()
    assert decode_reply(future_code).code == ErrorCode.INTERNAL


def test_open_session_helpers() -> None:
    message = OpenSession("s1", ROUTE, 16)
    assert message.hop == ROUTE[0] and not message.is_last
    forwarded = message.forwarded()
    assert forwarded.hop == ROUTE[1] and forwarded.is_last and forwarded.session_id == "s1"
    pipeline = Pipeline((Hop(PEERS[0], 0, 2), Hop(PEERS[1], 2, 4)), kv_tokens=16)
    assert route_from_pipeline(pipeline) == ROUTE


def test_limits_are_checked() -> None:
    with pytest.raises(LimitsError, match="max_sessions"):
        DataPlaneLimits(max_sessions=0)
    with pytest.raises(LimitsError, match="idle_timeout_s"):
        DataPlaneLimits(idle_timeout_s=float("inf"))
    with pytest.raises(LimitsError, match="max_step_tokens"):
        DataPlaneLimits(max_step_tokens=True)


def test_peer_quota_caps_sessions_and_steps_per_peer() -> None:
    quota = PeerQuota(DataPlaneLimits(max_sessions=4, max_sessions_per_peer=2, max_queued_steps_per_peer=1))
    for peer in ("a", "a", "b"):
        assert quota.refuse_session(peer) is None
        quota.add_session(peer)
    assert "peer a already holds its limit of 2" in quota.refuse_session("a")
    quota.add_session("c")
    assert quota.refuse_session("d") == "it holds its limit of 4 sessions"
    quota.remove_session("b")
    assert quota.refuse_session("d") is None and "peer a" in quota.refuse_session("a")
    quota.add_step("a")
    assert "1 steps queued" in quota.refuse_step("a") and quota.refuse_step("b") is None
    quota.remove_step("a")
    assert quota.refuse_step("a") is None
    with pytest.raises(RuntimeError, match="released more than taken"):
        quota.remove_step("a")


def test_error_types_are_helix_errors() -> None:
    assert issubclass(SessionNotFoundError, HelixError)
    assert Failure(ErrorCode.UNKNOWN_SESSION, "x" * 5000).message == "x" * 2000
