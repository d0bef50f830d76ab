"""The data plane on a node: serving inference sessions for the layers it holds.

`attach_data_plane(p2p, layers_provider, limits)` registers three handlers on the node's P2P instance
(channels, the persistent streams every caller uses for messages up to 3 MiB; a stream per message
for larger ones; and hivemind unary calls, still answered; `helix_p2p.protocol.transport`) and
returns the running `DataPlane`. For each message:

- open: check the route names this peer for layers it holds, take a session slot within the per-peer
  and node limits, reserve the KV cache on the shard (or answer busy, naming the KV budget), then
  forward the open to the next hop; if a later hop refuses, release here and pass its answer back.
- step: run the session's layers on the given token ids (first hop: the shard embeds) or hidden
  states, then send the hidden states straight to the next hop and pass its answer back; the last
  hop samples, so the token id travels back along the calls. One network hop per stage per step.
- close: free the KV cache here and forward the close. Sessions idle past `idle_timeout_s` are
  closed by a reaper.

Steps are not run one by one: each shard has a `_Batcher` that takes every step ready when the
previous forward finishes and runs them as one `Shard.step_batch` (continuous batching) on the
shard's worker thread (`node.forward_worker`), so the event loop keeps receiving and forwarding
meanwhile. A short decode batch that holds every call the node is serving runs on the loop itself
instead (`INLINE_FORWARD_S`): nothing of the data plane waits meanwhile, and the hand-off to the
thread and back would be a large part of the hop's cost.

Every message is validated before use (`helix_p2p.protocol.wire`, then the shard's own checks), and
every refusal is an error reply naming the peer and the reason; nothing a caller sends stops the
node serving others. Sessions are pinned to the shard they were opened on, so a node that switches
layers (make before break) finishes its old sessions on the old shard."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2
from torch import Generator, Tensor, randn
from typing_extensions import Self

from helix_p2p.protocol.errors import (
    BusyError,
    DataPlaneError,
    DuplicateSessionError,
    ErrorCode,
    LayersUnavailableError,
    MalformedMessageError,
    SequenceTooLongError,
    SessionNotFoundError,
)
from helix_p2p.protocol.forward import Forward, Forwarded, decode_forward, forwarded_message, is_forward
from helix_p2p.protocol.limits import DataPlaneLimits, PeerQuota
from helix_p2p.protocol.messages import (
    Closed,
    CloseSession,
    Failure,
    Generated,
    Opened,
    OpenSession,
    Reply,
    Request,
    Step,
)
from helix_p2p.protocol.sealing import open_expert_request, seal_expert_response
from helix_p2p.protocol.transport import (
    CALL_ID_BYTES,
    CHANNEL_MAX_FRAME_BYTES,
    CHANNEL_PROTOCOL,
    FRAME_HEADER_BYTES,
    STREAM_PROTOCOL,
    UNARY_PROTOCOL,
    call_peer,
    close_channels,
    read_frame,
    write_frame,
)
from helix_p2p.protocol.wire import (
    decode_request,
    decode_request_message,
    encode_reply,
    encode_request,
    reply_message,
)
from helix_p2p.shard import (
    BadStepError,
    KVCapacityError,
    LayerRangeError,
    LayersNotHeldError,
    SessionExistsError,
    SessionLengthError,
    Shard,
    ShardError,
    StepRequest,
    StepResult,
    UnknownSessionError,
)
from helix_p2p.swarm.swarm_key import TAG_BYTES, SwarmAuthError, open_request, seal_reply

from .forward_worker import ForwardWorker
from .metrics import NodeMetrics

logger = logging.getLogger(__name__)

#: the shards a node serves now, newest first (a node switching layers briefly has two)
LayersProvider = Callable[[], Sequence[Shard]]


class Gate(Protocol):
    """The node's session admission (`node.sessions.SessionGate`): refuses new sessions once leaving."""

    def admit(self) -> bool: ...

    def finish(self) -> None: ...


