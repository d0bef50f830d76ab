"""Reaching a peer behind a NAT through a relay (`helix_p2p.swarm.relay`): the binary multiaddrs
p2pd reads, the relay protocol's RESERVE message and answers, and, against real p2p daemons on
127.0.0.1, that a peer listening on nothing is reached only after it holds a reservation."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from swarm_builders import node, plan

from helix_p2p.swarm.relay import (
    RelayError,
    circuit_addr,
    circuit_addrs_of,
    maddr_to_bytes,
    parse_reserve_reply,
    relayed_targets,
    reserve_request,
)

RELAY = "12D3KooWGJLfBrAGgYC7C95AK44utxhYTwXVffn5vHqyzdTkjYzX"
PEER = "12D3KooWLLomccFoZ5cntcsxsCsSNk5bHd8psGhMETPZCDMTvbVh"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _reply(status: int = 100, expire: int = 1_795_260_562, duration: int = 120, data: int = 131072) -> bytes:
    reservation = _field(1, expire) + _field(3, b"voucher")
    limit = _field(1, duration) + _field(2, data)
    return _field(1, 2) + _field(3, reservation) + _field(4, limit) + _field(5, status)


# ------------------------------------------------------------------------------- multiaddrs


def test_ip_and_port_parts_encode_as_hivemind_does() -> None:
    from hivemind.utils.multiaddr import Multiaddr

    for text in ("/ip4/127.0.0.1/tcp/4001", "/ip6/::1/tcp/31337", "/ip4/10.0.0.2/udp/9/quic-v1"):
        assert maddr_to_bytes(text) == Multiaddr(text).to_bytes()


def test_peer_ids_are_plain_multihashes_not_cids() -> None:
    """p2pd refuses a /p2p/ value written as a CIDv1 (hivemind's form): it wants the multihash."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    raw = PeerID.from_base58(PEER).to_bytes()
    assert maddr_to_bytes(f"/p2p/{PEER}") == bytes([0xA5, 0x03]) + _varint(len(raw)) + raw
    text = circuit_addr(f"/ip4/127.0.0.1/tcp/4001/p2p/{RELAY}", PEER)
    assert text == f"/ip4/127.0.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}"
    assert str(Multiaddr(maddr_to_bytes(text))) == text  # the same address, read back


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("ip4/1.2.3.4/tcp/1", "must start with '/'"),
        ("/ip4/300.1.1.1/tcp/1", "/ip4/300.1.1.1"),
        ("/ip4/1.2.3.4/tcp/70000", "out of range"),
        ("/ip4/1.2.3.4/tcp/", "/tcp needs a value"),
        ("/ip4/1.2.3.4/sctp/5", "protocol 'sctp'"),
        ("/ip4/1.2.3.4/tcp/1/p2p/not-a-peer-id", "/p2p/not-a-peer-id"),
    ],
)
def test_bad_multiaddrs_are_named(text: str, named: str) -> None:
    with pytest.raises(RelayError, match="bad multiaddr") as e:
        maddr_to_bytes(text)
    assert named in str(e.value)


def test_a_circuit_needs_a_direct_relay_address_naming_the_relay() -> None:
    with pytest.raises(RelayError, match="must be a direct address"):
        circuit_addr("/ip4/127.0.0.1/tcp/4001", PEER)
    with pytest.raises(RelayError, match="must be a direct address"):
        circuit_addr(f"/ip4/127.0.0.1/tcp/1/p2p/{RELAY}/p2p-circuit/p2p/{PEER}", PEER)


def test_a_record_can_point_readers_only_at_circuits_to_its_own_peer() -> None:
    mine = f"/ip4/1.2.3.4/tcp/1/p2p/{RELAY}/p2p-circuit/p2p/{PEER}"
    addrs = (
        mine,
        f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}",  # direct, not a circuit
        f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}/p2p-circuit/p2p/{RELAY}",  # a circuit to someone else
        f"/ip4/1.2.3.4/tcp/1/p2p/{RELAY}/p2p-circuit/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",  # two hops
    )
    assert circuit_addrs_of(PEER, addrs) == [mine]


def test_relayed_targets_are_the_relay_only_peers_of_the_plan() -> None:
    from helix_p2p.swarm.records import Reachability

    records = {
        "a": node("a", reachability=Reachability.DIRECT),
        "b": node("b", reachability=Reachability.RELAY, addrs=("/x/p2p-circuit/p2p/b",)),
        "c": node("c", reachability=Reachability.RELAY),
    }
    followed = plan(1, "a", {"a": (0, 2), "b": (2, 4)})
    assert relayed_targets(records, followed) == {"b": ("/x/p2p-circuit/p2p/b",)}
    assert set(relayed_targets(records, None, ["a", "b", "c", "gone"])) == {"b", "c"}
    assert relayed_targets(records, None) == {}


# ------------------------------------------------------------------------- relay messages


def test_the_reserve_request_is_a_length_prefixed_hop_message() -> None:
    assert reserve_request() == b"\x02\x08\x00"  # length 2, field 1 (type) = RESERVE


