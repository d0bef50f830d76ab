"""Identity, plan signatures, the DHT validators, and real hivemind peers in one process: records are
owned, schema-checked and size-capped; plans verify; forgeries are refused."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from dataclasses import replace

import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time
from swarm_builders import node, plan

from helix_p2p.swarm.dht import NetworkOptions, SwarmConnectError, SwarmDHT
from helix_p2p.swarm.identity import IdentityError, ephemeral_identity, load_identity, peer_id_of
from helix_p2p.swarm.keys import plan_key, registry_key
from helix_p2p.swarm.records import node_record_to_wire, signed_plan_to_wire
from helix_p2p.swarm.signing import PlanSignatureError, sign_plan, verify_plan
from helix_p2p.swarm.validator import SwarmRecordValidator, key_id, swarm_validators

PREFIX = "test-swarm"


@pytest.fixture(scope="module")
def alice():
    identity = ephemeral_identity()
    yield identity
    _remove(identity.path)


@pytest.fixture(scope="module")
def bob():
    identity = ephemeral_identity()
    yield identity
    _remove(identity.path)


def _remove(path):
    if path.exists():
        os.chmod(path, 0o600)
        path.unlink()


# -------------------------------------------------------------------------------------------- identity


def test_identity_is_created_once_and_reused(tmp_path):
    path = tmp_path / "node.id"
    first = load_identity(path)
    again = load_identity(path)
    assert first.peer_id == again.peer_id
    assert first.peer_id == PeerID.from_identity(path.read_bytes()).to_base58()  # same as libp2p's
    assert peer_id_of(first.public_key) == first.peer_id


def test_bad_identity_files_give_clear_errors(tmp_path):
    with pytest.raises(IdentityError, match="does not exist"):
        load_identity(tmp_path / "missing" / "node.id")
    garbage = tmp_path / "garbage.id"
    garbage.write_bytes(b"not a key at all")
    with pytest.raises(IdentityError, match="not a readable libp2p RSA identity"):
        load_identity(garbage)
    with pytest.raises(IdentityError, match="does not exist"):
        load_identity(tmp_path / "absent.id", create=False)


# ------------------------------------------------------------------------------------------- signing


def test_plans_sign_and_verify(alice, bob):
    record = plan(2, alice.peer_id, {alice.peer_id: (0, 8)})
    signed = sign_plan(record, alice)
    wire = signed_plan_to_wire(signed)
    assert verify_plan(wire).record == record
    assert verify_plan(wire, owner_public_key=alice.public_key).record == record
    with pytest.raises(PlanSignatureError, match="another peer's subkey"):
        verify_plan(wire, owner_public_key=bob.public_key)
    with pytest.raises(PlanSignatureError, match="signed by"):
        sign_plan(record, bob)


def test_tampered_or_resigned_plans_are_refused(alice, bob):
    signed = sign_plan(plan(2, alice.peer_id, {alice.peer_id: (0, 8)}), alice)
    tampered = dict(signed_plan_to_wire(signed), body=signed.body.replace(b'"epoch":2', b'"epoch":3'))
    with pytest.raises(PlanSignatureError, match="bad signature"):
        verify_plan(tampered)
    # bob signs a body that names alice as planner, with his own key: the key is not alice's
    forged = dict(
        signed_plan_to_wire(signed),
        public_key=bob.public_key,
        signature=bob.private_key.sign(b"helix-swarm-plan/1\x00" + signed.body),
    )
    with pytest.raises(PlanSignatureError, match="names planner"):
        verify_plan(forged)


# ----------------------------------------------------------------------------------------- validator


def _signed_record(identity, key: str, value, subkey=None, ttl_s: float = 10.0) -> DHTRecord:
    composite = CompositeValidator(swarm_validators(identity, PREFIX))
    record = DHTRecord(
        key=key_id(key),
        subkey=DHTProtocol.serializer.dumps(identity.owner_subkey if subkey is None else subkey),
        value=DHTProtocol.serializer.dumps(value),
        expiration_time=get_dht_time() + ttl_s,
    )
    return dataclasses.replace(record, value=composite.sign_value(record))


def _accepts(identity, record: DHTRecord) -> bool:
    return CompositeValidator(swarm_validators(identity, PREFIX)).validate(record)


def test_validator_accepts_an_owned_record_and_refuses_forgeries(alice, bob):
    mine = node(alice.peer_id, updated_at=get_dht_time())
    wire = node_record_to_wire(mine)
    assert _accepts(bob, _signed_record(alice, registry_key(PREFIX, alice.peer_id), wire))
    # alice writes a record that claims to be bob, under her own key
    claims_bob = node_record_to_wire(replace(mine, peer_id=bob.peer_id))
    assert not _accepts(bob, _signed_record(alice, registry_key(PREFIX, bob.peer_id), claims_bob))
    # alice writes under bob's subkey: she cannot sign it
    assert not _accepts(
        bob, _signed_record(alice, registry_key(PREFIX, alice.peer_id), wire, subkey=bob.owner_subkey)
    )
    # wrong shard
    other_shard = next(
        f"{PREFIX}/nodes/{i}"
        for i in range(16)
        if f"{PREFIX}/nodes/{i}" != registry_key(PREFIX, alice.peer_id)
    )
    assert not _accepts(bob, _signed_record(alice, other_shard, wire))
    # squatting: an expiration far in the future
    assert not _accepts(bob, _signed_record(alice, registry_key(PREFIX, alice.peer_id), wire, ttl_s=10_000))
    # a schema error
    broken = dict(wire, state="dancing")
    assert not _accepts(bob, _signed_record(alice, registry_key(PREFIX, alice.peer_id), broken))
    # dated in the future
    future = node_record_to_wire(replace(mine, updated_at=get_dht_time() + 100))
    assert not _accepts(bob, _signed_record(alice, registry_key(PREFIX, alice.peer_id), future))


def test_validator_refuses_plain_values_on_swarm_keys_and_ignores_other_keys(alice):
    validator = SwarmRecordValidator(PREFIX)
    plain = DHTRecord(
        key=key_id(registry_key(PREFIX, alice.peer_id)),
        subkey=DHTProtocol.IS_REGULAR_VALUE,
        value=DHTProtocol.serializer.dumps("wipe the registry"),
        expiration_time=get_dht_time() + 5,
    )
    assert not validator.validate(plain)
    assert validator.validate(dataclasses.replace(plain, key=key_id("someone-else/key")))


def test_validator_checks_plans(alice, bob):
    signed = sign_plan(plan(1, alice.peer_id, {alice.peer_id: (0, 8)}), alice)
    assert _accepts(bob, _signed_record(alice, plan_key(PREFIX), signed_plan_to_wire(signed)))
    # bob stores alice's (validly signed) plan under his own subkey: the owner is not the signer
    assert not _accepts(alice, _signed_record(bob, plan_key(PREFIX), signed_plan_to_wire(signed)))


# ------------------------------------------------------------------------------ real DHT peers, one loop


async def _swarm(alice, bob):
    options = NetworkOptions(host="127.0.0.1", connect_timeout_s=10)
    first = await SwarmDHT.start(alice, PREFIX, (), options)
    maddrs = await first.visible_maddrs()
    second = await SwarmDHT.start(bob, PREFIX, maddrs, options)
    return first, second


def test_records_and_plans_travel_and_forgeries_do_not(alice, bob):
    async def scenario():
        first, second = await _swarm(alice, bob)
        try:
            now = get_dht_time()
            assert await first.announce(node(alice.peer_id, updated_at=now), ttl_s=30)
            assert await second.announce(node(bob.peer_id, updated_at=now), ttl_s=30)
            signed = sign_plan(plan(1, alice.peer_id, {alice.peer_id: (0, 4), bob.peer_id: (4, 8)}), alice)
            assert await first.publish_plan(signed, ttl_s=30)

            records, plans = await second.read()
            assert set(records) == {alice.peer_id, bob.peer_id}
            assert [p.record for p in plans] == [signed.record]

            # bob overwrites alice's entry: his copy is unsigned by alice, every peer refuses it
            fake = node_record_to_wire(node(alice.peer_id, updated_at=get_dht_time(), name="evil"))
            stored = await second.node.store(
                registry_key(PREFIX, alice.peer_id), fake, get_dht_time() + 30, subkey=alice.owner_subkey
            )
            assert stored is False
            records = await first.read_registry()
            assert records[alice.peer_id].name == f"name-{alice.peer_id}"
            with pytest.raises(Exception, match="cannot announce"):
                await second.announce(node(alice.peer_id), ttl_s=30)
        finally:
            await second.shutdown()
            await first.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_dead_initial_peer_fails_fast_with_a_clear_error(bob):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/QmNhSRP5Q6XgHLUr48Rmns1FDLUhEeoRYLhSM5AwRUWBf7"

    async def scenario():
        await SwarmDHT.start(bob, PREFIX, [dead], NetworkOptions(host="127.0.0.1", connect_timeout_s=5))

    with pytest.raises(SwarmConnectError, match="initial peer"):
        asyncio.run(asyncio.wait_for(scenario(), 30))
    with pytest.raises(SwarmConnectError, match="bad initial peer"):
        asyncio.run(SwarmDHT.start(bob, PREFIX, ["/ip4/127.0.0.1/tcp/9"], NetworkOptions()))


def test_links_are_measured_and_probes_are_rate_limited_per_peer(alice, bob):
    from helix_p2p.swarm.probe import ProbeError, ProbeServer, measure_link
    from helix_p2p.swarm.reachability import ReachServer, ask_dial_back

    async def scenario():
        first, second = await _swarm(alice, bob)
        try:
            await ProbeServer().register(first.p2p)
            await ReachServer().register(first.p2p)
            m = await measure_link(second.p2p, alice.peer_id, probe_bytes=256 * 1024, timeout_s=20)
            assert m.peer == alice.peer_id and m.rtt_s > 0
            assert m.out_bytes_per_s > 0 and m.in_bytes_per_s > 0
            with pytest.raises(ProbeError):  # again at once: over the per-peer rate, the stream is cut
                await measure_link(second.p2p, alice.peer_id, probe_bytes=256 * 1024, timeout_s=20)
            with pytest.raises(ProbeError):  # a peer that serves no probes
                await measure_link(first.p2p, bob.peer_id, probe_bytes=1024, timeout_s=5)

            reach = await ask_dial_back(second.p2p, alice.peer_id, await second.visible_maddrs())
            assert reach.answered and reach.reachable, reach.detail
            again = await ask_dial_back(second.p2p, alice.peer_id, await second.visible_maddrs())
            assert not again.answered  # one check per peer per interval
            silent = await ask_dial_back(first.p2p, bob.peer_id, await first.visible_maddrs(), timeout_s=5)
            assert not silent.answered
        finally:
            await second.shutdown()
            await first.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 90))