@dataclass
class _Served:
    session_id: str
    shard: Shard
    layers: tuple[int, int]
    #: the peer that opened the session: the only one that may step or close it
    owner: str
    #: the next hop, None on the last one
    next_peer: str | None
    #: the last hop samples with a repetition penalty: it needs the token ids, so they ride along
    forward_ids: bool
    last_used: float
    running: bool = False
    #: KV positions reserved for it here (its max_length), counted against the owner's per-peer cap
    kv_tokens: int = 0


class _InFlight:
    """The request bytes one stream brings, counted against its peer's in-flight caps from the frame's
    header (before its body is read, so a refused frame is never buffered) until the reply is written."""

    def __init__(self, quota: PeerQuota, peer: str, node: str) -> None:
        self.quota, self.peer, self.node = quota, peer, node
        self.num_bytes = 0

    def admit(self, num_bytes: int) -> None:
        why = self.quota.refuse_bytes(self.peer, num_bytes)
        if why:
            raise BusyError(f"peer {self.node} is busy: {why}", self.node)
        self.quota.add_bytes(self.peer, num_bytes)
        self.num_bytes = num_bytes

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.quota.remove_bytes(self.peer, self.num_bytes)
        self.num_bytes = 0


#: a decode batch predicted to take less than this runs on the event loop itself, when it holds every
#: call the node is serving (nothing else of the data plane waits on the loop meanwhile): a hand-off
#: to the worker thread and back costs 0.1-1 ms on every hop of every step (two thread wake-ups, on
#: a loaded machine more), a large part of what a hop costs beyond its layers (`benchmarks/swarm.py`).
#: The cap bounds how long the loop's other work can be held up: at most one such forward per turn
#: of the loop, and that work is the control plane's (announces, watches, probes: periodic, with
#: timeouts in seconds; a probe keeps the smallest of several round trips). 20 ms covers a decode
#: step of the benchmark's default model (8 layers, hidden 512) on one CPU thread.
INLINE_FORWARD_S = 0.02
#: weight of the newest measurement in the smoothed seconds per decode step
_EMA_WEIGHT = 0.2


class _Batcher:
    """Continuous batching for one shard: whatever steps are queued when a forward ends go into the
    next one together (up to `max_batch_steps`). Forwards run on the shard's worker thread, so the
    loop goes on receiving and forwarding meanwhile; or inline, when the batch is short decode steps
    and nothing else is being served (`INLINE_FORWARD_S`). `calls_in_progress()` is the number of
    calls the node is serving now (this batch's among them)."""

    def __init__(
        self,
        shard: Shard,
        max_batch_steps: int,
        calls_in_progress: Callable[[], int],
        inline_forward_s: float = INLINE_FORWARD_S,
    ) -> None:
        self.shard = shard
        self.max_batch_steps = max_batch_steps
        self.calls_in_progress = calls_in_progress
        self.inline_forward_s = inline_forward_s
        self._queue: deque[tuple[StepRequest, asyncio.Future[StepResult]]] = deque()
        self._ready = asyncio.Event()
        self._worker = ForwardWorker(f"forwards [{shard.start}, {shard.end})")
        self._task = asyncio.create_task(self._run(), name=f"batcher [{shard.start}, {shard.end})")
        self.forwards = 0
        self.steps = 0
        self.inline_forwards = 0
        #: smoothed compute seconds per step of decode-only batches (one token each), measured
        #: around the forward wherever it ran; None until the first
        self.decode_s_per_step: float | None = None

    async def submit(self, request: StepRequest) -> StepResult:
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        self._ready.set()
        return await future

    def close(self) -> None:
        self._task.cancel()
        self._worker.close()
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()

    def runs_inline(self, requests: Sequence[StepRequest]) -> bool:
        """Decode steps only (a prefill's cost is not predicted from them: it goes to the thread),
        predicted under the cap, and no other call of the node's waiting on the loop."""
        if self.decode_s_per_step is None or any(r.num_tokens != 1 for r in requests):
            return False
        if self.calls_in_progress() > len(requests):
            return False
        return self.decode_s_per_step * len(requests) < self.inline_forward_s

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queue:
                batch = []
                while self._queue and len(batch) < self.max_batch_steps:
                    item = self._queue.popleft()
                    if not item[1].done():  # a caller that gave up is skipped
                        batch.append(item)
                if not batch:
                    continue
                requests = [r for r, _ in batch]
                try:
                    if self.runs_inline(requests):
                        self.inline_forwards += 1
                        outcomes = self._run_batch(requests)
                    else:
                        outcomes = await self._worker.run(self._run_batch, requests)
                except Exception as e:  # a device error: fail this batch, keep serving
                    logger.exception("a batched forward of %d steps failed", len(batch))
                    outcomes = [e] * len(batch)
                self.forwards += 1
                self.steps += len(batch)
                for (_, future), outcome in zip(batch, outcomes):
                    if future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)

    def _run_batch(self, requests: list[StepRequest]) -> list[StepResult | ShardError]:
        """Run the valid requests as one batch; a bad one gets its own error and does not stop the
        rest. A decode-only batch's time updates `decode_s_per_step`."""
        started = time.perf_counter()
        outcomes = self._run_valid(requests)
        if all(r.num_tokens == 1 for r in requests):
            s_per_step = (time.perf_counter() - started) / len(requests)
            old = self.decode_s_per_step
            self.decode_s_per_step = (
                s_per_step if old is None else (1 - _EMA_WEIGHT) * old + _EMA_WEIGHT * s_per_step
            )
        return outcomes

    def _run_valid(self, requests: list[StepRequest]) -> list[StepResult | ShardError]:
        outcomes: list[StepResult | ShardError | None] = [None] * len(requests)
        good = []
        for i, request in enumerate(requests):
            try:
                self.shard.validate(request)
                good.append(i)
            except ShardError as e:
                outcomes[i] = e
        if good:
            try:
                for i, result in zip(good, self.shard.step_batch([requests[i] for i in good])):
                    outcomes[i] = result
            except ShardError:
                # Changed between validation and the batch (closed, expired): one by one, each its own answer.
                for i in good:
                    try:
                        outcomes[i] = self.shard.step(requests[i])
                    except ShardError as e:
                        outcomes[i] = e
        return [o for o in outcomes if o is not None]


