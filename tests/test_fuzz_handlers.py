"""Fuzzing the data-plane handlers of live nodes: two standalone servers (`serve_cmd`, real processes,
real hivemind P2P) holding [0, 2) and [2, 4) of a tiny model, and a client in the test process that
talks to the handlers raw.

Batches of hypothesis-generated requests go to the unary handler and the persistent channel (valid messages with keys replaced,
removed or added, arbitrary tensor headers, unknown kinds) and raw frames to the stream handler
(random bodies, valid encodings cut or with bytes flipped, frames announcing more than the limit,
oversized metadata, frames cut off by a hang-up). Each answered request gets an error reply that
decodes and names the problem within the timeout (no hang, no dropped call); afterwards both nodes
are alive, logged no internal error, and a normal session on them still generates the tokens of one
process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import torch
from dataplane_helpers import LoopThread, Server, start_servers
from fuzz_strategies import DEEP, TENSORS, matching_tensors, mutated
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from procs import Processes

from helix_p2p.protocol import (
    CloseSession,
    ErrorCode,
    Failure,
    MalformedMessageError,
    Opened,
    OpenSession,
    RouteHop,
    SequenceTooLongError,
    Step,
    decode_reply,
    encode_request,
)
from helix_p2p.protocol.driver import RemoteSession, generate
from helix_p2p.protocol.transport import (
    CALL_ID_BYTES,
    CHANNEL_MAX_FRAME_BYTES,
    CHANNEL_PROTOCOL,
    FRAME_HEADER_BYTES,
    STREAM_PROTOCOL,
    UNARY_PROTOCOL,
    call_peer,
    read_frame,
)
from helix_p2p.protocol.wire import MAX_METADATA_BYTES, MAX_REPLY_BYTES
from helix_p2p.shard import LocalChain, ShardSpec, TinyModelSpec, load_shard, make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

SPEC = TinyModelSpec(num_layers=4, initializer_range=0.1)
RANGES = ((0, 2), (2, 4))
MAX_STEP_TOKENS = 256
#: a node that takes longer than this to answer a bad message counts as hung
REPLY_TIMEOUT_S = 30.0
#: no shrinking (each example is network calls) and no example database (the nodes are new each run)
LIVE = settings(
    max_examples=10,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: what a refusal may say: anything but "internal" (a bug) or "unreachable" (a hop that hung)
REFUSALS = {
    ErrorCode.MALFORMED,
    ErrorCode.UNKNOWN_SESSION,
    ErrorCode.SESSION_EXISTS,
    ErrorCode.TOO_LONG,
    ErrorCode.BUSY,
    ErrorCode.LAYERS,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("fuzz-handlers") / "llama", SPEC)


@pytest.fixture(scope="module")
def swarm(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[Server], LoopThread]]:
    with Processes(tmp_path_factory.mktemp("fuzz-handlers-procs")) as procs:
        extra = [("--max-step-tokens", str(MAX_STEP_TOKENS), "--threads", "1")] * len(RANGES)
        servers = start_servers(procs, model_dir, RANGES, extra)
        client = LoopThread([servers[0].maddr])
        try:
            yield servers, client
        finally:
            client.close()


@pytest.fixture(scope="module")
def chain(model_dir: Path) -> LocalChain:
    return LocalChain([load_shard(ShardSpec(str(model_dir), a, b)) for a, b in RANGES])


def route_of(servers: list[Server]) -> tuple[RouteHop, ...]:
    return tuple(RouteHop(s.peer_id, s.start, s.end) for s in servers)


def base_requests(servers: list[Server]) -> list[runtime_pb2.ExpertRequest]:
    route = route_of(servers)
    messages = [
        OpenSession("fz-open", route, 32),
        OpenSession("fz-open-1", route, 32, hop_index=1),
        Step("fz-step", 0, token_ids=torch.arange(3)),
        Step("fz-step", 4, hidden_states=torch.randn(2, SPEC.hidden_size)),
        CloseSession("fz-close"),
    ]
    return [runtime_pb2.ExpertRequest.FromString(encode_request(m)) for m in messages]


@st.composite
def hostile_requests(draw: st.DrawFn, bases: list[runtime_pb2.ExpertRequest]) -> runtime_pb2.ExpertRequest:
    base = draw(st.sampled_from(bases))
    kind = draw(st.sampled_from([base.uid] * 3 + ["open", "step", "close", "forward", "", "\x00" * 3]))
    meta = json.loads(base.metadata)
    how = draw(st.sampled_from(["mutate", "mutate", "deep", "garbage", "oversized"]))
    if how == "mutate":
        metadata = json.dumps(mutated(meta, draw)).encode()
    elif how == "deep":
        metadata = draw(DEEP).encode()
    elif how == "garbage":
        metadata = draw(st.binary(max_size=64))
    else:
        metadata = json.dumps(dict(meta, pad="x" * MAX_METADATA_BYTES)).encode()
    tensors = draw(
        st.one_of(st.just(list(base.tensors)), st.lists(st.one_of(TENSORS, matching_tensors()), max_size=2))
    )
    return runtime_pb2.ExpertRequest(uid=kind, metadata=metadata, tensors=tensors)


def check_refusal(reply: object) -> None:
    """A clear error reply: a decoded Failure with a known refusal code and a one-line message."""
    assert isinstance(reply, (Failure, Opened)), reply
    if isinstance(reply, Failure):
        assert reply.code in REFUSALS, reply
        assert reply.message and "\n" not in reply.message and "Traceback" not in reply.message


async def send_unary(client: LoopThread, peer: str, request: runtime_pb2.ExpertRequest) -> object:
    response = await asyncio.wait_for(
        client.p2p.call_protobuf_handler(
            PeerID.from_base58(peer), UNARY_PROTOCOL, request, runtime_pb2.ExpertResponse
        ),
        REPLY_TIMEOUT_S,
    )
    return decode_reply(response.SerializeToString())


async def send_frame(client: LoopThread, peer: str, frame: bytes, *, hang_up: bool) -> object:
    """Write raw bytes on a new data stream; read the reply frame, or hang up without one."""
    _, reader, writer = await client.p2p.call_binary_stream_handler(PeerID.from_base58(peer), STREAM_PROTOCOL)
    with closing(writer):
        writer.write(frame)
        await writer.drain()
        if hang_up:
            return None
        data = await asyncio.wait_for(read_frame(reader, MAX_REPLY_BYTES), REPLY_TIMEOUT_S)
    return decode_reply(data)


async def close_if_opened(client: LoopThread, peer: str, reply: object) -> None:
    if isinstance(reply, Opened):  # a mutation that left an open valid: tidy up
        await call_peer(client.p2p, peer, encode_request(CloseSession(reply.session_id)), REPLY_TIMEOUT_S)


@LIVE
@given(data=st.data())
def test_fuzzed_unary_requests_get_error_replies(swarm, data: st.DataObject) -> None:
    servers, client = swarm
    batch = data.draw(st.lists(hostile_requests(base_requests(servers)), min_size=4, max_size=6))
    peer = data.draw(st.sampled_from([s.peer_id for s in servers]))

    async def all_at_once() -> list[object]:
        replies = await asyncio.gather(*(send_unary(client, peer, r) for r in batch))
        for reply in replies:
            await close_if_opened(client, peer, reply)
        return replies

    for reply in client.run(all_at_once()):
        check_refusal(reply)


@st.composite
def hostile_frames(draw: st.DrawFn, bases: list[runtime_pb2.ExpertRequest]) -> tuple[bytes, bool]:
    """(frame, hang_up): a frame to answer, or one cut short after which the sender hangs up."""
    encoded = draw(st.sampled_from(bases)).SerializeToString()
    how = draw(st.sampled_from(["random", "cut", "flip", "huge-header", "structured", "hang-up"]))
    if how == "random":
        body = draw(st.binary(max_size=300))
    elif how == "cut":
        body = encoded[: draw(st.integers(0, len(encoded) - 1))]
    elif how == "flip":
        body = bytearray(encoded)
        for _ in range(draw(st.integers(1, 4))):
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
        body = bytes(body)
    elif how == "structured":
        body = draw(hostile_requests(bases)).SerializeToString()
    elif how == "huge-header":
        size = draw(st.sampled_from([2**29, 2**40, 2**64 - 1]))  # past any node's max_request_bytes
        return size.to_bytes(FRAME_HEADER_BYTES, "big") + draw(st.binary(max_size=16)), False
    else:
        body = draw(st.binary(max_size=64))
        cut = draw(st.integers(0, FRAME_HEADER_BYTES + len(body)))
        frame = (len(body) + draw(st.integers(1, 100))).to_bytes(FRAME_HEADER_BYTES, "big") + body
        return frame[:cut], True
    return len(body).to_bytes(FRAME_HEADER_BYTES, "big") + body, False


@LIVE
@given(data=st.data())
def test_fuzzed_stream_frames_get_error_replies(swarm, data: st.DataObject) -> None:
    servers, client = swarm
    batch = data.draw(st.lists(hostile_frames(base_requests(servers)), min_size=4, max_size=6))
    peer = data.draw(st.sampled_from([s.peer_id for s in servers]))

    async def all_at_once() -> list[object]:
        replies = await asyncio.gather(*(send_frame(client, peer, f, hang_up=h) for f, h in batch))
        for reply in replies:
            await close_if_opened(client, peer, reply)
        return replies

    for (_, hung_up), reply in zip(batch, client.run(all_at_once())):
        if hung_up:
            assert reply is None
        else:
            check_refusal(reply)


@LIVE
@given(data=st.data())
def test_fuzzed_channel_frames_get_error_replies(swarm, data: st.DataObject) -> None:
    """The persistent channel: many calls on one stream, each a call id and a request; every call
    gets its own reply frame with its call id, and a frame past the channel's cap ends the channel."""
    servers, client = swarm
    bases = base_requests(servers)
    bodies = data.draw(
        st.lists(
            st.one_of(
                st.binary(max_size=200),
                hostile_requests(bases).map(runtime_pb2.ExpertRequest.SerializeToString),
                st.sampled_from(bases).map(
                    lambda r: r.SerializeToString()[: len(r.SerializeToString()) // 2]
                ),
            ),
            min_size=3,
            max_size=6,
        )
    )
    oversized_last = data.draw(st.booleans())
    peer = PeerID.from_base58(data.draw(st.sampled_from([s.peer_id for s in servers])))

    async def scenario() -> dict[bytes, object]:
        _, reader, writer = await client.p2p.call_binary_stream_handler(peer, CHANNEL_PROTOCOL)
        with closing(writer):
            for i, body in enumerate(bodies):
                frame = i.to_bytes(CALL_ID_BYTES, "big") + body
                writer.write(len(frame).to_bytes(FRAME_HEADER_BYTES, "big") + frame)
            if oversized_last:
                writer.write((CHANNEL_MAX_FRAME_BYTES + 1).to_bytes(FRAME_HEADER_BYTES, "big"))
            await writer.drain()
            replies = {}
            for _ in bodies:
                frame = await asyncio.wait_for(read_frame(reader, MAX_REPLY_BYTES + 64), REPLY_TIMEOUT_S)
                replies[frame[:CALL_ID_BYTES]] = decode_reply(frame[CALL_ID_BYTES:])
            if oversized_last:  # the node ends the channel: end of stream, not a hang
                with pytest.raises(asyncio.IncompleteReadError):
                    await asyncio.wait_for(read_frame(reader, MAX_REPLY_BYTES), REPLY_TIMEOUT_S)
        for reply in replies.values():
            await close_if_opened(client, peer.to_base58(), reply)
        return replies

    replies = client.run(scenario())
    assert sorted(replies) == [i.to_bytes(CALL_ID_BYTES, "big") for i in range(len(bodies))]
    for reply in replies.values():
        check_refusal(reply)


def test_hostile_tensors_in_a_live_session_are_refused(swarm) -> None:
    """A session the client opened on the last hop itself (so it may send hidden states there)."""
    servers, client = swarm
    route, last = route_of(servers), servers[1].peer_id

    async def scenario() -> None:
        opened = await call_peer(
            client.p2p, last, encode_request(OpenSession("fz-live", route, 64, hop_index=1)), REPLY_TIMEOUT_S
        )
        assert isinstance(opened, Opened), opened

        async def step(hidden: torch.Tensor, position: int = 0) -> object:
            message = encode_request(Step("fz-live", position, hidden_states=hidden))
            return await call_peer(client.p2p, last, message, REPLY_TIMEOUT_S)

        nan = torch.zeros(2, SPEC.hidden_size)
        nan[0, 0] = float("nan")
        cases = [
            (nan, MalformedMessageError, "NaN or infinite"),
            (torch.zeros(2, SPEC.hidden_size + 1), MalformedMessageError, "hidden"),
            (
                torch.zeros(MAX_STEP_TOKENS + 1, SPEC.hidden_size),
                MalformedMessageError,
                "a step carries 1 to",
            ),
            (torch.zeros(65, SPEC.hidden_size), SequenceTooLongError, "max_length 64"),
        ]
        for hidden, error, match in cases:
            reply = await step(hidden)
            assert isinstance(reply, Failure), reply
            with pytest.raises(error, match=match):
                raise reply.exception()
        reply = await step(torch.randn(3, SPEC.hidden_size))
        assert not isinstance(reply, Failure), reply
        await call_peer(client.p2p, last, encode_request(CloseSession("fz-live")), REPLY_TIMEOUT_S)

    client.run(scenario())


def test_the_nodes_survive_and_still_generate_correctly(swarm, chain: LocalChain) -> None:
    servers, client = swarm
    ids = torch.randint(3, SPEC.vocab_size, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    assert client.run(generate(client.p2p, route_of(servers), ids, 8)) == chain.generate(ids, 8)

    # a session stepped by hand on the same nodes continues across steps too
    async def stepwise() -> list[int]:
        async with await RemoteSession.open(client.p2p, route_of(servers), 20) as session:
            return await session.generate(ids, 4)

    assert client.run(stepwise()) == chain.generate(ids, 4)
    for server in servers:
        assert server.proc.alive(), f"{server.proc.name} died:\n{server.proc.stderr()[-3000:]}"
        log = server.proc.stderr()
        assert "Traceback" not in log and "failed on a" not in log, log[-3000:]
