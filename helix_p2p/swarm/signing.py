"""Signing and checking plans. The planner signs the exact body bytes it publishes with its identity
key; anyone holding the plan checks the signature, that the key belongs to the peer named as
planner, and (in the DHT) that the key is the owner of the subkey the plan was stored under."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from hivemind.utils.crypto import RSAPublicKey

from helix_p2p.swarm.identity import Identity, IdentityError, peer_id_of
from helix_p2p.swarm.records import (
    PlanRecord,
    RecordError,
    SignedPlan,
    plan_body_bytes,
    plan_record_from_body,
    signed_plan_parts_from_wire,
)

#: Domain separation: the same key signs DHT records, so a plan signature covers this context too
#: and can never be replayed as a signature over some other message.
PLAN_SIGNING_CONTEXT = b"helix-swarm-plan/1\x00"


class PlanSignatureError(RecordError):
    """A plan whose signature, key or planner does not check out."""


def sign_plan(record: PlanRecord, identity: Identity) -> SignedPlan:
    if record.planner != identity.peer_id:
        raise PlanSignatureError(
            f"plan epoch {record.epoch} names planner {record.planner} but is signed by {identity.peer_id}"
        )
    body = plan_body_bytes(record)
    signature = identity.private_key.sign(PLAN_SIGNING_CONTEXT + body)
    return SignedPlan(record=record, body=body, public_key=identity.public_key, signature=signature)


def verify_plan(wire: Any, *, owner_public_key: bytes | None = None) -> SignedPlan:
    """Check a plan as read from the DHT (its wire dict) and return it parsed.

    Raises PlanSignatureError unless the signature over the body verifies with the included public
    key, that key's peer id is the plan's `planner`, and, when `owner_public_key` is given (the key
    in the DHT subkey), it is that same key."""
    body, public_key, signature = signed_plan_parts_from_wire(wire)
    if owner_public_key is not None and owner_public_key != public_key:
        raise PlanSignatureError("plan stored under another peer's subkey than the key that signed it")
    try:
        key = RSAPublicKey.from_bytes(public_key)
        signer = peer_id_of(public_key)
    except (ValueError, IdentityError, UnsupportedAlgorithm) as e:
        raise PlanSignatureError(f"plan carries an unusable public key: {e}") from None
    if not key.verify(PLAN_SIGNING_CONTEXT + body, signature):
        raise PlanSignatureError(f"plan signed by {signer}: bad signature")
    record = plan_record_from_body(body)
    if record.planner != signer:
        raise PlanSignatureError(
            f"plan epoch {record.epoch} names planner {record.planner} but {signer} signed it"
        )
    return SignedPlan(record=record, body=body, public_key=public_key, signature=signature)
