"""Reaching a node behind a NAT through a libp2p circuit relay (relay v2).

A node that accepts no inbound connection (its dial-back check failed, or `--no-listen`) asks a
relay, the bootstrap by default, for a reservation and announces `<relay>/p2p-circuit/p2p/<self>`
in its record. A peer that must call it and holds no connection to it first connects through that
address; hivemind's unary and stream calls by peer id then reuse the open connection. Traffic the
NATed node starts itself (its DHT stores, its probes, its forwards to the next hop) leaves over
direct outbound connections, as a NAT lets through, and the other side answers on those.

Why by hand: hivemind 1.1.12 cannot turn off p2pd's relay discovery, which waits for 4 candidate
relays or 3 minutes before reserving anything, so no /p2p-circuit address ever appears on a small
or local swarm; and its `Multiaddr` writes `/p2p/` as a CIDv1, which p2pd's CONNECT rejects. So
the reservation is the relay protocol's own RESERVE message on a stream to the relay, and the
circuit address is encoded here in the binary form p2pd reads.

The relay grants limits in its reservation: a plain hivemind 1.1.12 peer keeps libp2p's defaults
(128 KiB each way and 2 minutes per relayed connection); helix-bootstrap, which forces public
reachability, was seen granting 4 GiB and 30 minutes. Past them the relay resets the
connection; the next call redials through the relay, and a call cut mid-way fails like any lost
peer (the client replays elsewhere). A relayed link is slow and short-lived by design, which is
the cost probes over it measure and the plan then sees."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure, P2PDaemonError

from helix_p2p.errors import HelixError
from helix_p2p.swarm.records import NodeRecord, PlanRecord, Reachability

logger = logging.getLogger(__name__)

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
CIRCUIT = "/p2p-circuit"
#: the most bytes one relay message may take (the spec's limit is 4 KiB)
MAX_HOP_MESSAGE_BYTES = 4096
#: a bandwidth probe over a relayed connection moves this much each way: well under p2pd's cap of
#: 128 KiB per relayed connection, so the probe measures the relay instead of running into its cap
RELAYED_PROBE_BYTES = 32 * 1024

# multiaddr protocol codes (multiformats/multicodec table) and the size of their value:
# a fixed byte count, "var" for a length-prefixed value, or 0 for none
_PROTOCOLS: dict[str, tuple[int, int | str]] = {
    "ip4": (0x04, 4),
    "tcp": (0x06, 2),
    "udp": (0x0111, 2),
    "ip6": (0x29, 16),
    "dns": (0x35, "var"),
    "dns4": (0x36, "var"),
    "dns6": (0x37, "var"),
    "quic": (0x01CC, 0),
    "quic-v1": (0x01CD, 0),
    "p2p": (0x01A5, "var"),
    "p2p-circuit": (0x0122, 0),
}
# relay v2 HopMessage: type RESERVE = 0, STATUS = 2; Status OK = 100 (circuit-v2 spec)
_HOP_RESERVE, _HOP_STATUS, _STATUS_OK = 0, 2, 100
_STATUS_NAMES = {
    100: "OK",
    200: "RESERVATION_REFUSED",
    201: "RESOURCE_LIMIT_EXCEEDED",
    202: "PERMISSION_DENIED",
    203: "CONNECTION_FAILED",
    204: "NO_RESERVATION",
    400: "MALFORMED_MESSAGE",
    401: "UNEXPECTED_MESSAGE",
}


class RelayError(HelixError):
    """A relay refused or garbled a reservation, or a circuit could not be opened."""


@dataclass(frozen=True)
class Reservation:
    """A slot on a relay: others may connect to this peer through it until `expires_at`."""

    relay: str
    #: unix time
    expires_at: float
    #: how long one relayed connection may stay open (None: the relay set no limit)
    limit_duration_s: float | None
    #: bytes one relayed connection may carry each way (None: no limit)
    limit_bytes: int | None


# ------------------------------------------------------------------------------- pure parts


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise RelayError("truncated or oversized varint in a relay message")
        byte = buf[i]
        i += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, i


def maddr_to_bytes(text: str) -> bytes:
    """The binary multiaddr p2pd reads, with `/p2p/<id>` as the peer id's plain multihash (what
    go-multiaddr writes; hivemind's `Multiaddr` writes a CIDv1 there, which p2pd refuses)."""
    parts = text.split("/")
    if len(parts) < 2 or parts[0] != "":
        raise RelayError(f"bad multiaddr {text!r}: it must start with '/'")
    out = bytearray()
    i = 1
    while i < len(parts):
        name = parts[i]
        if name not in _PROTOCOLS:
            raise RelayError(f"bad multiaddr {text!r}: protocol {name!r} is not supported here")
        code, size = _PROTOCOLS[name]
        out += _varint(code)
        i += 1
        if size == 0:
            continue
        if i >= len(parts) or parts[i] == "":
            raise RelayError(f"bad multiaddr {text!r}: /{name} needs a value")
        out += _encode_value(text, name, parts[i])
        i += 1
    return bytes(out)


