"""Measuring a link: round-trip time with a tiny unary call, bandwidth by moving a payload over a
libp2p stream in each direction. Both run over the same libp2p path activations take (direct, or
through a relay for a peer behind NAT), so a relay's real cost shows in the numbers.

Unary calls travel on hivemind's persistent connection, capped at 4 MiB per message, so the
payload goes over a raw stream instead, in 64 KiB chunks. The serving side caps the payload and
the number of probes served at once: a probe is a request for work from a stranger."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from google.protobuf.wrappers_pb2 import BytesValue
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError

from helix_p2p.errors import HelixError
from helix_p2p.swarm.records import LinkMeasurement
from helix_p2p.swarm.swarm_key import (
    TAG_BYTES,
    SwarmAuthError,
    open_reply,
    open_request,
    seal_reply,
    seal_request,
    swarm_key_of,
)

logger = logging.getLogger(__name__)

PING_PROTOCOL = "/helix/ping/1"
BANDWIDTH_PROTOCOL = "/helix/bandwidth/1"
#: the most a peer will move for one probe, either way
MAX_PROBE_BYTES = 64 * 1024 * 1024
#: probes served at once; more wait, so one peer's probes cannot saturate this node's link
MAX_CONCURRENT_PROBES = 2
#: seconds between two bandwidth measurements one peer may ask of this node
PER_PEER_INTERVAL_S = 5.0
_CHUNK = 64 * 1024
_UPLOAD, _DOWNLOAD = b"U", b"D"
_HEADER = 9  # direction byte + 8-byte payload length


class ProbeError(HelixError):
    """A probe that got no usable answer."""


@dataclass
class ProbeServer:
    """The serving side of probes; `register` adds its handlers to a P2P instance."""

    max_probe_bytes: int = MAX_PROBE_BYTES
    #: a peer gets one bandwidth measurement per this many seconds (nodes re-probe a peer every
    #: few minutes), so no peer can keep this node's link busy
    per_peer_interval_s: float = PER_PEER_INTERVAL_S

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
        self._last_probe: dict[str, float] = {}

    def _allow(self, peer: str) -> bool:
        now = time.monotonic()
        if now - self._last_probe.get(peer, float("-inf")) < self.per_peer_interval_s:
            return False
        if len(self._last_probe) > 10_000:  # forget rather than grow without bound
            self._last_probe.clear()
        self._last_probe[peer] = now
        return True

    async def register(self, p2p: P2P) -> None:
        self._p2p = p2p
        await p2p.add_protobuf_handler(PING_PROTOCOL, self._ping, BytesValue)
        await p2p.add_binary_stream_handler(BANDWIDTH_PROTOCOL, self._bandwidth)

    async def _ping(self, request: BytesValue, context: P2PContext) -> BytesValue:
        peer = context.remote_id.to_base58()
        try:
            payload = open_request(self._p2p, PING_PROTOCOL, peer, request.value[: 64 + TAG_BYTES])
        except SwarmAuthError as e:
            logger.debug("refused a ping: %s", e)
            return BytesValue(value=b"")
        return BytesValue(value=seal_reply(self._p2p, PING_PROTOCOL, peer, payload[:64]))

    async def _bandwidth(
        self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            peer = stream_info.peer_id.to_base58()
            tag_bytes = 0 if swarm_key_of(self._p2p) is None else TAG_BYTES
            sealed = await asyncio.wait_for(reader.readexactly(_HEADER + tag_bytes), timeout=10)
            try:
                header = open_request(self._p2p, BANDWIDTH_PROTOCOL, peer, sealed)
            except SwarmAuthError as e:
                logger.debug("refused a probe: %s", e)
                return
            direction, size = header[:1], int.from_bytes(header[1:], "big")
            if direction not in (_UPLOAD, _DOWNLOAD) or not 0 < size <= self.max_probe_bytes:
                logger.debug(
                    "refused a probe from %s: direction %r, %d bytes", stream_info.peer_id, direction, size
                )
                return
            if not self._allow(f"{stream_info.peer_id.to_base58()}/{direction.decode()}"):
                logger.debug("refused a probe from %s: probed too recently", stream_info.peer_id)
                return
            async with self._slots:
                if direction == _UPLOAD:
                    remaining = size
                    while remaining:
                        remaining -= len(await reader.readexactly(min(_CHUNK, remaining)))
                    writer.write(b"\x01")
                    await writer.drain()
                else:
                    await _send_zeros(writer, size)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as e:
            logger.debug("probe from %s ended early: %s", stream_info.peer_id, e)
        finally:
            writer.close()


async def _send_zeros(writer: asyncio.StreamWriter, size: int) -> None:
    chunk = bytes(_CHUNK)
    remaining = size
    while remaining:
        n = min(_CHUNK, remaining)
        writer.write(chunk[:n])
        remaining -= n
        await writer.drain()


async def measure_rtt(p2p: P2P, peer: str, *, attempts: int = 3, timeout_s: float = 5.0) -> float:
    """The smallest of a few round trips, in seconds."""
    best = float("inf")
    peer_id = PeerID.from_base58(peer)
    for _ in range(attempts):
        started = time.perf_counter()
        request = BytesValue(value=seal_request(p2p, PING_PROTOCOL, peer, b"helix"))
        reply = await asyncio.wait_for(
            p2p.call_protobuf_handler(peer_id, PING_PROTOCOL, request, BytesValue), timeout_s
        )
        open_reply(p2p, PING_PROTOCOL, peer, reply.value)
        best = min(best, time.perf_counter() - started)
    return best


async def measure_transfer(
    p2p: P2P, peer: str, size: int, *, upload: bool, rtt_s: float, timeout_s: float
) -> float:
    """Bytes/s moving `size` bytes to `peer` (upload) or from it. One round trip is taken off the
    elapsed time (the request and the final acknowledgement), so small probes are not dominated
    by latency."""
    _, reader, writer = await asyncio.wait_for(
        p2p.call_binary_stream_handler(PeerID.from_base58(peer), BANDWIDTH_PROTOCOL), timeout_s
    )
    try:
        started = time.perf_counter()
        header = (_UPLOAD if upload else _DOWNLOAD) + size.to_bytes(8, "big")
        writer.write(seal_request(p2p, BANDWIDTH_PROTOCOL, peer, header))
        if upload:
            await asyncio.wait_for(_send_zeros(writer, size), timeout_s)
            await asyncio.wait_for(reader.readexactly(1), timeout_s)
        else:
            await writer.drain()
            remaining = size
            while remaining:
                got = await asyncio.wait_for(reader.read(min(_CHUNK, remaining)), timeout_s)
                if not got:
                    raise ProbeError(
                        f"{peer} closed the probe stream after {size - remaining} of {size} bytes"
                    )
                remaining -= len(got)
        elapsed = time.perf_counter() - started
    except asyncio.IncompleteReadError:
        raise ProbeError(f"{peer} refused or cut the bandwidth probe") from None
    finally:
        writer.close()
    return size / max(elapsed - rtt_s, elapsed * 0.1, 1e-6)


async def measure_link(
    p2p: P2P, peer: str, *, probe_bytes: int, timeout_s: float = 30.0, now: float | None = None
) -> LinkMeasurement:
    """RTT and bandwidth both ways to `peer`; raises ProbeError if the peer does not answer."""
    try:
        rtt_s = await measure_rtt(p2p, peer, timeout_s=timeout_s)
        out_bytes_per_s = await measure_transfer(
            p2p, peer, probe_bytes, upload=True, rtt_s=rtt_s, timeout_s=timeout_s
        )
        in_bytes_per_s = await measure_transfer(
            p2p, peer, probe_bytes, upload=False, rtt_s=rtt_s, timeout_s=timeout_s
        )
    except (
        asyncio.TimeoutError,
        ConnectionError,
        OSError,
        P2PDaemonError,
        P2PHandlerError,
        SwarmAuthError,
    ) as e:
        raise ProbeError(f"probing {peer} failed: {type(e).__name__} {e}") from None
    return LinkMeasurement(
        peer=peer,
        out_bytes_per_s=out_bytes_per_s,
        in_bytes_per_s=in_bytes_per_s,
        rtt_s=rtt_s,
        measured_at=time.time() if now is None else now,
    )
