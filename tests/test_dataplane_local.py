"""The serving side in one process, with real hivemind P2P daemons and real shards: two nodes
holding [0, 2) and [2, 4) of a tiny model and a client, all on one event loop. Covers what the
multi-process tests cannot reach from outside: the idle timeout (a controlled clock), per-peer
session limits, another peer's session, an oversized stream frame, raw channel frames, a leaving node's gate, layers
not held, and make-before-break (sessions stay on the shard they were opened on)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from dataplane_helpers import LoopThread
from helix_p2p.node.serving import DataPlane
from helix_p2p.node.sessions import SessionGate
from hivemind.p2p import P2P

from helix_p2p.protocol import (
    BusyError,
    DataPlaneLimits,
    Failure,
    LayersUnavailableError,
    MalformedMessageError,
    RouteHop,
    SessionNotFoundError,
    Step,
)
from helix_p2p.protocol.driver import RemoteSession, generate
from helix_p2p.protocol.transport import CHANNEL_PROTOCOL, STREAM_PROTOCOL, call_peer, read_frame
from helix_p2p.protocol.wire import decode_reply, encode_request
from helix_p2p.shard import LocalChain, Shard, ShardSpec, TinyModelSpec, load_shard, make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SPEC = TinyModelSpec(num_layers=4, initializer_range=0.1)
IDLE_S = 60.0


@dataclass
class Env:
    loop: LoopThread
    model: Path
    planes: list[DataPlane]
    p2ps: list[P2P]
    #: the shards each plane serves (mutable: a test may switch them)
    shards: list[list[Shard]]
    #: seconds added to the planes' clock
    offset: list[float]
    chain: LocalChain

    def route(self) -> list[RouteHop]:
        return [RouteHop(self.planes[0].peer_id, 0, 2), RouteHop(self.planes[1].peer_id, 2, 4)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    import time

    model = make_tiny_model(tmp_path_factory.mktemp("dataplane-local") / "llama", SPEC)
    shards = [
        [load_shard(ShardSpec(str(model), 0, 2))],
        [load_shard(ShardSpec(str(model), 2, 4, max_kv_tokens=200))],
    ]
    offset = [0.0]
    client = LoopThread([])
    limits = DataPlaneLimits(max_sessions_per_peer=3, idle_timeout_s=IDLE_S)

    async def build() -> tuple[list[DataPlane], list[P2P]]:
        first = await P2P.create()
        maddrs = [f"{m}/p2p/{first.peer_id.to_base58()}" for m in await first.get_visible_maddrs()]
        second = await P2P.create(initial_peers=maddrs)
        planes = [
            DataPlane(p2p, (lambda s=s: s), limits, clock=lambda: time.monotonic() + offset[0])
            for p2p, s in ((first, shards[0]), (second, shards[1]))
        ]
        for plane in planes:
            await plane.start()
        await client.p2p.shutdown()
        client.p2p = await P2P.create(initial_peers=maddrs)
        return planes, [first, second]

    planes, p2ps = client.run(build())
    chain = LocalChain([load_shard(ShardSpec(str(model), a, b)) for a, b in ((0, 2), (2, 4))])
    try:
        yield Env(client, model, planes, p2ps, shards, offset, chain)
    finally:

        async def teardown() -> None:
            for plane in planes:
                await plane.close()
            for p2p in p2ps:
                await p2p.shutdown()

        client.run(teardown())
        client.close()


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, SPEC.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_idle_sessions_are_closed_by_the_reaper(env: Env) -> None:
    async def scenario() -> None:
        session = await RemoteSession.open(env.loop.p2p, env.route(), 32)
        await session.step(ids(5, 1))
        assert await env.planes[0].reap() == []
        env.offset[0] += IDLE_S + 1
        try:
            assert await env.planes[0].reap() == [session.session_id]
            assert await env.planes[1].reap() == [session.session_id]
        finally:
            env.offset[0] -= IDLE_S + 1
        assert all(s.session_id != session.session_id for s in env.shards[0][0].sessions())
        with pytest.raises(SessionNotFoundError):
            await session.step([4])

    env.loop.run(scenario())


def test_per_peer_session_limit(env: Env) -> None:
    async def scenario() -> None:
        opened = [await RemoteSession.open(env.loop.p2p, env.route(), 16) for _ in range(3)]
        with pytest.raises(BusyError, match="limit of 3 sessions"):
            await RemoteSession.open(env.loop.p2p, env.route(), 16)
        await opened.pop().close()
        opened.append(await RemoteSession.open(env.loop.p2p, env.route(), 16))
        for session in opened:
            await session.close()

    env.loop.run(scenario())


def test_a_session_answers_only_the_peer_that_opened_it(env: Env) -> None:
    async def scenario() -> None:
        session = await RemoteSession.open(env.loop.p2p, env.route(), 16)
        step = Step(session.session_id, 0, token_ids=torch.tensor([5, 6]))
        reply = await call_peer(env.p2ps[1], env.planes[0].peer_id, encode_request(step), 30)
        assert isinstance(reply, Failure)
        with pytest.raises(SessionNotFoundError, match="not open"):
            raise reply.exception()
        await session.step([5, 6])  # the owner still can
        await session.close()

    env.loop.run(scenario())


def test_an_oversized_stream_frame_is_refused_before_reading(env: Env) -> None:
    async def scenario() -> None:
        peer = env.p2ps[0].peer_id
        _, reader, writer = await env.loop.p2p.call_binary_stream_handler(peer, STREAM_PROTOCOL)
        writer.write((1 << 40).to_bytes(8, "big"))
        await writer.drain()
        reply = decode_reply(await read_frame(reader, 1 << 16))
        writer.close()
        with pytest.raises(MalformedMessageError, match="passes the"):
            raise reply.exception()
        prompt = ids(6, 2)
        assert await generate(env.loop.p2p, env.route(), prompt, 5) == env.chain.generate(prompt, 5)

    env.loop.run(scenario())


def test_a_channel_answers_each_call_by_its_id_and_drops_an_oversized_frame(env: Env) -> None:
    from helix_p2p.protocol import CloseSession

    def frame(call_id: int, body: bytes) -> bytes:
        data = call_id.to_bytes(8, "big") + body
        return len(data).to_bytes(8, "big") + data

    async def scenario() -> None:
        peer = env.p2ps[0].peer_id
        _, reader, writer = await env.loop.p2p.call_binary_stream_handler(peer, CHANNEL_PROTOCOL)
        writer.write(frame(7, b"not a protobuf") + frame(3, encode_request(CloseSession("nobody-here"))))
        await writer.drain()
        replies = {}
        for _ in range(2):
            data = await read_frame(reader, 1 << 16)
            replies[int.from_bytes(data[:8], "big")] = decode_reply(data[8:])
        assert set(replies) == {3, 7}
        with pytest.raises(MalformedMessageError, match="not an ExpertRequest"):
            raise replies[7].exception()
        with pytest.raises(SessionNotFoundError, match="nobody-here"):
            raise replies[3].exception()
        writer.write((1 << 40).to_bytes(8, "big"))  # over the cap: the node ends this stream unread
        await writer.drain()
        assert await reader.read() == b""
        writer.close()
        prompt = ids(6, 3)  # everyone else's channels go on
        assert await generate(env.loop.p2p, env.route(), prompt, 5) == env.chain.generate(prompt, 5)

    env.loop.run(scenario())


def test_wrong_routes_are_refused(env: Env) -> None:
    async def scenario() -> None:
        a, b = env.planes[0].peer_id, env.planes[1].peer_id
        with pytest.raises(MalformedMessageError, match="names peer"):
            await call_and_raise(env, a, [RouteHop(b, 0, 2), RouteHop(a, 2, 4)])
        with pytest.raises(LayersUnavailableError, match=r"holds \[0, 2\), not layers \[0, 3\)"):
            await RemoteSession.open(env.loop.p2p, [RouteHop(a, 0, 3), RouteHop(b, 3, 4)], 8)
        with pytest.raises(MalformedMessageError, match="the model has 4 layers"):
            await RemoteSession.open(env.loop.p2p, [RouteHop(a, 0, 2), RouteHop(b, 2, 3)], 8)

    env.loop.run(scenario())


async def call_and_raise(env: Env, peer: str, route: list[RouteHop]) -> None:
    from helix_p2p.protocol import OpenSession

    reply = await call_peer(
        env.loop.p2p, peer, encode_request(OpenSession("wrong-route", tuple(route), 8)), 30
    )
    assert isinstance(reply, Failure)
    raise reply.exception()


def test_a_leaving_node_opens_nothing_and_counts_its_sessions(env: Env) -> None:
    plane = env.planes[0]
    assert plane.num_sessions == 0
    plane.gate = gate = SessionGate()  # the node's own admission gate, fresh for this test
    try:

        async def scenario() -> None:
            session = await RemoteSession.open(env.loop.p2p, env.route(), 16)
            assert gate.running == 1
            gate.close()  # the node is leaving
            with pytest.raises(BusyError, match="leaving"):
                await RemoteSession.open(env.loop.p2p, env.route(), 16)
            await session.step([7, 8, 9])  # running sessions go on
            await session.close()
            assert gate.running == 0

        env.loop.run(scenario())
    finally:
        plane.gate = None


def test_sessions_stay_on_their_shard_when_the_node_switches(env: Env) -> None:
    prompt = ids(9, 3)
    expected = env.chain.generate(prompt, 8)

    async def scenario() -> None:
        old = env.shards[0][0]
        session = await RemoteSession.open(env.loop.p2p, env.route(), len(prompt) + 8)
        tokens = [(await session.step(prompt)).token_id]
        new = load_shard(ShardSpec(str(env.model), 0, 2))
        env.shards[0][:] = [new]  # the node now serves a freshly loaded copy
        later = await RemoteSession.open(env.loop.p2p, env.route(), 16)
        assert [s.session_id for s in new.sessions()] == [later.session_id]
        while len(tokens) < 8:
            tokens.append((await session.step([tokens[-1]])).token_id)
        assert tokens == expected
        assert session.session_id in [s.session_id for s in old.sessions()]
        await session.close()
        await later.close()

    env.loop.run(scenario())
