"""The DHT-side checks every peer runs on every swarm record it stores or receives.

hivemind's `RSASignatureValidator` makes a subkey of the form `[owner:<public key>]` writable only by
the holder of that key (the value must carry a signature by it). On top of that,
`SwarmRecordValidator` checks, for the swarm's own keys:
- the value is a dictionary entry under an owner subkey (a plain value could replace the whole
  registry dictionary, so it is refused);
- the record parses under its schema and is within its size cap;
- a node record's `peer_id` is the peer id of the subkey's key (a peer cannot speak for another),
  and it sits in the registry shard of that peer id;
- a plan's signature verifies, and its signer is the subkey's owner and the plan's planner;
- a report's reporter is the subkey's owner (`helix_p2p.swarm.reports`);
- the expiration is at most MAX_TTL_S away (no squatting).
Keys outside the swarm's prefix pass through untouched."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.timed_storage import MAX_DHT_TIME_DISCREPANCY_SECONDS, get_dht_time

from helix_p2p.swarm.identity import Identity, IdentityError, peer_id_of, public_key_of_owner_subkey
from helix_p2p.swarm.keys import plan_key, registry_keys, registry_shard, reports_key
from helix_p2p.swarm.records import (
    MAX_NODE_RECORD_BYTES,
    MAX_PLAN_RECORD_BYTES,
    MAX_TTL_S,
    RecordError,
    node_record_from_wire,
)
from helix_p2p.swarm.reports import MAX_REPORT_RECORD_BYTES, report_from_wire
from helix_p2p.swarm.signing import verify_plan

logger = logging.getLogger(__name__)

_PLAN = -1
_REPORTS = -2


def key_id(raw_key: str) -> bytes:
    """The DHT's id for a raw key, as records carry it."""
    return DHTID.generate(source=raw_key).to_bytes()


class SwarmRecordValidator(RecordValidatorBase):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._refusals = _RefusalLog()
        self._kinds: dict[bytes, int] = {key_id(k): shard for shard, k in enumerate(registry_keys(prefix))}
        self._kinds[key_id(plan_key(prefix))] = _PLAN
        self._kinds[key_id(reports_key(prefix))] = _REPORTS

    def validate(self, record: DHTRecord) -> bool:
        kind = self._kinds.get(record.key)
        if kind is None:
            return True  # not a swarm key
        try:
            self.check(record, kind)
        except (RecordError, IdentityError, ValueError, TypeError) as e:
            self._refusals.log(record, str(e))
            return False
        return True

    def check(self, record: DHTRecord, kind: int) -> None:
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            raise RecordError("swarm keys hold only owned subkeys, not plain values")
        public_key = public_key_of_owner_subkey(_unpack(record.subkey, "subkey"))
        if public_key is None:
            raise RecordError("swarm records must be stored under an [owner:...] subkey")
        if record.expiration_time > get_dht_time() + MAX_TTL_S + MAX_DHT_TIME_DISCREPANCY_SECONDS:
            raise RecordError(f"expiration more than {MAX_TTL_S} s away")
        limits = {_PLAN: MAX_PLAN_RECORD_BYTES + 16 * 1024, _REPORTS: MAX_REPORT_RECORD_BYTES}
        limit = limits.get(kind, MAX_NODE_RECORD_BYTES)
        if len(record.value) > limit:
            raise RecordError(f"value of {len(record.value)} bytes is over the {limit} byte cap")
        value = _unpack(record.value, "value")
        if kind == _PLAN:
            verify_plan(value, owner_public_key=public_key)
            return
        if kind == _REPORTS:
            report = report_from_wire(value)
            if report.reporter != peer_id_of(public_key):
                raise RecordError(
                    f"report by {report.reporter} stored under the key of {peer_id_of(public_key)}"
                )
            return
        node = node_record_from_wire(value)
        owner = peer_id_of(public_key)
        if node.peer_id != owner:
            raise RecordError(f"record for {node.peer_id} stored under the key of {owner}")
        if registry_shard(node.peer_id) != kind:
            raise RecordError(f"record for {node.peer_id} stored in the wrong registry shard")
        if node.updated_at > get_dht_time() + MAX_DHT_TIME_DISCREPANCY_SECONDS:
            raise RecordError(f"record for {node.peer_id} is dated in the future")


def _unpack(raw: bytes, what: str) -> Any:
    """msgpack from a stranger. The decoder and hivemind's ext types raise many unrelated errors on
    garbage (ValueError, TypeError, KeyError, RecursionError...); each means only "not a record"."""
    try:
        return DHTProtocol.serializer.loads(raw)
    except Exception as e:  # no common base to name; the record is refused, never trusted
        raise RecordError(f"the {what} is not readable msgpack ({type(e).__name__})") from e


class _RefusalLog:
    """One info line per refused record; the same record refused again within `interval_s` is not
    logged again (a stranger can make a peer refuse one record each time it is read or re-sent)."""

    def __init__(self, interval_s: float = 60.0, max_remembered: int = 4096) -> None:
        self.interval_s = interval_s
        self.max_remembered = max_remembered
        self._last_s: dict[tuple[bytes, bytes, int], float] = {}

    def log(self, record: DHTRecord, reason: str) -> None:
        now = time.monotonic()
        seen = (record.key, record.subkey, hash(record.value))
        if now - self._last_s.get(seen, -math.inf) < self.interval_s:
            return
        if len(self._last_s) >= self.max_remembered:  # forget rather than grow without bound
            self._last_s.clear()
        self._last_s[seen] = now
        logger.info("ignored a swarm record that fails its checks: %s", reason)


def swarm_validators(identity: Identity, prefix: str) -> list[RecordValidatorBase]:
    """The validators a swarm peer runs: signatures (and signing its own records), then schema."""
    return [RSASignatureValidator(identity.private_key), SwarmRecordValidator(prefix)]
