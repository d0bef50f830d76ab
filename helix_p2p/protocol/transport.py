"""Moving data-plane messages between peers over hivemind's P2P (libp2p), used by both the client
driver and the serving nodes.

A message up to `UNARY_MAX_BYTES` goes as one unary call on the daemon's persistent connection
(the fastest path hivemind has; it is capped at 4 MiB per message). A larger one, the hidden states
of a long prompt, goes over its own libp2p stream instead: a length-prefixed frame written in
64 KiB chunks, answered by a length-prefixed reply. The receiving side reads the length first and
refuses a frame over its request limit before reading the body, so a stranger cannot make it buffer
more than that.

Most messages (every decode step) go over a *channel* instead: one libp2p stream per (caller, peer)
pair, opened on the first call and kept for all later ones, carrying many calls at once. A request
frame's body starts with a call id, and the reply frame answering it starts with the same id, so
replies may come back in any order (the receiver serves the calls of one channel concurrently). A
unary call costs a new libp2p stream inside the daemon and several protobuf envelopes and task
hops on each side; on loopback a channel's round trip is half a unary call's or less (a bare echo:
a quarter), and the call to the next hop is a large part of what a hop costs beyond its layers
(`benchmarks/swarm.py`). A channel that breaks (the
peer or the connection ends it) is dropped and the next call opens a new one; a call that times out
leaves it open, since the other calls on it may be fine."""

from __future__ import annotations

import asyncio
import functools
import itertools
import weakref
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
CHANNEL_PROTOCOL = "/helix/data-channel/1"
#: requests above this go over a stream (the daemon's unary cap is 4 MiB including its envelope)
UNARY_MAX_BYTES = 3 * 1024 * 1024
FRAME_HEADER_BYTES = 8
CALL_ID_BYTES = 8
#: the largest frame either side of a channel reads: a call id and a sealed unary-sized message
CHANNEL_MAX_FRAME_BYTES = CALL_ID_BYTES + UNARY_MAX_BYTES + TAG_BYTES
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


@functools.lru_cache(maxsize=4096)
def parse_peer_id(peer_id: str) -> PeerID:
    """`PeerID.from_base58`, remembered: it is pure-Python base58 both ways (~0.1 ms), and every call
    to the next hop names its peer, on every hop of every step. `MalformedMessageError` if it is not
    a peer id (not remembered)."""
    try:
        return PeerID.from_base58(peer_id)
    except ValueError as e:
        raise MalformedMessageError(f"{peer_id!r} is not a peer id ({e})") from None


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
    peer = parse_peer_id(peer_id)
    try:
        async with asyncio.timeout(timeout_s):
            if len(request) <= UNARY_MAX_BYTES and max_reply_bytes <= UNARY_MAX_BYTES:
                channel = _channel(p2p, peer_id, peer)
                sealed = await channel.call(seal_request(p2p, CHANNEL_PROTOCOL, peer_id, request))
                data = open_reply(p2p, CHANNEL_PROTOCOL, peer_id, sealed)
                if len(data) > max_reply_bytes:
                    raise MalformedMessageError(
                        f"a reply of {len(data)} bytes passes {max_reply_bytes} bytes"
                    )
            else:
                _, reader, writer = await p2p.call_binary_stream_handler(peer, STREAM_PROTOCOL)
                with closing(writer):
                    await write_frame(writer, seal_request(p2p, STREAM_PROTOCOL, peer_id, request))
                    sealed = await read_frame(reader, max_reply_bytes + TAG_BYTES)
                    data = open_reply(p2p, STREAM_PROTOCOL, peer_id, sealed)
    except TimeoutError:
        # The channel stays: other calls on it may be for routes that are fine (a stalled hop further
        # down one session's route), and a dead connection ends its streams, which closes it.
        raise HopUnreachableError(f"peer {peer_id} did not answer within {timeout_s:g} s", peer_id) from None
    except (P2PDaemonError, P2PHandlerError, ConnectionError, asyncio.IncompleteReadError, OSError) as e:
        raise HopUnreachableError(f"call to peer {peer_id} failed: {str(e)[:300]}", peer_id) from None
    except (MalformedMessageError, SwarmAuthError) as e:
        raise MalformedMessageError(f"peer {peer_id} sent a bad reply: {e}", peer_id) from None
    return data


async def unary_call(p2p: P2P, peer_id: str, request: bytes, timeout_s: float) -> Reply:
    """The same call as a hivemind unary call (what every call was before channels; nodes still
    answer it, and `benchmarks/swarm.py` compares a hop's cost with it)."""
    peer = parse_peer_id(peer_id)
    async with asyncio.timeout(timeout_s):
        response = await p2p.call_protobuf_handler(
            peer,
            UNARY_PROTOCOL,
            seal_expert_request(p2p, UNARY_PROTOCOL, peer_id, request),
            runtime_pb2.ExpertResponse,
        )
    return decode_reply(open_expert_response(p2p, UNARY_PROTOCOL, peer_id, response.SerializeToString()))


class _Channel:
    """One persistent stream to a peer carrying concurrent calls, matched to replies by call id."""

    def __init__(self, p2p: P2P, peer: PeerID) -> None:
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self.broken: str | None = None
        # Shielded by callers: one caller's timeout must not cancel the open the others wait on.
        self._opening = asyncio.ensure_future(self._open(p2p, peer))

    async def _open(self, p2p: P2P, peer: PeerID) -> None:
        try:
            _, reader, self._writer = await p2p.call_binary_stream_handler(peer, CHANNEL_PROTOCOL)
        except BaseException as e:
            self.broken = f"opening failed: {type(e).__name__}: {str(e)[:200]}"
            raise
        if self.broken is not None:  # closed while opening
            self._writer.close()
            return
        self._reader_task = asyncio.create_task(self._read_replies(reader), name=f"channel to {peer}")

    async def call(self, payload: bytes) -> bytes:
        await asyncio.shield(self._opening)
        if self.broken is not None or self._writer is None:
            raise ConnectionError(f"the channel is closed ({self.broken})")
        call_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            # One write per frame, so concurrent calls never interleave their bytes.
            body = call_id.to_bytes(CALL_ID_BYTES, "big") + payload
            self._writer.write(len(body).to_bytes(FRAME_HEADER_BYTES, "big") + body)
            await self._writer.drain()
            return await future
        finally:
            self._pending.pop(call_id, None)

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader, CHANNEL_MAX_FRAME_BYTES)
                future = self._pending.get(int.from_bytes(frame[:CALL_ID_BYTES], "big"))
                if future is not None and not future.done():  # else its caller gave up: dropped
                    future.set_result(frame[CALL_ID_BYTES:])
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            self.close(f"the peer ended it: {type(e).__name__}")
        except MalformedMessageError as e:
            self.close(f"the peer sent a bad frame: {e}")

    def close(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError(f"the channel closed: {self.broken}"))


_CHANNELS: weakref.WeakKeyDictionary[P2P, dict[str, _Channel]] = weakref.WeakKeyDictionary()


def _channel(p2p: P2P, peer_id: str, peer: PeerID) -> _Channel:
    channels = _CHANNELS.setdefault(p2p, {})
    channel = channels.get(peer_id)
    if channel is None or channel.broken is not None:
        channel = channels[peer_id] = _Channel(p2p, peer)
    return channel


def close_channels(p2p: P2P) -> None:
    """Close every channel `p2p` opened (before shutting it down, so no reader task outlives it)."""
    for channel in _CHANNELS.pop(p2p, {}).values():
        channel.close("closed by its owner")