#: how long a refused stream is kept half-open for the caller to read its refusal
LINGER_S = 0.5


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After refusing a frame whose body was not read (an oversized header, a busy peer): end our
    side and read, briefly, what the caller is still sending. Closing a stream with unread bytes
    can reset it before the caller has read the refusal (a fuzz test saw the reply lost), which
    would turn a clear error into a silent hang-up. Bounded by LINGER_S."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            while await reader.read(1 << 16):
                pass
    except (TimeoutError, OSError):
        pass


class DataPlane:
    def __init__(
        self,
        p2p: P2P,
        layers_provider: LayersProvider,
        limits: DataPlaneLimits,
        *,
        gate: Gate | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: NodeMetrics | None = None,
        perturb_scale: float = 0.0,
    ) -> None:
        self.p2p = p2p
        self.metrics = metrics or NodeMetrics()
        self.layers_provider = layers_provider
        self.limits = limits
        self.gate = gate
        self.clock = clock
        self.peer_id = p2p.peer_id.to_base58()
        self.quota = PeerQuota(limits)
        self._sessions: dict[str, _Served] = {}
        self._batchers: dict[Shard, _Batcher] = {}
        #: calls being served now, of every kind (a batch that holds them all may run inline)
        self._calls_in_progress = 0
        self._reaper: asyncio.Task | None = None
        #: tests only (`--test-perturb-outputs`): a lying node, for the verification tests
        self.perturb_scale = perturb_scale
        self._perturb_rng = Generator().manual_seed(0)

    # --------------------------------------------------------------------------------- life

    async def start(self) -> None:
        await self.p2p.add_protobuf_handler(UNARY_PROTOCOL, self._on_unary, runtime_pb2.ExpertRequest)
        await self.p2p.add_binary_stream_handler(STREAM_PROTOCOL, self._on_stream)
        await self.p2p.add_binary_stream_handler(CHANNEL_PROTOCOL, self._on_channel)
        self._reaper = asyncio.create_task(self._reap_loop(), name="session reaper")

    async def close(self) -> None:
        """Stop the reaper and batchers and free every session's KV cache (handlers stay registered
        until the P2P instance shuts down; they answer nothing useful once the shards are gone)."""
        if self._reaper is not None:
            self._reaper.cancel()
        for batcher in self._batchers.values():
            batcher.close()
        self._batchers.clear()
        for sid in list(self._sessions):
            await self._drop(sid, "the node is shutting down")
        close_channels(self.p2p)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def batching_stats(self) -> tuple[int, int]:
        """(forwards run, steps run) over the shards served now."""
        return (
            sum(b.forwards for b in self._batchers.values()),
            sum(b.steps for b in self._batchers.values()),
        )

    @property
    def inline_forwards(self) -> int:
        """Forwards run on the event loop (short decode batches on an otherwise idle node)."""
        return sum(b.inline_forwards for b in self._batchers.values())

    # ---------------------------------------------------------------------------- transport

    async def _on_unary(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """In a private swarm, a request must carry the swarm key's tag; one that does not is
        answered in the clear with a refusal (the sender holds no key to read a sealed one)."""
        peer = context.remote_id.to_base58()
        try:
            request = open_expert_request(self.p2p, UNARY_PROTOCOL, peer, request)
        except SwarmAuthError as e:
            logger.info("refused a request from %s: %s", peer, e)
            return reply_message(Failure.of(MalformedMessageError(str(e)), self.peer_id))
        response = await self._on_opened_unary(request, context)
        return seal_expert_response(self.p2p, UNARY_PROTOCOL, peer, response)

    async def _on_opened_unary(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        if is_forward(request):
            return await self._serve_forward(
                lambda: decode_forward(request, self.limits), context.remote_id.to_base58()
            )
        reply = await self._serve(
            lambda: decode_request_message(request, self.limits), context.remote_id.to_base58()
        )
        return reply_message(reply)

    async def _on_stream(
        self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = stream_info.peer_id.to_base58()
        with closing(writer), _InFlight(self.quota, peer, self.peer_id) as in_flight:
            refused = True
            try:
                async with asyncio.timeout(self.limits.hop_timeout_s):
                    data = await read_frame(
                        reader, self.limits.max_request_bytes + TAG_BYTES, admit=in_flight.admit
                    )
                data = open_request(self.p2p, STREAM_PROTOCOL, peer, data)
            except BusyError as e:  # past the peer's bytes in flight: refused before reading the body
                logger.info("refused a stream from %s: %s", peer, e)
                reply_bytes = encode_reply(Failure.of(e, self.peer_id))
            except (MalformedMessageError, SwarmAuthError) as e:
                logger.info("refused a stream from %s: %s", peer, e)
                reply_bytes = encode_reply(Failure.of(MalformedMessageError(str(e)), self.peer_id))
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as e:
                logger.info("a stream from %s ended before its request was read: %s", peer, type(e).__name__)
                return
            else:
                refused = False
                reply_bytes = seal_reply(self.p2p, STREAM_PROTOCOL, peer, await self._answer(data, peer))
            try:
                await write_frame(writer, reply_bytes)
                if refused:
                    await _linger(reader, writer)
            except ConnectionError:
                logger.info("peer %s hung up before its reply", peer)

    async def _answer(self, data: bytes, peer: str) -> bytes:
        """The encoded reply to an encoded (opened) request that came as a frame."""
        forward = _forward_request(data)
        if forward is not None:
            response = await self._serve_forward(lambda: decode_forward(forward, self.limits), peer)
            return response.SerializeToString()
        return encode_reply(await self._serve(lambda: decode_request(data, self.limits), peer))

    async def _on_channel(
        self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A caller's persistent stream (`transport` channels): each frame is a call id and a request,
        served concurrently with the others, each answered by a frame with its call id. Reading
        stops while `max_queued_steps_per_peer` calls of this stream are being served (back
        pressure); a frame over the cap ends the stream, whose framing is then lost."""
        peer = stream_info.peer_id.to_base58()
        slots = asyncio.Semaphore(self.limits.max_queued_steps_per_peer)
        calls: set[asyncio.Task] = set()
        with closing(writer):
            while True:
                await slots.acquire()
                try:
                    frame = await read_frame(reader, CHANNEL_MAX_FRAME_BYTES)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break  # the caller closed it
                except MalformedMessageError as e:
                    logger.info("closed a channel from %s: %s", peer, e)
                    break
                call = asyncio.create_task(self._channel_call(frame, peer, writer))
                calls.add(call)
                call.add_done_callback(lambda c: (calls.discard(c), slots.release()))
            if calls:  # replies still being written go out before the stream closes
                await asyncio.wait(calls)

    async def _channel_call(self, frame: bytes, peer: str, writer: asyncio.StreamWriter) -> None:
        call_id, data = frame[:CALL_ID_BYTES], frame[CALL_ID_BYTES:]
        try:
            data = open_request(self.p2p, CHANNEL_PROTOCOL, peer, data)
        except SwarmAuthError as e:
            logger.info("refused a request from %s: %s", peer, e)
            # worded as the unary path words an untagged request (a tag is missing or wrong alike)
            why = f"peer {peer} sent a request without this private swarm's key (--swarm-key)"
            reply_bytes = encode_reply(Failure.of(MalformedMessageError(why), self.peer_id))
        else:
            # a channel's frames count against the peer's bytes in flight until answered, as a
            # stream's do: one peer's channels cannot hold more than its cap in queued requests
            why = self.quota.refuse_bytes(peer, len(frame))
            if why:
                busy = BusyError(f"peer {self.peer_id} is busy: {why}", self.peer_id)
                logger.info("refused a request from %s: %s", peer, busy)
                reply_bytes = seal_reply(
                    self.p2p, CHANNEL_PROTOCOL, peer, encode_reply(Failure.of(busy, self.peer_id))
                )
            else:
                self.quota.add_bytes(peer, len(frame))
                try:
                    reply_bytes = seal_reply(self.p2p, CHANNEL_PROTOCOL, peer, await self._answer(data, peer))
                finally:
                    self.quota.remove_bytes(peer, len(frame))
        body = call_id + reply_bytes
        try:
            writer.write(len(body).to_bytes(FRAME_HEADER_BYTES, "big") + body)  # one write: never interleaved
            await writer.drain()
        except ConnectionError:
            logger.info("peer %s closed its channel before a reply", peer)

    async def _serve(self, decode: Callable[[], Request], peer: str) -> Reply:
        kind = "request"
        self._calls_in_progress += 1
        try:
            message = decode()
            kind = type(message).__name__
            if isinstance(message, OpenSession):
                return await self._open(message, peer)
            if isinstance(message, Step):
                return await self._step(message, peer)
            return await self._close(message, peer)
        except DataPlaneError as e:
            logger.info("refused a %s from %s: %s: %s", kind, peer, e.code.value, e)
            self.metrics.failed(e.code.value)
            return Failure.of(e, self.peer_id)
        except Exception as e:  # a bug or a device failure on a valid message: answer, keep serving
            logger.exception("failed on a %s from %s", kind, peer)
            self.metrics.failed(ErrorCode.INTERNAL.value)
            return Failure(
                ErrorCode.INTERNAL, f"peer {self.peer_id} failed: {type(e).__name__}: {e}", self.peer_id
            )
        finally:
            self._calls_in_progress -= 1

    # ---------------------------------------------------------------------------- forward

    async def _serve_forward(self, decode: Callable[[], Forward], peer: str) -> runtime_pb2.ExpertResponse:
        self._calls_in_progress += 1
        try:
            return forwarded_message(await self._forward(decode(), peer))
        except DataPlaneError as e:
            logger.info("refused a forward from %s: %s: %s", peer, e.code.value, e)
            return reply_message(Failure.of(e, self.peer_id))
        except Exception as e:  # a bug or a device failure on a valid message: answer, keep serving
            logger.exception("failed on a forward from %s", peer)
            return reply_message(
                Failure(
                    ErrorCode.INTERNAL, f"peer {self.peer_id} failed: {type(e).__name__}: {e}", self.peer_id
                )
            )
        finally:
            self._calls_in_progress -= 1

    async def _forward(self, message: Forward, peer: str) -> Forwarded:
        """Run the layers over the whole prefix in a throw-away session (a verifying client's
        check, `helix_p2p.protocol.forward`): same batcher, same per-peer step quota as steps."""
        shard = self._shard_for(message.layers)
        why = self.quota.refuse_step(peer)
        if why:
            raise BusyError(f"peer {self.peer_id} is busy: {why}")
        self.quota.add_step(peer)
        sid = f"forward.{uuid.uuid4().hex}"
        last = message.end == shard.num_model_layers
        try:
            try:
                await asyncio.to_thread(shard.open_session, sid, message.num_tokens, None, message.layers)
            except KVCapacityError:
                raise self._busy_kv(shard, sid, message.num_tokens) from None
            except ShardError as e:
                raise self._translate(e, message.layers) from None
            try:
                request = StepRequest(
                    sid,
                    token_ids=message.token_ids,
                    hidden_states=message.hidden_states,
                    position=0,
                    layers=message.layers,
                    return_logits=last,
                )
                result = await self._batcher(shard).submit(request)
            except ShardError as e:
                raise self._translate(e, message.layers) from None
            finally:
                try:
                    await asyncio.to_thread(shard.close_session, sid)
                except UnknownSessionError:
                    pass  # expired first: nothing left to free
        finally:
            self.quota.remove_step(peer)
        output = result.logits[-1] if last else result.hidden_states
        assert output is not None
        logger.info("forward for %s: layers [%d, %d), %d tokens", peer, *message.layers, message.num_tokens)
        return Forwarded(message.start, message.end, self._perturb(output), last)

    def _perturb(self, x: Tensor) -> Tensor:
        """Noise on this node's outputs, only under the hidden test flag `--test-perturb-outputs`."""
        if not self.perturb_scale:
            return x
        noise = randn(x.shape, generator=self._perturb_rng)
        scale = self.perturb_scale * float(x.float().std())
        return (x.float() + scale * noise).to(x.dtype)

    # ------------------------------------------------------------------------------- open

    async def _open(self, message: OpenSession, peer: str) -> Reply:
        sid, hop = message.session_id, message.hop
        if hop.peer_id != self.peer_id:
            raise MalformedMessageError(
                f"route hop {message.hop_index} names peer {hop.peer_id}, but this is peer {self.peer_id}"
            )
        if sid in self._sessions:
            raise DuplicateSessionError(f"session {sid} is already open on peer {self.peer_id}")
        why = self.quota.refuse_session(peer, message.max_length)
        if why:
            raise BusyError(f"peer {self.peer_id} is busy: {why}")
        shard = self._shard_for(hop.layers)
        if message.route[-1].end != shard.num_model_layers:
            raise MalformedMessageError(
                f"the route ends at layer {message.route[-1].end}, the model has {shard.num_model_layers} layers"
            )
        if self.gate is not None and not self.gate.admit():
            raise BusyError(f"peer {self.peer_id} is leaving the swarm and opens no new sessions")
        self.quota.add_session(peer, message.max_length)
        next_peer = None if message.is_last else message.route[message.hop_index + 1].peer_id
        forward_ids = message.sampling.needs_history and not message.is_last
        self._sessions[sid] = _Served(
            sid, shard, hop.layers, peer, next_peer, forward_ids, self.clock(), running=True,
            kv_tokens=message.max_length,
        )  # fmt: skip
        opened_here = False
        try:
            try:
                await asyncio.to_thread(
                    shard.open_session,
                    sid,
                    message.max_length,
                    message.sampling if message.is_last else None,
                    hop.layers,
                )
            except KVCapacityError:
                raise self._busy_kv(shard, sid, message.max_length) from None
            except ShardError as e:
                raise self._translate(e, hop.layers) from None
            opened_here = True
            hops = 1
            if next_peer is not None:
                reply = await call_peer(
                    self.p2p, next_peer, encode_request(message.forwarded()), self.limits.hop_timeout_s
                )
                if not isinstance(reply, Opened):
                    await self._drop(sid, "a later hop refused it")
                    return (
                        reply
                        if isinstance(reply, Failure)
                        else Failure(
                            ErrorCode.MALFORMED,
                            f"peer {next_peer} answered an open with {type(reply).__name__}",
                            next_peer,
                        )
                    )
                hops += reply.hops
        except BaseException:
            if sid in self._sessions:
                await self._drop(sid, "its open failed", close_shard=opened_here)
            raise
        self._sessions[sid].running = False
        self.metrics.opened(first_hop=message.hop_index == 0)
        logger.info(
            "session %s opened by %s: layers [%d, %d), max_length %d, next hop %s",
            sid, peer, *hop.layers, message.max_length, next_peer or "none (samples here)",
        )  # fmt: skip
        return Opened(sid, hops)

    def _shard_for(self, layers: tuple[int, int]) -> Shard:
        shards = list(self.layers_provider())
        for shard in shards:
            if shard.start <= layers[0] and layers[1] <= shard.end:
                return shard
        held = ", ".join(f"[{s.start}, {s.end})" for s in shards) or "no layers"
        raise LayersUnavailableError(
            f"peer {self.peer_id} holds {held}, not layers [{layers[0]}, {layers[1]})", self.peer_id
        )

    def _busy_kv(self, shard: Shard, sid: str, max_length: int) -> BusyError:
        budget = shard.spec.max_kv_tokens
        free = shard.free_kv_tokens
        return BusyError(
            f"peer {self.peer_id} (layers [{shard.start}, {shard.end})) is busy: session {sid} asks for "
            f"{max_length} KV positions, {free} of its KV budget of {budget} positions are free "
            f"({len(shard.sessions())} sessions open)",
            self.peer_id,
        )

    # ------------------------------------------------------------------------------- step

    async def _step(self, message: Step, peer: str) -> Reply:
        sid = message.session_id
        served = self._owned(sid, peer)
        if served.running:
            raise MalformedMessageError(
                f"session {sid} already has a step running on peer {self.peer_id}; a session's steps go one at a time"
            )
        payload_bytes = message.payload_bytes
        why = self.quota.refuse_step(peer) or self.quota.refuse_bytes(peer, payload_bytes)
        if why:
            raise BusyError(f"peer {self.peer_id} is busy: {why}")
        served.running = True
        self.quota.add_step(peer)
        self.quota.add_bytes(peer, payload_bytes)
        try:
            hidden_in = message.hidden_states
            if hidden_in is not None and served.next_peer is None:
                hidden_in = self._perturb(hidden_in)  # the last hop's lie (test flag): it samples here
            request = StepRequest(
                sid,
                token_ids=message.token_ids,
                hidden_states=hidden_in,
                position=message.position,
                layers=served.layers,
            )
            arrived = time.perf_counter()
            try:
                result = await self._batcher(served.shard).submit(request)
            except UnknownSessionError as e:  # closed or expired on the shard meanwhile
                await self._drop(sid, "the shard no longer has it", close_shard=False)
                raise self._translate(e, served.layers) from None
            except ShardError as e:
                raise self._translate(e, served.layers) from None
            self.metrics.stepped(result.num_tokens, time.perf_counter() - arrived, served.next_peer is None)
            if served.next_peer is None:
                assert result.token_id is not None
                return Generated(sid, result.position, result.num_tokens, result.token_id, result.finished)
            forward = Step(
                sid,
                result.position,
                token_ids=message.token_ids if served.forward_ids else None,
                hidden_states=None if result.hidden_states is None else self._perturb(result.hidden_states),
            )
            return await call_peer(
                self.p2p, served.next_peer, encode_request(forward), self.limits.hop_timeout_s
            )
        finally:
            served.running = False
            served.last_used = self.clock()
            self.quota.remove_step(peer)
            self.quota.remove_bytes(peer, payload_bytes)

    def _owned(self, sid: str, peer: str) -> _Served:
        served = self._sessions.get(sid)
        if served is None or served.owner != peer:
            # A stranger is told no more than about a session that does not exist.
            raise SessionNotFoundError(f"session {sid} is not open on peer {self.peer_id} for peer {peer}")
        return served

    def _batcher(self, shard: Shard) -> _Batcher:
        batcher = self._batchers.get(shard)
        if batcher is None:
            batcher = self._batchers[shard] = _Batcher(
                shard, self.limits.max_batch_steps, lambda: self._calls_in_progress
            )
        return batcher

    def _translate(self, error: ShardError, layers: tuple[int, int]) -> DataPlaneError:
        where = f"peer {self.peer_id} (layers [{layers[0]}, {layers[1]}))"
        if isinstance(error, SessionLengthError):
            return SequenceTooLongError(f"{where}: {error}", self.peer_id)
        if isinstance(error, UnknownSessionError):
            return SessionNotFoundError(f"{where}: {error}", self.peer_id)
        if isinstance(error, SessionExistsError):
            return DuplicateSessionError(f"{where}: {error}", self.peer_id)
        if isinstance(error, (LayersNotHeldError, LayerRangeError)):
            return LayersUnavailableError(f"{where}: {error}", self.peer_id)
        if isinstance(error, BadStepError):
            return MalformedMessageError(f"{where}: {error}", self.peer_id)
        return MalformedMessageError(f"{where}: {type(error).__name__}: {error}", self.peer_id)

    # ------------------------------------------------------------------------------ close

    async def _close(self, message: CloseSession, peer: str) -> Reply:
        sid = message.session_id
        served = self._owned(sid, peer)
        await self._drop(sid, f"closed by {peer}")
        if served.next_peer is not None:
            try:
                reply = await call_peer(
                    self.p2p, served.next_peer, encode_request(message), self.limits.hop_timeout_s
                )
            except DataPlaneError as e:
                reply = Failure.of(e, self.peer_id)
            if isinstance(reply, Failure):
                # Our part is done; the next hop frees its cache when the session idles out there.
                logger.info(
                    "session %s: the next hop %s did not close it: %s", sid, served.next_peer, reply.message
                )
        return Closed(sid)

    async def _drop(self, sid: str, reason: str, *, close_shard: bool = True) -> None:
        served = self._sessions.pop(sid, None)
        if served is None:
            return
        self.quota.remove_session(served.owner, served.kv_tokens)
        if self.gate is not None:
            self.gate.finish()
        if close_shard:
            try:
                await asyncio.to_thread(served.shard.close_session, sid)
            except UnknownSessionError:
                pass  # the shard expired it first: nothing left to free
        logger.info("session %s: %s", sid, reason)

    async def _reap_loop(self) -> None:
        period_s = min(5.0, self.limits.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period_s)
            await self.reap()

    async def reap(self) -> list[str]:
        """Close sessions idle past the timeout, and retire batchers of shards no longer served."""
        now = self.clock()
        idle = [
            sid
            for sid, s in self._sessions.items()
            if not s.running and now - s.last_used > self.limits.idle_timeout_s
        ]
        for sid in idle:
            await self._drop(sid, f"idle for over {self.limits.idle_timeout_s:g} s: closed")
        current = set(self.layers_provider())
        in_use = {s.shard for s in self._sessions.values()}
        for shard in [s for s in self._batchers if s not in current and s not in in_use]:
            self._batchers.pop(shard).close()
        return idle


async def attach_data_plane(
    p2p: P2P,
    layers_provider: LayersProvider,
    limits: DataPlaneLimits | None = None,
    *,
    gate: Gate | None = None,
    metrics: NodeMetrics | None = None,
    perturb_scale: float = 0.0,
) -> DataPlane:
    """Serve inference sessions on `p2p` for the shards `layers_provider()` returns (called on each
    open, so a node that switches layers serves the new ones at once)."""
    plane = DataPlane(
        p2p,
        layers_provider,
        limits or DataPlaneLimits(),
        gate=gate,
        metrics=metrics,
        perturb_scale=perturb_scale,
    )
    await plane.start()
    return plane


def _forward_request(data: bytes) -> runtime_pb2.ExpertRequest | None:
    """The request in a stream frame if it is a forward (those are answered apart), else None."""
    try:
        request = runtime_pb2.ExpertRequest.FromString(data)
    except DecodeError:
        return None  # decode_request answers it with a named error
    return request if is_forward(request) else None
