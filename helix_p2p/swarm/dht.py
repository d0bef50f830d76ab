"""The swarm's view of hivemind's DHT: start a peer with the swarm's validators, announce a node
record, publish a plan, read the registry and the plans. An asyncio library the shells call (the
node, the bootstrap, `helix status`); it runs a `hivemind.dht.DHTNode` in the caller's event loop.

Every value read back has passed hivemind's signature check and `SwarmRecordValidator` on its way
in; parsing it again here is cheap and keeps this module from trusting its local cache."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.wrappers_pb2 import BytesValue
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.multiaddr.exceptions import Error as MultiaddrError
from hivemind.utils.timed_storage import get_dht_time

from helix_p2p.errors import HelixError
from helix_p2p.swarm.identity import Identity, IdentityError, peer_id_of, public_key_of_owner_subkey
from helix_p2p.swarm.keys import plan_key, registry_key, registry_keys, reports_key
from helix_p2p.swarm.records import (
    MAX_TTL_S,
    NodeRecord,
    RecordError,
    SignedPlan,
    node_record_from_wire,
    node_record_to_wire,
    signed_plan_to_wire,
)
from helix_p2p.swarm.reports import ReportRecord, report_from_wire, report_to_wire
from helix_p2p.swarm.sealed_records import SealedRecordValidator
from helix_p2p.swarm.signing import verify_plan
from helix_p2p.swarm.swarm_key import HELLO_PROTOCOL, SwarmKey, bind_swarm_key, hello_answer, hello_refusal
from helix_p2p.swarm.validator import swarm_validators

logger = logging.getLogger(__name__)


class SwarmConnectError(HelixError):
    """The peer could not start or could not reach the swarm."""


@dataclass(frozen=True)
class NetworkOptions:
    """How a peer sits on the network (hivemind's P2P options, named for what they mean here)."""

    host: str = "0.0.0.0"
    port: int = 0
    #: addresses to announce instead of the listening ones (e.g. behind port forwarding)
    announce_addrs: tuple[str, ...] = ()
    #: DHT client: stores nothing for others and answers no DHT queries (peers behind NAT)
    client_mode: bool = False
    #: reach peers behind NAT through libp2p circuit relays
    use_relay: bool = True
    #: when this peer is behind NAT, reserve a slot on a relay so others can reach it
    use_auto_relay: bool = True
    #: accept no inbound connections at all (simulates a strict NAT; reachable only via relays)
    no_listen: bool = False
    #: None: let AutoNAT decide; "public" or "private": force it
    force_reachability: str | None = None
    #: seconds to wait for the first initial peer to answer before giving up
    connect_timeout_s: float = 30.0
    #: a DHT call to a silent peer is abandoned after this long
    rpc_timeout_s: float = 3.0
    #: ask the swarm whether an identity file is already in use by a live peer (slower start)
    check_identity_free: bool = True
    #: a private swarm's shared key (`--swarm-key`): seals records, authenticates RPCs
    swarm_key: SwarmKey | None = None


def host_maddrs(host: str, port: int) -> list[str]:
    proto = "ip6" if ":" in host else "ip4"
    return [f"/{proto}/{host}/tcp/{port}"]


def parse_initial_peers(peers: Sequence[str]) -> list[str]:
    """Check that each initial peer is a full multiaddr with a /p2p/ peer id."""
    checked = []
    for text in peers:
        try:
            maddr = Multiaddr(text)
            maddr["p2p"]
        except MultiaddrError as e:
            raise SwarmConnectError(
                f"bad initial peer {text!r}: expected a multiaddr such as /ip4/1.2.3.4/tcp/31337/p2p/Qm... ({e})"
            ) from None
        checked.append(str(maddr))
    return checked


@dataclass
class SwarmDHT:
    identity: Identity
    prefix: str
    node: DHTNode
    options: NetworkOptions = field(default_factory=NetworkOptions)

    @classmethod
    async def start(
        cls,
        identity: Identity,
        prefix: str,
        initial_peers: Sequence[str] = (),
        options: NetworkOptions | None = None,
    ) -> SwarmDHT:
        options = options or NetworkOptions()
        initial_peers = parse_initial_peers(initial_peers)
        key = options.swarm_key
        if key is not None:
            prefix = key.dht_prefix(prefix)
        validators = swarm_validators(identity, prefix)
        if key is not None:
            validators.append(SealedRecordValidator(key))
        validator = CompositeValidator(validators)
        kwargs: dict[str, Any] = {
            "initial_peers": initial_peers or None,
            "identity_path": str(identity.path),
            "record_validator": validator,
            "client_mode": options.client_mode,
            "use_relay": options.use_relay,
            "use_auto_relay": options.use_auto_relay,
            "wait_timeout": options.rpc_timeout_s,
            "bootstrap_timeout": options.connect_timeout_s,
            "startup_timeout": options.connect_timeout_s,
            "check_if_identity_free": options.check_identity_free,
        }
        if options.no_listen:
            kwargs.update(no_listen=True, host_maddrs=None)
        else:
            kwargs["host_maddrs"] = host_maddrs(options.host, options.port)
        if options.announce_addrs:
            kwargs["announce_maddrs"] = list(options.announce_addrs)
        if options.force_reachability:
            kwargs["force_reachability"] = options.force_reachability
        where = ", ".join(initial_peers) if initial_peers else f"{options.host}:{options.port}"
        try:
            node = await asyncio.wait_for(DHTNode.create(**kwargs), timeout=options.connect_timeout_s + 5)
        except asyncio.TimeoutError:
            raise SwarmConnectError(
                f"no answer from the initial peers ({where}) within {options.connect_timeout_s:g} s; "
                "check the address and that the bootstrap is running and reachable"
            ) from None
        except P2PDaemonError as e:
            message = str(e)
            if "already taken" in message:
                raise IdentityError(f"identity {identity.path} is already used by a running peer") from None
            if "bootstrap" in message:
                raise SwarmConnectError(
                    f"cannot connect to any initial peer ({where}); check the address and that the "
                    "bootstrap is running"
                ) from None
            raise SwarmConnectError(f"cannot start the p2p daemon on {where}: {message}") from None
        except RuntimeError as e:
            if "bootstrap failed" in str(e):
                raise SwarmConnectError(
                    f"none of the initial peers ({where}) answered; check the address and that the "
                    "bootstrap is running"
                ) from None
            raise
        bind_swarm_key(node.p2p, key)
        await node.p2p.add_protobuf_handler(HELLO_PROTOCOL, _hello_handler(key), BytesValue)
        if initial_peers:
            refusal = await _hello_initial_peers(node.p2p, initial_peers, key, options.connect_timeout_s)
            if refusal is not None:
                await cls(identity=identity, prefix=prefix, node=node, options=options).shutdown()
                raise SwarmConnectError(refusal)
        return cls(identity=identity, prefix=prefix, node=node, options=options)

    @property
    def p2p(self) -> P2P:
        return self.node.p2p

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def visible_maddrs(self) -> list[str]:
        try:
            return [str(m) for m in await self.node.get_visible_maddrs(latest=True)]
        except ValueError:  # no addresses (no_listen and no relay reservation yet)
            return []

    async def shutdown(self, timeout_s: float = 3.0) -> None:
        """Stop the DHT peer and its p2p daemon. A Ctrl-C in a terminal reaches the daemon too (it
        is in our process group) and stops it first; hivemind then waits forever on the dead
        daemon's control socket, so the polite path is bounded and the daemon is ended after it."""
        try:
            await asyncio.wait_for(self.node.shutdown(), timeout_s)
        except (asyncio.TimeoutError, OSError, P2PDaemonError) as e:
            logger.info("the p2p daemon had already stopped (%s); closing without it", type(e).__name__)
            _quiet_dead_daemon_errors(asyncio.get_running_loop())
            await asyncio.wait_for(self.node.p2p.shutdown(), timeout_s)

    # ---------------------------------------------------------------------------------- writing

    async def announce(self, record: NodeRecord, ttl_s: float) -> bool:
        """Store this peer's record under its owner subkey until now + ttl_s."""
        if record.peer_id != self.peer_id:
            raise RecordError(f"peer {self.peer_id} cannot announce a record for {record.peer_id}")
        return await self.node.store(
            registry_key(self.prefix, record.peer_id),
            node_record_to_wire(record),
            expiration_time=get_dht_time() + min(ttl_s, MAX_TTL_S),
            subkey=self.identity.owner_subkey,
        )

    async def publish_plan(self, plan: SignedPlan, ttl_s: float) -> bool:
        if plan.record.planner != self.peer_id:
            raise RecordError(f"peer {self.peer_id} cannot publish a plan by {plan.record.planner}")
        return await self.node.store(
            plan_key(self.prefix),
            signed_plan_to_wire(plan),
            expiration_time=get_dht_time() + min(ttl_s, MAX_TTL_S),
            subkey=self.identity.owner_subkey,
        )

    async def publish_report(self, report: ReportRecord, ttl_s: float = MAX_TTL_S) -> bool:
        """Store this peer's report of lying peers (`helix_p2p.swarm.reports`) under its owner subkey."""
        if report.reporter != self.peer_id:
            raise RecordError(f"peer {self.peer_id} cannot publish a report by {report.reporter}")
        return await self.node.store(
            reports_key(self.prefix),
            report_to_wire(report),
            expiration_time=get_dht_time() + min(ttl_s, MAX_TTL_S),
            subkey=self.identity.owner_subkey,
        )

    # ---------------------------------------------------------------------------------- reading

    async def read(self) -> tuple[dict[str, NodeRecord], list[SignedPlan]]:
        """The registry and the plans, in one batched lookup."""
        keys = registry_keys(self.prefix) + [plan_key(self.prefix)]
        found = await self.node.get_many(keys, sufficient_expiration_time=math.inf)
        records: dict[str, NodeRecord] = {}
        for key in keys[:-1]:
            for public_key, value in _entries(found.get(key)):
                try:
                    record = node_record_from_wire(value)
                    if record.peer_id != peer_id_of(public_key):
                        raise RecordError(f"record for {record.peer_id} under another peer's key")
                except (RecordError, IdentityError) as e:
                    logger.debug("ignoring a registry entry: %s", e)
                    continue
                previous = records.get(record.peer_id)
                if previous is None or record.updated_at > previous.updated_at:
                    records[record.peer_id] = record
        plans = []
        for public_key, value in _entries(found.get(keys[-1])):
            try:
                plans.append(verify_plan(value, owner_public_key=public_key))
            except RecordError as e:
                logger.debug("ignoring a plan entry: %s", e)
        return records, plans

    async def read_reports(self) -> list[ReportRecord]:
        """Every reporter's current report; an entry that fails the schema or sits under another
        peer's key is ignored (with a debug log line)."""
        found = await self.node.get(reports_key(self.prefix), latest=True)
        reports = []
        for public_key, value in _entries(found):
            try:
                report = report_from_wire(value)
                if report.reporter != peer_id_of(public_key):
                    raise RecordError(f"report by {report.reporter} under another peer's key")
            except (RecordError, IdentityError) as e:
                logger.debug("ignoring a report entry: %s", e)
                continue
            reports.append(report)
        return reports

    async def read_registry(self) -> dict[str, NodeRecord]:
        return (await self.read())[0]


def _hello_handler(key: SwarmKey | None) -> Any:
    async def hello(request: BytesValue, context: P2PContext) -> BytesValue:
        return BytesValue(value=hello_answer(key))

    return hello


async def _hello_initial_peers(
    p2p: P2P, initial_peers: Sequence[str], key: SwarmKey | None, timeout_s: float
) -> str | None:
    """Why this peer may not join through `initial_peers` (None: it may). libp2p lets anyone
    connect (the daemon has no private-network key), so each side says whether its swarm is private
    and under which key id; one matching initial peer is enough. A keyless peer that hears no
    answer goes on (an older peer); a keyed one does not, since it cannot tell that the swarm is its own."""

    async def ask(maddr: str) -> tuple[str, bytes | None]:
        peer = Multiaddr(maddr)["p2p"]
        try:
            reply = await asyncio.wait_for(
                p2p.call_protobuf_handler(
                    PeerID.from_base58(peer), HELLO_PROTOCOL, BytesValue(value=b"hello"), BytesValue
                ),
                min(timeout_s, 10.0),
            )
        except (P2PDaemonError, P2PHandlerError, asyncio.TimeoutError, ConnectionError, OSError) as e:
            logger.info("initial peer %s did not answer the swarm hello: %s", peer, type(e).__name__)
            return peer, None
        return peer, reply.value

    answers = await asyncio.gather(*(ask(m) for m in initial_peers))
    refusals = []
    for peer, answer in answers:
        if answer is None:
            continue
        why = hello_refusal(answer, key, peer)
        if why is None:
            return None
        refusals.append(why)
    if refusals:
        return refusals[0]
    if key is None:
        return None
    return (
        f"no initial peer ({', '.join(p for p, _ in answers)}) confirmed it runs the private swarm of "
        f"--swarm-key {key.path} (id {key.key_id})"
    )


def _entries(found: Any) -> list[tuple[bytes, Any]]:
    """(owner public key, value) pairs of a dictionary value read from the DHT."""
    if found is None or not isinstance(found.value, dict):
        return []
    entries = []
    for subkey, item in found.value.items():
        public_key = public_key_of_owner_subkey(subkey)
        if public_key is not None and item.expiration_time > get_dht_time():
            entries.append((public_key, item.value))
    return entries


def _quiet_dead_daemon_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Once the daemon is gone, hivemind's reader tasks on its sockets end with connection errors
    nobody awaits, which asyncio reports as tracebacks at exit. They say only that the daemon is
    gone, which we know: log them at debug level; anything else goes to the previous handler."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), (ConnectionError, asyncio.IncompleteReadError)):
            logger.debug("after the p2p daemon stopped: %s", context.get("message"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
