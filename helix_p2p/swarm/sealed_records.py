"""Sealed DHT records for private swarms (`--swarm-key`, see `helix_p2p.swarm.swarm_key`): every
value a keyed peer stores is encrypted and authenticated with AES-256-GCM under a key derived from
the swarm key, with the record's DHT key, subkey and expiration as associated data. A keyed peer
refuses to store or accept a record that does not open, so a peer without the key can neither read
the swarm's records (registry, plans, reports) nor write one that counts, nor move a sealed value
to another key or extend its life."""

from __future__ import annotations

import secrets

from cryptography.exceptions import InvalidTag
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from helix_p2p.swarm.swarm_key import NONCE_BYTES, SwarmAuthError, SwarmKey


class SealedRecordValidator(RecordValidatorBase):
    """Seals every value this peer stores and refuses every record that does not open under the
    swarm key. It runs last when signing (after the owner signature) and first when validating, so
    the other validators see the plaintext."""

    def __init__(self, key: SwarmKey) -> None:
        self._aead = key.aead()

    @staticmethod
    def _associated(record: DHTRecord) -> bytes:
        return MSGPackSerializer.dumps((record.key, record.subkey, record.expiration_time))

    def sign_value(self, record: DHTRecord) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, record.value, self._associated(record))

    def _open(self, record: DHTRecord) -> bytes:
        if len(record.value) < NONCE_BYTES + 16:
            raise SwarmAuthError("record too short to be sealed")
        try:
            return self._aead.decrypt(
                record.value[:NONCE_BYTES], record.value[NONCE_BYTES:], self._associated(record)
            )
        except InvalidTag:
            raise SwarmAuthError("record not sealed with this swarm's key") from None

    def validate(self, record: DHTRecord) -> bool:
        try:
            self._open(record)
        except SwarmAuthError:
            return False
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        return self._open(record)

    @property
    def priority(self) -> int:
        return 20  # above RSASignatureValidator (10): seal after signing, open before checking

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False