def test_a_granted_reservation_gives_its_expiry_and_the_relays_limits() -> None:
    r = parse_reserve_reply(_reply(), RELAY)
    assert (r.relay, r.expires_at, r.limit_duration_s, r.limit_bytes) == (
        RELAY,
        1_795_260_562.0,
        120.0,
        131072,
    )
    unlimited = parse_reserve_reply(_field(1, 2) + _field(3, _field(1, 7)) + _field(5, 100), RELAY)
    assert (unlimited.limit_duration_s, unlimited.limit_bytes) == (None, None)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (_reply(status=200), "refused a reservation: RESERVATION_REFUSED"),
        (_reply(status=201), "RESOURCE_LIMIT_EXCEEDED"),
        (_reply(status=999), "refused a reservation: 999"),
        (_field(1, 2) + _field(5, 100), "sent no reservation"),
        (_field(1, 0), "message type 0"),
        (_reply()[:-3], "truncated"),
        (b"\x0d\x00\x00\x00\x00", "wire type 5"),
    ],
)
def test_bad_reservation_answers_are_named(body: bytes, named: str) -> None:
    with pytest.raises(RelayError, match=named):
        parse_reserve_reply(body, RELAY)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_answer_parses_or_raises_relay_error(body: bytes) -> None:
    try:
        parse_reserve_reply(body, RELAY)
    except RelayError:
        pass


# ------------------------------------------------------------------- against real daemons


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_peer_listening_nowhere_is_reached_only_through_its_reservation() -> None:
    """Three p2p daemons: a relay, a peer with no listening address (a NAT that lets nothing in),
    and a caller. The caller cannot reach the peer directly, and the relay forwards only to peers
    that reserved a slot; once the peer holds one, the caller connects through the circuit and
    calls the peer's handler. A probe over the circuit measures the relay; one larger than the
    relay's per-connection cap never completes."""
    from google.protobuf.wrappers_pb2 import BytesValue
    from hivemind.p2p import P2P
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

    from helix_p2p.swarm.probe import ProbeError, ProbeServer, measure_link
    from helix_p2p.swarm.relay import (
        RELAYED_PROBE_BYTES,
        RelayDialer,
        connect_through_relay,
        relayed_connection,
        reserve,
    )

    async def scenario() -> None:
        relay = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        peers = [relay]
        try:
            relay_maddr = str((await relay.get_visible_maddrs())[0])
            natted = await P2P.create(
                initial_peers=[relay_maddr], no_listen=True, host_maddrs=None, force_reachability="private"
            )
            peers.append(natted)
            # a DHT client, so that the NATed peer's own DHT never dials it (a NAT lets that out, and
            # the caller would then answer over the NATed peer's connection, needing no relay)
            caller = await P2P.create(
                initial_peers=[relay_maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], dht_mode="client"
            )
            peers.append(caller)

            async def echo(request: BytesValue, context) -> BytesValue:
                return BytesValue(value=b"echo " + request.value)

            await natted.add_protobuf_handler("/test/echo", echo, BytesValue)
            me = natted.peer_id.to_base58()
            circuit = circuit_addr(relay_maddr, me)
            with pytest.raises(ValueError, match="No multiaddrs"):  # it listens on nothing
                await natted.get_visible_maddrs(latest=True)
            with pytest.raises(P2PDaemonError):  # nothing to dial directly
                await caller.call_protobuf_handler(
                    natted.peer_id, "/test/echo", BytesValue(value=b"x"), BytesValue
                )
            # the relay forwards only to peers holding a slot (asked for one without: it refuses;
            # asking for the NATed peer itself now would put its address under libp2p's dial back-off)
            with pytest.raises(RelayError, match="NO_RESERVATION"):
                await connect_through_relay(caller, PEER, [circuit_addr(relay_maddr, PEER)])

            slot = await reserve(natted, relay.peer_id.to_base58())
            dialed = await RelayDialer(caller).reach({me: (circuit,)})
            assert dialed == {me: circuit}
            reply = await caller.call_protobuf_handler(
                natted.peer_id, "/test/echo", BytesValue(value=b"hi"), BytesValue
            )
            assert reply.value == b"echo hi"
            assert await RelayDialer(caller).reach({me: (circuit,)}) == {}  # connected: no new dial
            assert await relayed_connection(caller, me)

            # a probe over the circuit measures the relay; one past the relay's cap of
            # slot.limit_bytes per connection (p2pd keeps libp2p's 128 KiB) never completes
            await ProbeServer().register(natted)
            m = await measure_link(caller, me, probe_bytes=RELAYED_PROBE_BYTES, timeout_s=15)
            assert m.rtt_s > 0 and m.out_bytes_per_s > 0 and m.in_bytes_per_s > 0
            assert slot.limit_bytes is not None and 2 * RELAYED_PROBE_BYTES < slot.limit_bytes
            with pytest.raises(ProbeError):
                await measure_link(caller, me, probe_bytes=2 * slot.limit_bytes, timeout_s=5)
        finally:
            for p in reversed(peers):
                await p.shutdown()

    asyncio.run(scenario())
