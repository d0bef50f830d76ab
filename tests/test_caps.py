"""Per-peer caps on a live node: one standalone server (`serve_cmd`, a real process) holding all four
layers of a tiny model, and three clients, each its own hivemind peer (so its own peer id).

A greedy peer opens 2,000 sessions: past its cap of sessions every open is refused busy, naming
the cap, while another peer is still served and generates the tokens of one process; the node's
session table and KV use stay at what the caps allow (read from the node's own busy answer to a
third peer, which reports its free KV and open sessions). A peer past its KV positions is refused,
naming that cap. A peer that announces stream frames past its bytes in flight is refused before
the body is read, and admitted again once its earlier stream is gone."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import torch
from dataplane_helpers import LoopThread, Server, start_servers
from hivemind.p2p import PeerID
from procs import Processes

from helix_p2p.protocol import BusyError, Failure, Opened, OpenSession, RouteHop, decode_reply, encode_request
from helix_p2p.protocol.driver import generate
from helix_p2p.protocol.transport import FRAME_HEADER_BYTES, STREAM_PROTOCOL, call_peer, read_frame
from helix_p2p.protocol.wire import MAX_REPLY_BYTES
from helix_p2p.shard import LocalChain, ShardSpec, TinyModelSpec, load_shard, make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

SPEC = TinyModelSpec(num_layers=4, initializer_range=0.1)
KV_BUDGET = 4000
SESSIONS_PER_PEER = 8
KV_PER_PEER = 2000
BYTES_PER_PEER = 1_000_000
GREEDY_OPENS = 2000
#: what 2,000 refused opens may add to the node's resident memory (it measures a few MiB)
MAX_RSS_GROWTH_BYTES = 100 << 20
GREEDY_LENGTH = 16
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("caps") / "llama", SPEC)


@pytest.fixture(scope="module")
def node(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, list[LoopThread]]]:
    with Processes(tmp_path_factory.mktemp("caps-procs")) as procs:
        caps = ("--max-kv-tokens", str(KV_BUDGET), "--max-sessions-per-peer", str(SESSIONS_PER_PEER),
                "--max-kv-tokens-per-peer", str(KV_PER_PEER),
                "--max-bytes-in-flight-per-peer", str(BYTES_PER_PEER), "--threads", "1")  # fmt: skip
        (server,) = start_servers(procs, model_dir, [(0, SPEC.num_layers)], [caps])
        clients = [LoopThread([server.maddr]) for _ in range(3)]
        try:
            yield server, clients
        finally:
            for client in clients:
                client.close()
            assert server.proc.alive(), f"the node died:\n{procs.report()}"


def resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024


def route(server: Server) -> tuple[RouteHop, ...]:
    return (RouteHop(server.peer_id, 0, SPEC.num_layers),)


def test_a_peer_opening_thousands_of_sessions_is_capped_while_others_are_served(
    node, model_dir: Path
) -> None:
    server, (greedy, other, probe) = node

    async def open_many() -> list[object]:
        async def one(i: int) -> object:
            message = OpenSession(f"greedy-{i}", route(server), GREEDY_LENGTH)
            return await call_peer(greedy.p2p, server.peer_id, encode_request(message), TIMEOUT_S)

        replies: list[object] = []
        for chunk in range(0, GREEDY_OPENS, 100):  # 100 in flight at a time
            replies += await asyncio.gather(*(one(i) for i in range(chunk, chunk + 100)))
        return replies

    rss_before = resident_bytes(server.proc.pid)
    replies = greedy.run(open_many(), timeout_s=400)
    growth = resident_bytes(server.proc.pid) - rss_before
    print(f"node RSS grew by {growth / (1 << 20):.1f} MiB over {GREEDY_OPENS} opens")
    assert growth < MAX_RSS_GROWTH_BYTES
    opened = [r for r in replies if isinstance(r, Opened)]
    refused = [r for r in replies if isinstance(r, Failure)]
    assert len(opened) == SESSIONS_PER_PEER and len(refused) == GREEDY_OPENS - SESSIONS_PER_PEER
    for failure in refused:
        error = failure.exception()
        assert isinstance(error, BusyError) and error.peer_id == server.peer_id
        assert f"already holds its limit of {SESSIONS_PER_PEER} sessions here" in str(error)

    # another peer is served, with the right tokens
    ids = torch.randint(3, SPEC.vocab_size, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    chain = LocalChain([load_shard(ShardSpec(str(model_dir), 0, SPEC.num_layers))])
    assert other.run(generate(other.p2p, route(server), ids, 6)) == chain.generate(ids, 6)

    # the other peer holds a large session; a third peer's open that no longer fits is refused by
    # the KV budget, and the refusal reports the node's session table and free KV: at the caps
    big = OpenSession("other-big", route(server), KV_PER_PEER - 100)
    assert isinstance(other.run(call_peer(other.p2p, server.peer_id, encode_request(big), TIMEOUT_S)), Opened)
    ask = OpenSession("probe", route(server), KV_PER_PEER)
    reply = probe.run(call_peer(probe.p2p, server.peer_id, encode_request(ask), TIMEOUT_S))
    assert isinstance(reply, Failure), reply
    used = SESSIONS_PER_PEER * GREEDY_LENGTH + (KV_PER_PEER - 100)
    found = re.search(
        r"(\d+) of its KV budget of (\d+) positions are free \((\d+) sessions open\)", reply.message
    )
    assert found, reply.message
    assert (int(found[1]), int(found[2]), int(found[3])) == (
        KV_BUDGET - used,
        KV_BUDGET,
        SESSIONS_PER_PEER + 1,
    )


def test_a_peer_past_its_kv_positions_is_refused_naming_the_cap(node) -> None:
    server, (_, other, _) = node
    # "other" holds KV_PER_PEER - 100 positions from the test above (or none when run alone)
    ask = OpenSession("other-more", route(server), KV_PER_PEER + 1)
    reply = other.run(call_peer(other.p2p, server.peer_id, encode_request(ask), TIMEOUT_S))
    assert isinstance(reply, Failure), reply
    with pytest.raises(BusyError, match=f"over its limit of {KV_PER_PEER} per peer"):
        raise reply.exception()


def test_stream_bytes_in_flight_are_capped_before_the_body_is_read(node) -> None:
    server, (greedy, other, _) = node
    peer = PeerID.from_base58(server.peer_id)
    announced = BYTES_PER_PEER * 6 // 10  # two of these pass the cap together

    async def scenario() -> None:
        # a stream that announces its frame and sends only part of it: its bytes stay reserved
        _, _, held = await greedy.p2p.call_binary_stream_handler(peer, STREAM_PROTOCOL)
        held.write(announced.to_bytes(FRAME_HEADER_BYTES, "big") + bytes(1000))
        await held.drain()
        await asyncio.sleep(1.0)  # let the node take the first header before the second arrives
        _, reader, writer = await greedy.p2p.call_binary_stream_handler(peer, STREAM_PROTOCOL)
        with closing(writer):
            writer.write(announced.to_bytes(FRAME_HEADER_BYTES, "big"))
            await writer.drain()
            reply = decode_reply(await asyncio.wait_for(read_frame(reader, MAX_REPLY_BYTES), TIMEOUT_S))
        assert isinstance(reply, Failure), reply
        with pytest.raises(BusyError, match=f"over its limit of {BYTES_PER_PEER} bytes per peer"):
            raise reply.exception()
        # another peer streams meanwhile: its frame is read and answered (malformed garbage, not busy)
        _, reader, writer = await other.p2p.call_binary_stream_handler(peer, STREAM_PROTOCOL)
        with closing(writer):
            writer.write(announced.to_bytes(FRAME_HEADER_BYTES, "big") + b"\xff" * announced)
            await writer.drain()
            reply = decode_reply(await asyncio.wait_for(read_frame(reader, MAX_REPLY_BYTES), TIMEOUT_S))
        assert isinstance(reply, Failure) and reply.code.value == "malformed", reply
        # the first stream hangs up: its reservation is released and the same frame is read again
        held.close()
        await asyncio.sleep(1.0)
        _, reader, writer = await greedy.p2p.call_binary_stream_handler(peer, STREAM_PROTOCOL)
        with closing(writer):
            writer.write(announced.to_bytes(FRAME_HEADER_BYTES, "big") + b"\xff" * announced)
            await writer.drain()
            reply = decode_reply(await asyncio.wait_for(read_frame(reader, MAX_REPLY_BYTES), TIMEOUT_S))
        assert isinstance(reply, Failure) and reply.code.value == "malformed", reply

    greedy.run(scenario())