def _encode_value(text: str, name: str, value: str) -> bytes:
    try:
        if name == "ip4":
            return ipaddress.IPv4Address(value).packed
        if name == "ip6":
            return ipaddress.IPv6Address(value).packed
        if name in ("tcp", "udp"):
            port = int(value)
            if not 0 <= port <= 65535:
                raise ValueError(f"port {port} out of range")
            return port.to_bytes(2, "big")
        if name == "p2p":
            raw = PeerID.from_base58(value).to_bytes()
        else:  # dns names
            raw = value.encode("idna")
    except (ValueError, UnicodeError) as e:
        raise RelayError(f"bad multiaddr {text!r}: /{name}/{value}: {e}") from None
    return _varint(len(raw)) + raw


def circuit_addr(relay_maddr: str, peer_id: str) -> str:
    """The address at which `peer_id` is reached through the relay at `relay_maddr` (which must
    name the relay's own /p2p/ id)."""
    relay_maddr = relay_maddr.rstrip("/")
    if "/p2p/" not in relay_maddr or CIRCUIT in relay_maddr:
        raise RelayError(f"relay address {relay_maddr!r} must be a direct address ending in /p2p/<relay id>")
    return f"{relay_maddr}{CIRCUIT}/p2p/{peer_id}"


def circuit_addrs_of(peer_id: str, addrs: Iterable[str]) -> list[str]:
    """The relayed addresses among a record's `addrs` that lead to `peer_id` itself (a record
    cannot make its readers open circuits to anyone else)."""
    suffix = f"{CIRCUIT}/p2p/{peer_id}"
    return [a for a in addrs if a.endswith(suffix) and a.count(CIRCUIT) == 1]


def reserve_request() -> bytes:
    """A length-prefixed HopMessage{type: RESERVE}."""
    body = bytes([0x08, _HOP_RESERVE])  # field 1 (type), varint
    return _varint(len(body)) + body


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """A protobuf message's (field number, value) pairs: varints and length-delimited only."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _read_varint(buf, i)
            out.append((number, value))
        elif wire_type == 2:
            size, i = _read_varint(buf, i)
            if i + size > len(buf):
                raise RelayError("truncated field in a relay message")
            out.append((number, buf[i : i + size]))
            i += size
        else:
            raise RelayError(f"unexpected protobuf wire type {wire_type} in a relay message")
    return out


def parse_reserve_reply(body: bytes, relay: str) -> Reservation:
    """The relay's answer to RESERVE (a HopMessage without its length prefix)."""
    fields = dict(_fields(body))
    if fields.get(1) != _HOP_STATUS:
        raise RelayError(f"relay {relay} answered the reservation with message type {fields.get(1)}")
    status = fields.get(5)
    if status != _STATUS_OK:
        name = _STATUS_NAMES.get(status, str(status)) if isinstance(status, int) else "no status"
        raise RelayError(f"relay {relay} refused a reservation: {name}")
    reservation = fields.get(3)
    if not isinstance(reservation, bytes):
        raise RelayError(f"relay {relay} said OK but sent no reservation")
    expire = dict(_fields(reservation)).get(1)
    if not isinstance(expire, int):
        raise RelayError(f"relay {relay} sent a reservation without an expiry")
    limit = fields.get(4)
    limits = dict(_fields(limit)) if isinstance(limit, bytes) else {}
    duration, data = limits.get(1), limits.get(2)
    return Reservation(
        relay=relay,
        expires_at=float(expire),
        limit_duration_s=float(duration) if isinstance(duration, int) and duration > 0 else None,
        limit_bytes=data if isinstance(data, int) and data > 0 else None,
    )


def relayed_targets(
    records: Mapping[str, NodeRecord], plan: PlanRecord | None, peers: Iterable[str] | None = None
) -> dict[str, tuple[str, ...]]:
    """peer -> announced addrs, for the relay-only peers among `peers` (default: every peer the
    plan places) that have a record."""
    if peers is None:
        peers = () if plan is None else plan.placement
    return {
        peer: records[peer].addrs
        for peer in peers
        if peer in records and records[peer].reachability == Reachability.RELAY
    }


# ----------------------------------------------------------------------------- network parts


