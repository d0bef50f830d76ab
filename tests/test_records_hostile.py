"""Hostile DHT records on a live DHT: an honest peer (alice), a hostile DHT peer (mallory) that runs
hivemind's signature check but not the swarm's, so it stores and serves anything it signs itself,
and a reader (bob), all real hivemind peers on 127.0.0.1.

Mallory writes, raw with hivemind's DHT store: a record for alice's peer id (under her own key), an
oversized record, a schema-broken one, a plain value on a registry key (no owner), an unsigned
overwrite of alice's own entry, and a plan with a tampered body. Alice refuses to store each; bob
reads the registry and plans through the swarm reader and sees only alice's honest record and plan,
each bad record being ignored with a log line."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time
from swarm_builders import node, plan

from helix_p2p.swarm.dht import NetworkOptions, SwarmDHT
from helix_p2p.swarm.identity import ephemeral_identity
from helix_p2p.swarm.keys import plan_key, registry_key
from helix_p2p.swarm.records import MAX_NODE_RECORD_BYTES, node_record_to_wire, signed_plan_to_wire
from helix_p2p.swarm.signing import sign_plan

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PREFIX = "hostile-swarm"
TTL_S = 60.0


@pytest.fixture(scope="module")
def identities():
    made = [ephemeral_identity() for _ in range(3)]
    yield made
    for identity in made:
        if identity.path.exists():
            os.chmod(identity.path, 0o600)
            identity.path.unlink()


def test_forged_oversized_and_broken_records_are_ignored_and_logged(identities, caplog) -> None:
    alice, bob, mallory = identities
    options = NetworkOptions(host="127.0.0.1", connect_timeout_s=20, use_relay=False, use_auto_relay=False)

    async def scenario() -> None:
        honest = await SwarmDHT.start(alice, PREFIX, (), options)
        maddrs = await honest.visible_maddrs()
        hostile = await DHTNode.create(
            initial_peers=maddrs,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            identity_path=str(mallory.path),
            record_validator=RSASignatureValidator(mallory.private_key),
        )
        hostile_maddrs = [f"{m}" for m in await hostile.get_visible_maddrs()]
        # bob is a DHT client: his validator runs only on what he reads, so its log lines are his reads
        reader = await SwarmDHT.start(
            bob, PREFIX, maddrs + hostile_maddrs, replace(options, client_mode=True)
        )
        try:
            now = get_dht_time()
            good = node(alice.peer_id, updated_at=now)
            assert await honest.announce(good, ttl_s=TTL_S)
            honest_plan = sign_plan(plan(1, alice.peer_id, {alice.peer_id: (0, 8)}), alice)
            assert await honest.publish_plan(honest_plan, ttl_s=TTL_S)

            own = node_record_to_wire(node(mallory.peer_id, updated_at=now))
            tampered = signed_plan_to_wire(
                sign_plan(plan(2, mallory.peer_id, {mallory.peer_id: (0, 8)}), mallory)
            )
            tampered["body"] = tampered["body"].replace(b'"epoch":2', b'"epoch":9')
            until = now + TTL_S
            writes = {
                "a record for alice's peer id": (
                    registry_key(PREFIX, alice.peer_id),
                    node_record_to_wire(node(alice.peer_id, name="evil", updated_at=now)),
                    mallory.owner_subkey,
                ),
                "an oversized record": (
                    registry_key(PREFIX, mallory.peer_id),
                    dict(own, padding="x" * MAX_NODE_RECORD_BYTES),
                    mallory.owner_subkey,
                ),
                "a schema-broken record": (
                    registry_key(PREFIX, mallory.peer_id),
                    dict(own, free_kv_tokens=-5),
                    mallory.owner_subkey,
                ),
                "a plain value on a registry key": (registry_key(PREFIX, mallory.peer_id), own, None),
                "a tampered plan": (plan_key(PREFIX), tampered, mallory.owner_subkey),
            }
            for what, (key, value, subkey) in writes.items():
                # a plain value replaces a dictionary only with a later expiration
                until += 1
                caplog.clear()
                # mallory's own validator takes it (she signs it), so it is stored on her and served
                kwargs = {} if subkey is None else {"subkey": subkey}
                await hostile.store(key, value, until, **kwargs)
                stored = hostile.protocol.storage.get(_key_id(key))
                assert stored is not None, f"mallory did not keep {what}"
                # alice refused it: her copy of the key holds no entry of mallory's
                assert mallory.peer_id not in _owners(await honest.node.get(key, latest=True)), what

                caplog.clear()
                records, plans = await reader.read()
                assert set(records) == {alice.peer_id}, what
                assert records[alice.peer_id] == good, what
                assert [p.record for p in plans] == [honest_plan.record], what
                lines = [r.getMessage() for r in caplog.records if "swarm record" in r.getMessage()]
                assert lines, f"bob ignored {what} without a log line"

            # an unsigned overwrite of alice's own entry does not even reach mallory's storage
            forged = node_record_to_wire(node(alice.peer_id, name="evil", updated_at=get_dht_time()))
            assert not await hostile.store(
                registry_key(PREFIX, alice.peer_id), forged, until, subkey=alice.owner_subkey
            )
            records, _ = await reader.read()
            assert records[alice.peer_id] == good
        finally:
            await reader.shutdown()
            await hostile.shutdown()
            await honest.shutdown()

    with caplog.at_level(logging.INFO, logger="helix_p2p.swarm.validator"):
        asyncio.run(asyncio.wait_for(scenario(), 150))


def _key_id(key: str):
    from hivemind.dht.routing import DHTID

    return DHTID.generate(source=key)


def _owners(found) -> set[str]:
    """Peer ids of the owner subkeys in a dictionary value read from the DHT."""
    from helix_p2p.swarm.identity import peer_id_of, public_key_of_owner_subkey

    if found is None or not isinstance(found.value, dict):
        return set()
    keys = [public_key_of_owner_subkey(subkey) for subkey in found.value]
    return {peer_id_of(k) for k in keys if k is not None}
