"""Fuzzing the pure decoders and validators that read what strangers send: data-plane requests and
replies (`protocol/wire.py`, `messages.py`), the limits and per-peer quota (`limits.py`), node and plan
records, signed plans (`swarm/records.py`, `swarm/signing.py`), the DHT record validator
(`swarm/validator.py`), the reachability dial-back handler's request parsing, the forward call
(`protocol/forward.py`), reports (`swarm/reports.py`) and a private swarm's seals and tags.

The property is the same everywhere: any input either decodes to a well-formed value or raises the
module's named error (`MalformedMessageError`, `RecordError`, `LimitsError`); no other exception,
and the validator never raises at all (it answers False). Inputs are malformed (wrong types, huge
numbers, NaN, deep nesting, unknown keys), truncated (a valid encoding cut anywhere, bytes flipped)
and oversized (past each size cap). Mutating valid messages reaches the checks behind the first
ones, which random bytes alone would not."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import msgpack
import pytest
import torch
from fuzz_strategies import DEEP, MSGPACK_VALUES, TENSORS, VALUES, matching_tensors, mutated
from google.protobuf.wrappers_pb2 import BytesValue
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.timed_storage import get_dht_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from swarm_builders import link, node, plan

from helix_p2p.protocol import (
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
    Step,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from helix_p2p.protocol.forward import (
    Forward,
    Forwarded,
    decode_forward,
    decode_forwarded,
    encode_forward,
    forwarded_message,
)
from helix_p2p.protocol.messages import sampling_from_fields
from helix_p2p.protocol.wire import MAX_METADATA_BYTES
from helix_p2p.shard import SamplingParams
from helix_p2p.swarm.identity import ephemeral_identity
from helix_p2p.swarm.keys import plan_key, registry_key
from helix_p2p.swarm.reachability import ReachServer
from helix_p2p.swarm.records import (
    MAX_NODE_RECORD_BYTES,
    MAX_PLAN_RECORD_BYTES,
    RecordError,
    node_record_from_wire,
    node_record_to_wire,
    plan_body_bytes,
    plan_record_from_body,
    signed_plan_parts_from_wire,
    signed_plan_to_wire,
)
from helix_p2p.swarm.reports import Accusation, ReportRecord, report_from_wire, report_to_wire
from helix_p2p.swarm.sealed_records import SealedRecordValidator
from helix_p2p.swarm.signing import sign_plan, verify_plan
from helix_p2p.swarm.swarm_key import SwarmAuthError, format_swarm_key, parse_swarm_key
from helix_p2p.swarm.validator import SwarmRecordValidator, key_id

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
PEERS = (
    "12D3KooWK8wfRVJfwy85ah9yKcvDD96fijcPEy4s77w3qgCZ9YNK",
    "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
)
ROUTE = (RouteHop(PEERS[0], 0, 2), RouteHop(PEERS[1], 2, 4))
LIMITS = DataPlaneLimits(max_step_tokens=64, max_request_bytes=1 << 16)
SAMPLING = SamplingParams(
    temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2, seed=3, stop_token_ids=(1,)
)
PREFIX = "fuzz-swarm"


def metadata_of(message: OpenSession | Step | CloseSession) -> tuple[str, dict[str, Any]]:
    request = runtime_pb2.ExpertRequest.FromString(encode_request(message))
    return request.uid, json.loads(request.metadata)


def valid_step() -> Step:
    return Step("s1", 3, token_ids=torch.arange(4), hidden_states=torch.randn(4, 8))


VALID_REQUESTS = [OpenSession("s1", ROUTE, 32, SAMPLING, hop_index=1), valid_step(), CloseSession("s1")]
VALID_REPLIES = [Opened("s1", 2), Generated("s1", 4, 1, 17, False), Failure(ErrorCode.BUSY, "full", PEERS[1])]


def decodes_or_malformed(data: bytes) -> None:
    try:
        message = decode_request(data, LIMITS)
    except MalformedMessageError as e:
        assert str(e) and "\n" not in str(e), "a one-line error"
        return
    # What decodes is well formed: it encodes and decodes back to the same fields.
    again = decode_request(encode_request(message), LIMITS)
    assert type(again) is type(message) and again.session_id == message.session_id


# --- data-plane requests -------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_or_decoded(data: bytes) -> None:
    decodes_or_malformed(data)


@FUZZ
@given(st.sampled_from(VALID_REQUESTS), st.data())
def test_truncated_and_flipped_requests(message, data: st.DataObject) -> None:
    encoded = bytearray(encode_request(message))
    cut = data.draw(st.integers(0, len(encoded)))
    if data.draw(st.booleans()):
        decodes_or_malformed(bytes(encoded[:cut]))
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            encoded[data.draw(st.integers(0, len(encoded) - 1))] = data.draw(st.integers(0, 255))
        decodes_or_malformed(bytes(encoded) + data.draw(st.binary(max_size=8)))


@FUZZ
@given(st.sampled_from(VALID_REQUESTS), st.data())
def test_mutated_metadata_is_refused_or_decoded(message, data: st.DataObject) -> None:
    kind, meta = metadata_of(message)
    kind = data.draw(st.sampled_from([kind, kind, "open", "step", "close", "", "x" * 100]))
    original = runtime_pb2.ExpertRequest.FromString(encode_request(message))
    tensors = data.draw(
        st.one_of(
            st.just(list(original.tensors)), st.lists(st.one_of(TENSORS, matching_tensors()), max_size=3)
        )
    )
    metadata = json.dumps(mutated(meta, data.draw)).encode()
    decodes_or_malformed(
        runtime_pb2.ExpertRequest(uid=kind, metadata=metadata, tensors=tensors).SerializeToString()
    )


@FUZZ
@given(st.one_of(DEEP.map(str.encode), st.binary(max_size=64)), st.sampled_from(["open", "step", "close"]))
def test_deep_or_garbage_metadata_is_malformed(metadata: bytes, kind: str) -> None:
    with pytest.raises(MalformedMessageError):
        decode_request(runtime_pb2.ExpertRequest(uid=kind, metadata=metadata).SerializeToString(), LIMITS)


@FUZZ
@given(st.lists(st.one_of(TENSORS, matching_tensors()), min_size=1, max_size=2), st.booleans(), st.booleans())
def test_step_tensor_headers(tensors, has_ids: bool, has_hidden: bool) -> None:
    meta = {"v": 1, "session_id": "s1", "position": 0, "token_ids": has_ids, "hidden_states": has_hidden}
    decodes_or_malformed(
        runtime_pb2.ExpertRequest(
            uid="step", metadata=json.dumps(meta).encode(), tensors=tensors
        ).SerializeToString()
    )


def test_oversized_requests_and_metadata_are_refused_before_parsing() -> None:
    with pytest.raises(MalformedMessageError, match="byte limit"):
        decode_request(b"\x00" * (LIMITS.max_request_bytes + 1), LIMITS)
    _, meta = metadata_of(VALID_REQUESTS[0])
    meta["padding"] = "x" * MAX_METADATA_BYTES
    big = runtime_pb2.ExpertRequest(uid="open", metadata=json.dumps(meta).encode()).SerializeToString()
    with pytest.raises(MalformedMessageError, match="metadata of .* bytes"):
        decode_request(big, DataPlaneLimits())
    # a hidden-state tensor claiming more tokens than a step may carry is refused from its header
    huge = runtime_pb2.Tensor(buffer=b"", size=[LIMITS.max_step_tokens + 1, 8], dtype="float32")
    meta = {"v": 1, "session_id": "s1", "position": 0, "token_ids": False, "hidden_states": True}
    with pytest.raises(MalformedMessageError, match="tokens, a step carries"):
        decode_request(
            runtime_pb2.ExpertRequest(
                uid="step", metadata=json.dumps(meta).encode(), tensors=[huge]
            ).SerializeToString(),
            LIMITS,
        )


@FUZZ
@given(st.data())
def test_sampling_fields(data: st.DataObject) -> None:
    _, meta = metadata_of(VALID_REQUESTS[0])
    fields = meta["sampling"]
    for key in data.draw(st.lists(st.sampled_from(sorted(fields)), max_size=3)):
        fields[key] = data.draw(VALUES)
    try:
        params = sampling_from_fields(fields)
    except MalformedMessageError:
        return
    assert isinstance(params, SamplingParams)


# --- data-plane replies --------------------------------------------------------------------------


def reply_or_malformed(data: bytes) -> None:
    try:
        reply = decode_reply(data)
    except MalformedMessageError:
        return
    assert decode_reply(encode_reply(reply)) == reply


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.sampled_from(VALID_REPLIES).map(encode_reply)), st.data())
def test_replies_truncated_flipped_or_random(data_bytes: bytes, data: st.DataObject) -> None:
    encoded = bytearray(data_bytes)
    if encoded and data.draw(st.booleans()):
        encoded[data.draw(st.integers(0, len(encoded) - 1))] ^= data.draw(st.integers(1, 255))
    reply_or_malformed(bytes(encoded[: data.draw(st.integers(0, len(encoded)))]))


@FUZZ
@given(st.sampled_from(VALID_REPLIES), st.data())
def test_mutated_reply_metadata(reply, data: st.DataObject) -> None:
    meta = json.loads(runtime_pb2.ExpertResponse.FromString(encode_reply(reply)).metadata)
    metadata = data.draw(st.one_of(st.just(json.dumps(mutated(meta, data.draw))), DEEP)).encode()
    reply_or_malformed(runtime_pb2.ExpertResponse(metadata=metadata).SerializeToString())


def test_an_oversized_reply_is_refused() -> None:
    with pytest.raises(MalformedMessageError, match="larger than any reply"):
        decode_reply(b"\x00" * (1 << 20))


# --- limits and the per-peer quota ---------------------------------------------------------------

LIMIT_FIELDS = [f for f in DataPlaneLimits.__dataclass_fields__]


@FUZZ
@given(st.dictionaries(st.sampled_from(LIMIT_FIELDS), VALUES, max_size=3))
def test_limits_accept_valid_values_or_name_the_field(changes: dict[str, Any]) -> None:
    try:
        limits = DataPlaneLimits(**changes)
    except LimitsError as e:
        assert any(name in str(e) for name in changes)
        return
    for name in LIMIT_FIELDS:
        value = getattr(limits, name)
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


QUOTA_LIMITS = DataPlaneLimits(
    max_sessions=5,
    max_sessions_per_peer=3,
    max_queued_steps_per_peer=2,
    max_kv_tokens_per_peer=100,
    max_bytes_in_flight_per_peer=1000,
    max_bytes_in_flight=1500,
)
OPS = st.tuples(
    st.sampled_from(["open", "close", "step", "unstep", "bytes", "unbytes"]),
    st.sampled_from(["A", "B", "C"]),
    st.integers(0, 800),
)


@FUZZ
@given(st.lists(OPS, max_size=60))
def test_peer_quota_never_passes_a_cap(ops) -> None:
    """Against a plain model of what each peer holds: every refusal is at a cap and names it, every
    admission stays within all of them, and releases never go below zero."""
    quota = PeerQuota(QUOTA_LIMITS)
    held: dict[str, list[int]] = {"A": [], "B": [], "C": []}
    steps = {"A": 0, "B": 0, "C": 0}
    in_flight: dict[str, list[int]] = {"A": [], "B": [], "C": []}
    for op, peer, amount in ops:
        if op == "open":
            kv = amount % 70
            why = quota.refuse_session(peer, kv)
            over = (
                sum(map(len, held.values())) >= 5
                or len(held[peer]) >= 3
                or sum(held[peer]) + kv > QUOTA_LIMITS.max_kv_tokens_per_peer
            )
            assert (why is not None) == over, (why, held)
            if why is None:
                quota.add_session(peer, kv)
                held[peer].append(kv)
            else:
                assert peer in why or "sessions" in why
        elif op == "close" and held[peer]:
            quota.remove_session(peer, held[peer].pop())
        elif op == "step":
            why = quota.refuse_step(peer)
            assert (why is not None) == (steps[peer] >= 2)
            if why is None:
                quota.add_step(peer)
                steps[peer] += 1
        elif op == "unstep" and steps[peer]:
            quota.remove_step(peer)
            steps[peer] -= 1
        elif op == "bytes":
            why = quota.refuse_bytes(peer, amount)
            over = (
                sum(in_flight[peer]) + amount > QUOTA_LIMITS.max_bytes_in_flight_per_peer
                or sum(map(sum, in_flight.values())) + amount > QUOTA_LIMITS.max_bytes_in_flight
            )
            assert (why is not None) == over, (why, in_flight)
            if why is None:
                quota.add_bytes(peer, amount)
                in_flight[peer].append(amount)
        elif op == "unbytes" and in_flight[peer]:
            quota.remove_bytes(peer, in_flight[peer].pop())
        assert quota.sessions[peer] == len(held[peer]) and quota.kv_tokens[peer] == sum(held[peer])
        assert quota.bytes_in_flight[peer] == sum(in_flight[peer])
    with pytest.raises(RuntimeError, match="released more than taken"):
        quota.remove_step("nobody")


# --- node records, plans and the DHT validator ---------------------------------------------------


@pytest.fixture(scope="module")
def alice():
    identity = ephemeral_identity()
    yield identity
    identity.path.chmod(0o600)
    identity.path.unlink()


def record_or_error(read, value: Any) -> None:
    try:
        read(value)
    except RecordError as e:
        assert str(e) and "\n" not in str(e)


NODE_WIRE = node_record_to_wire(node(PEERS[0], layers=(0, 4), links=(link(PEERS[1]),)))


@FUZZ
@given(st.data())
def test_node_records_mutated_or_random(data: st.DataObject) -> None:
    value = data.draw(st.one_of(st.just(NODE_WIRE), VALUES))
    if isinstance(value, dict) and value:
        value = mutated(value, data.draw)
    record_or_error(node_record_from_wire, value)


@FUZZ
@given(st.data())
def test_plan_bodies_mutated_truncated_or_deep(data: st.DataObject) -> None:
    body = plan_body_bytes(plan(3, PEERS[0], {PEERS[0]: (0, 4), PEERS[1]: (4, 8)}))
    how = data.draw(st.sampled_from(["mutate", "truncate", "deep", "random"]))
    if how == "mutate":
        body = json.dumps(mutated(json.loads(body), data.draw), allow_nan=True).encode()
    elif how == "truncate":
        body = body[: data.draw(st.integers(0, len(body)))]
    elif how == "deep":
        body = data.draw(DEEP).encode()
    else:
        body = data.draw(st.binary(max_size=100))
    record_or_error(plan_record_from_body, body)


def test_an_oversized_plan_body_is_refused() -> None:
    with pytest.raises(RecordError, match="at most"):
        plan_record_from_body(b" " * (MAX_PLAN_RECORD_BYTES + 1))


@FUZZ
@given(st.data())
def test_signed_plans_mutated_or_random(alice, data: st.DataObject) -> None:
    signed = sign_plan(plan(3, alice.peer_id, {alice.peer_id: (0, 8)}), alice)
    wire = signed_plan_to_wire(signed)
    value = data.draw(st.one_of(st.just(dict(wire)), MSGPACK_VALUES))
    if isinstance(value, dict) and set(value) == set(wire):
        key = data.draw(st.sampled_from(sorted(wire)))
        original = bytearray(wire[key])
        if original and data.draw(st.booleans()):
            original[data.draw(st.integers(0, len(original) - 1))] ^= data.draw(st.integers(1, 255))
            value[key] = bytes(original)
        else:
            value[key] = data.draw(st.one_of(st.binary(max_size=64), VALUES))
    record_or_error(signed_plan_parts_from_wire, value)
    record_or_error(verify_plan, value)


def dht_record(key: str, subkey: bytes, value: bytes, ttl_s: float = 30) -> DHTRecord:
    return DHTRecord(
        key=key_id(key),
        subkey=DHTProtocol.serializer.dumps(subkey),
        value=value,
        expiration_time=get_dht_time() + ttl_s,
    )


@FUZZ
@given(st.data())
def test_the_validator_answers_false_and_never_raises(alice, data: st.DataObject) -> None:
    """A record under alice's owner subkey in her registry shard and the plan key: value bytes that
    are random, truncated msgpack, a schema-broken record or an oversized one are refused."""
    validator = SwarmRecordValidator(PREFIX)
    own = node_record_to_wire(node(alice.peer_id))
    how = data.draw(st.sampled_from(["random", "truncate", "mutate", "oversize", "deep", "plain-subkey"]))
    subkey = alice.owner_subkey
    if how == "random":
        value = data.draw(st.binary(max_size=200))
    elif how == "truncate":
        packed = DHTProtocol.serializer.dumps(own)
        value = packed[: data.draw(st.integers(0, len(packed) - 1))]
    elif how == "mutate":
        doc = (
            mutated(own, data.draw, MSGPACK_VALUES) if data.draw(st.booleans()) else data.draw(MSGPACK_VALUES)
        )
        value = msgpack.packb(doc, use_bin_type=True)
    elif how == "oversize":
        value = DHTProtocol.serializer.dumps(dict(own, name="x" * MAX_NODE_RECORD_BYTES))
    elif how == "deep":
        value = b"\x91" * data.draw(st.integers(1_000, 5_000)) + b"\xc0"
    else:
        value, subkey = DHTProtocol.serializer.dumps(own), data.draw(st.binary(max_size=30))
    key = data.draw(st.sampled_from([registry_key(PREFIX, alice.peer_id), plan_key(PREFIX)]))
    accepted = validator.validate(dht_record(key, subkey, value))
    if accepted:
        # only a record that parses, is alice's own and sits under her key passes
        assert key == registry_key(PREFIX, alice.peer_id) and subkey == alice.owner_subkey
        parsed = node_record_from_wire(DHTProtocol.serializer.loads(value))
        assert parsed.peer_id == alice.peer_id


def test_the_validator_accepts_the_honest_record(alice) -> None:
    validator = SwarmRecordValidator(PREFIX)
    value = DHTProtocol.serializer.dumps(node_record_to_wire(node(alice.peer_id, updated_at=get_dht_time())))
    assert validator.validate(dht_record(registry_key(PREFIX, alice.peer_id), alice.owner_subkey, value))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_hidden_states_are_refused(bad: float) -> None:
    hidden = torch.zeros(2, 8)
    hidden[1, 3] = bad
    with pytest.raises(MalformedMessageError, match="NaN or infinite"):
        decode_request(encode_request(Step("s1", 0, hidden_states=hidden)), LIMITS)


# --- the reachability dial-back handler ----------------------------------------------------------


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        DEEP.map(str.encode),
        st.lists(st.one_of(st.text(max_size=60), VALUES), max_size=10).map(lambda v: json.dumps(v).encode()),
    )
)
def test_reach_requests_get_a_verdict_or_a_refusal(body: bytes) -> None:
    """Whatever a peer asks, the dial-back handler answers a JSON verdict (it dials only the asker's
    own addresses, which random text never names)."""
    server = ReachServer()
    context = P2PContext(
        handle_name="reach", local_id=PeerID.from_base58(PEERS[0]), remote_id=PeerID.from_base58(PEERS[1])
    )
    reply = asyncio.run(server._check(BytesValue(value=body), context))
    verdict = json.loads(reply.value)
    assert set(verdict) == {"reachable", "detail", "answered"} and verdict["reachable"] is False


# --- the forward call, reports and the private swarm's seals ---------------------------------------


FORWARD = Forward(2, 4, hidden_states=torch.randn(3, 8))


@FUZZ
@given(st.data())
def test_forward_requests_mutated_or_random(data: st.DataObject) -> None:
    base = runtime_pb2.ExpertRequest.FromString(encode_forward(FORWARD))
    meta = json.loads(base.metadata)
    metadata = data.draw(
        st.one_of(st.just(json.dumps(mutated(meta, data.draw))), DEEP, st.text(max_size=40))
    ).encode()
    tensors = data.draw(
        st.one_of(st.just(list(base.tensors)), st.lists(st.one_of(TENSORS, matching_tensors()), max_size=2))
    )
    request = runtime_pb2.ExpertRequest(uid="forward", metadata=metadata, tensors=tensors)
    try:
        decoded = decode_forward(request, LIMITS)
    except MalformedMessageError:
        return
    assert isinstance(decoded, Forward)


@FUZZ
@given(st.data())
def test_forward_replies_truncated_flipped_or_random(data: st.DataObject) -> None:
    honest = forwarded_message(Forwarded(2, 4, torch.randn(3, 8), is_logits=False)).SerializeToString()
    raw = bytearray(data.draw(st.one_of(st.just(honest), st.binary(max_size=200))))
    if raw and data.draw(st.booleans()):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        reply = decode_forwarded(bytes(raw), FORWARD, 1 << 16)
    except MalformedMessageError:
        return
    assert isinstance(reply, (Forwarded, Failure))


REPORT_WIRE = report_to_wire(
    ReportRecord(PEERS[0], "tiny-llama", (Accusation(PEERS[1], 1000.0, "wrong logits"),))
)


@FUZZ
@given(st.data())
def test_reports_mutated_or_random(data: st.DataObject) -> None:
    value = data.draw(st.one_of(st.just(REPORT_WIRE), VALUES))
    if isinstance(value, dict) and value:
        value = mutated(value, data.draw)
    record_or_error(report_from_wire, value)


@FUZZ
@given(st.binary(max_size=120), st.binary(max_size=40))
def test_sealed_records_and_tags_refuse_what_they_cannot_open(value: bytes, subkey: bytes) -> None:
    key = parse_swarm_key(format_swarm_key(bytes(range(32))))
    record = DHTRecord(key=key_id("k"), subkey=subkey, value=value, expiration_time=get_dht_time() + 30)
    assert SealedRecordValidator(key).validate(record) is False
    with pytest.raises(SwarmAuthError):
        key.open("/helix/data/1", "request", PEERS[0], PEERS[1], value)