class _RawMaddr:
    """A multiaddr already in binary form, for p2pd's CONNECT (which calls `to_bytes()`)."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def to_bytes(self) -> bytes:
        return self._raw


async def reserve(p2p: P2P, relay: str, *, timeout_s: float = 10.0) -> Reservation:
    """Ask `relay` (a peer id this peer is connected to) for a slot; raises RelayError."""
    try:
        _, reader, writer = await asyncio.wait_for(
            p2p.call_binary_stream_handler(PeerID.from_base58(relay), HOP_PROTOCOL), timeout_s
        )
    except (P2PDaemonError, ControlFailure, asyncio.TimeoutError, ConnectionError) as e:
        raise RelayError(f"cannot open a relay stream to {relay}: {type(e).__name__} {e}") from None
    try:
        writer.write(reserve_request())
        await writer.drain()
        head = b""
        while not head or head[-1] & 0x80:
            if len(head) > 4:
                raise RelayError(f"relay {relay} sent an oversized message")
            head += await asyncio.wait_for(reader.readexactly(1), timeout_s)
        size, _ = _read_varint(head, 0)
        if size > MAX_HOP_MESSAGE_BYTES:
            raise RelayError(f"relay {relay} sent a {size}-byte message (cap {MAX_HOP_MESSAGE_BYTES})")
        body = await asyncio.wait_for(reader.readexactly(size), timeout_s)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as e:
        raise RelayError(f"relay {relay} did not answer the reservation: {type(e).__name__}") from None
    finally:
        writer.close()
    return parse_reserve_reply(body, relay)


async def connect_through_relay(
    p2p: P2P, peer_id: str, addrs: Iterable[str], *, timeout_s: float = 10.0
) -> str:
    """Open a connection to `peer_id` through one of its relayed `addrs`; returns the address that
    worked. Later calls to the peer by id reuse the connection."""
    circuits = circuit_addrs_of(peer_id, addrs)
    if not circuits:
        raise RelayError(f"{peer_id} announces no relayed address")
    errors = []
    for addr in circuits:
        try:
            raw = _RawMaddr(maddr_to_bytes(addr))
            # hivemind's P2P offers no connect call; p2pd's CONNECT is the daemon's public control
            # API, reached through the client object hivemind itself uses for it.
            await asyncio.wait_for(p2p._client.connect(PeerID.from_base58(peer_id), [raw]), timeout_s)
            return addr
        except (RelayError, P2PDaemonError, ControlFailure, asyncio.TimeoutError, ConnectionError) as e:
            errors.append(f"{addr}: {type(e).__name__} {str(e).strip().splitlines()[-1] if str(e) else ''}")
    raise RelayError(f"cannot reach {peer_id} through a relay: {'; '.join(errors)}")


async def relayed_connection(p2p: P2P, peer_id: str) -> bool:
    """Whether this peer's only connections to `peer_id` run through a relay (False when the
    daemon cannot say)."""
    try:
        peers = await p2p.list_peers()
    except (P2PDaemonError, ControlFailure, ConnectionError) as e:
        logger.debug("cannot list connected peers: %s", e)
        return False
    addrs = [str(a) for info in peers if info.peer_id.to_base58() == peer_id for a in info.addrs]
    return bool(addrs) and all(CIRCUIT in a for a in addrs)


async def connected_peers(p2p: P2P) -> set[str]:
    """Peer ids this peer's daemon holds a connection to."""
    return {info.peer_id.to_base58() for info in await p2p.list_peers()}


@dataclass
class RelayDialer:
    """Keeps connections open to relayed peers this peer must call (a bounded set chosen by the
    caller), dialing through their relays when no connection exists. One failure is logged once
    per peer until it succeeds again."""

    p2p: P2P
    timeout_s: float = 10.0
    #: a peer that could not be reached is tried again after this long, not at every call
    retry_after_s: float = 15.0

    def __post_init__(self) -> None:
        self._failed_at: dict[str, float] = {}
        self._via: dict[str, str] = {}

    async def reach(self, targets: dict[str, tuple[str, ...]]) -> dict[str, str]:
        """Connect to each `peer -> its record's addrs` not connected yet; returns peer -> the
        relayed address used, for the peers dialed this time."""
        if not targets:
            return {}
        try:
            have = await connected_peers(self.p2p)
        except (P2PDaemonError, ControlFailure, ConnectionError) as e:
            logger.info("cannot list connected peers: %s", e)
            return {}
        dialed = {}
        for peer, addrs in targets.items():
            failed_at = self._failed_at.get(peer)
            if peer in have or (failed_at is not None and time.monotonic() - failed_at < self.retry_after_s):
                continue
            started = time.perf_counter()
            try:
                addr = await connect_through_relay(self.p2p, peer, addrs, timeout_s=self.timeout_s)
            except RelayError as e:
                if failed_at is None:
                    logger.warning("%s; trying again in %.0f s", e, self.retry_after_s)
                self._failed_at[peer] = time.monotonic()
                continue
            self._failed_at.pop(peer, None)
            dialed[peer] = addr
            if self._via.get(peer) != addr:
                logger.info(
                    "reached %s through a relay at %s (%.0f ms)",
                    peer,
                    addr,
                    (time.perf_counter() - started) * 1e3,
                )
                self._via[peer] = addr
        return dialed
