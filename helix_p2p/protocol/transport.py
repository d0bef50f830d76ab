"""Moving data-plane messages between peers over hivemind's P2P (libp2p), used by both the client
driver and the serving nodes.

A message up to `UNARY_MAX_BYTES` goes as one unary call on the daemon's persistent connection
(the fastest path hivemind has; it is capped at 4 MiB per message). A larger one, the hidden states
of a long prompt, goes over its own libp2p stream instead: a length-prefixed frame written in
64 KiB chunks, answered by a length-prefixed reply. The receiving side reads the length first and
refuses a frame over its request limit before reading the body, so a stranger cannot make it buffer
more than that."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import closing

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from helix_p2p.protocol.errors import HopUnreachableError, MalformedMessageError
from helix_p2p.protocol.messages import Reply
from helix_p2p.protocol.sealing import open_expert_response, seal_expert_request
from helix_p2p.protocol.wire import MAX_REPLY_BYTES, decode_reply
from helix_p2p.swarm.swarm_key import TAG_BYTES, SwarmAuthError, open_reply, seal_request

UNARY_PROTOCOL = "/helix/data/1"
STREAM_PROTOCOL = "/helix/data-stream/1"
#: requests above this go over a stream (the daemon's unary cap is 4 MiB including its envelope)
UNARY_MAX_BYTES = 3 * 1024 * 1024
FRAME_HEADER_BYTES = 8
CHUNK_BYTES = 64 * 1024


async def write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(len(data).to_bytes(FRAME_HEADER_BYTES, "big"))
    view = memoryview(data)
    for offset in range(0, len(view), CHUNK_BYTES):
        writer.write(view[offset : offset + CHUNK_BYTES])
        await writer.drain()
    await writer.drain()


async def read_frame(
    reader: asyncio.StreamReader, max_bytes: int, admit: Callable[[int], None] | None = None
) -> bytes:
    """One frame; `MalformedMessageError` if it announces more than `max_bytes`. `admit(size)` is
    called before the body is read (a receiver's per-peer byte cap: it raises to refuse)."""
    size = int.from_bytes(await reader.readexactly(FRAME_HEADER_BYTES), "big")
    if size > max_bytes:
        raise MalformedMessageError(f"a frame of {size} bytes passes the {max_bytes}-byte limit")
    if admit is not None:
        admit(size)
    return await reader.readexactly(size)


async def call_peer(p2p: P2P, peer_id: str, request: bytes, timeout_s: float) -> Reply:
    """Send an encoded request to `peer_id` and decode its reply (which may be a `Failure`).
    Raises `HopUnreachableError` when the peer does not answer in time or the call breaks."""
    data = await exchange(p2p, peer_id, request, timeout_s)
    try:
        return decode_reply(data)
    except MalformedMessageError as e:
        raise MalformedMessageError(f"peer {peer_id} sent a bad reply: {e}", peer_id) from None


async def exchange(
    p2p: P2P, peer_id: str, request: bytes, timeout_s: float, *, max_reply_bytes: int = MAX_REPLY_BYTES
) -> bytes:
    """Send an encoded request and return the reply's bytes, undecoded. A reply that may pass the
    unary cap (a forward's hidden states) is read over a stream, capped at `max_reply_bytes`."""
    try:
        peer = PeerID.from_base58(peer_id)
    except ValueError as e:
        raise MalformedMessageError(f"{peer_id!r} is not a peer id ({e})") from None
    try:
        async with asyncio.timeout(timeout_s):
            if len(request) <= UNARY_MAX_BYTES and max_reply_bytes <= UNARY_MAX_BYTES:
                response = await p2p.call_protobuf_handler(
                    peer,
                    UNARY_PROTOCOL,
                    seal_expert_request(p2p, UNARY_PROTOCOL, peer_id, request),
                    runtime_pb2.ExpertResponse,
                )
                data = open_expert_response(p2p, UNARY_PROTOCOL, peer_id, response.SerializeToString())
            else:
                _, reader, writer = await p2p.call_binary_stream_handler(peer, STREAM_PROTOCOL)
                with closing(writer):
                    await write_frame(writer, seal_request(p2p, STREAM_PROTOCOL, peer_id, request))
                    sealed = await read_frame(reader, max_reply_bytes + TAG_BYTES)
                    data = open_reply(p2p, STREAM_PROTOCOL, peer_id, sealed)
    except TimeoutError:
        raise HopUnreachableError(f"peer {peer_id} did not answer within {timeout_s:g} s", peer_id) from None
    except (P2PDaemonError, P2PHandlerError, ConnectionError, asyncio.IncompleteReadError, OSError) as e:
        raise HopUnreachableError(f"call to peer {peer_id} failed: {str(e)[:300]}", peer_id) from None
    except (MalformedMessageError, SwarmAuthError) as e:
        raise MalformedMessageError(f"peer {peer_id} sent a bad reply: {e}", peer_id) from None
    return data
