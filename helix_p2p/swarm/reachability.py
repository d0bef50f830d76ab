"""Is a peer reachable directly, or only through a relay? Only someone else can tell: a peer asks
another (the bootstrap, or any node) to dial it back. The helper starts a throw-away libp2p peer
with relays off and tries to connect to the asker's own addresses; success means the asker
accepts direct connections from there.

The helper dials only addresses that carry the asker's own peer id (it cannot be used to probe
third parties), at most a few, one check at a time."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from google.protobuf.wrappers_pb2 import BytesValue
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.multiaddr.exceptions import Error as MultiaddrError

from helix_p2p.swarm.swarm_key import SwarmAuthError, open_reply, open_request, seal_reply, seal_request

logger = logging.getLogger(__name__)

REACH_PROTOCOL = "/helix/reach/1"
MAX_ADDRS = 8


@dataclass(frozen=True)
class ReachResult:
    reachable: bool
    detail: str
    #: False when the helper gave no verdict (it did not answer, or does not offer the check)
    answered: bool = True


def direct_addrs(addrs: list[str], peer_id: str) -> list[str]:
    """The addresses worth dialing back: the peer's own, not through a relay."""
    kept = []
    for text in addrs[:MAX_ADDRS]:
        try:
            owner = Multiaddr(text)["p2p"]
        except MultiaddrError as e:
            logger.debug("skipping a malformed address %r: %s", text, e)
            continue
        if owner == peer_id and "p2p-circuit" not in text:
            kept.append(text)
    return kept


@dataclass
class ReachServer:
    timeout_s: float = 10.0
    #: a check starts a throw-away libp2p daemon: one per peer per this many seconds
    per_peer_interval_s: float = 30.0

    def __post_init__(self) -> None:
        self._one_at_a_time = asyncio.Semaphore(1)
        self._last_check: dict[str, float] = {}

    async def register(self, p2p: P2P) -> None:
        self._p2p = p2p
        await p2p.add_protobuf_handler(REACH_PROTOCOL, self._sealed_check, BytesValue)

    async def _sealed_check(self, request: BytesValue, context: P2PContext) -> BytesValue:
        """The check, for holders of the swarm key only in a private swarm."""
        asker = context.remote_id.to_base58()
        try:
            value = open_request(self._p2p, REACH_PROTOCOL, asker, request.value)
        except SwarmAuthError as e:
            return _reply(ReachResult(False, str(e), answered=False))
        reply = await self._check(BytesValue(value=value), context)
        return BytesValue(value=seal_reply(self._p2p, REACH_PROTOCOL, asker, reply.value))

    async def _check(self, request: BytesValue, context: P2PContext) -> BytesValue:
        try:
            addrs = json.loads(request.value[:16384])
            if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
                raise ValueError("expected a list of multiaddrs")
        except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep for the parser
            return _reply(ReachResult(False, f"bad request: {e}"))
        asker = context.remote_id.to_base58()
        now = time.monotonic()
        if now - self._last_check.get(asker, float("-inf")) < self.per_peer_interval_s:
            return _reply(
                ReachResult(False, f"asked again within {self.per_peer_interval_s:g} s", answered=False)
            )
        if len(self._last_check) > 10_000:  # forget rather than grow without bound
            self._last_check.clear()
        self._last_check[asker] = now
        targets = direct_addrs(addrs, asker)
        if not targets:
            return _reply(ReachResult(False, "no direct addresses to dial (only relayed or none)"))
        async with self._one_at_a_time:
            return _reply(await dial_back(targets, self.timeout_s))


async def dial_back(addrs: list[str], timeout_s: float) -> ReachResult:
    probe = None
    try:
        probe = await asyncio.wait_for(
            P2P.create(
                initial_peers=addrs,
                dht_mode="client",
                use_relay=False,
                use_auto_relay=False,
                auto_nat=False,
                nat_port_map=False,
                no_listen=True,
                host_maddrs=None,
                startup_timeout=timeout_s,
            ),
            timeout_s + 2,
        )
        return ReachResult(True, f"dialed {', '.join(addrs)}")
    except (P2PDaemonError, asyncio.TimeoutError) as e:
        return ReachResult(False, f"could not dial {', '.join(addrs)}: {e or 'timed out'}")
    finally:
        if probe is not None:
            await probe.shutdown()


def _reply(result: ReachResult) -> BytesValue:
    doc = {"reachable": result.reachable, "detail": result.detail, "answered": result.answered}
    return BytesValue(value=json.dumps(doc).encode())


async def ask_dial_back(p2p: P2P, helper: str, my_addrs: list[str], timeout_s: float = 20.0) -> ReachResult:
    """Ask `helper` (a peer id) to dial us back at `my_addrs`."""
    try:
        reply = await asyncio.wait_for(
            p2p.call_protobuf_handler(
                PeerID.from_base58(helper),
                REACH_PROTOCOL,
                BytesValue(value=seal_request(p2p, REACH_PROTOCOL, helper, json.dumps(my_addrs).encode())),
                BytesValue,
            ),
            timeout_s,
        )
        doc = json.loads(open_reply(p2p, REACH_PROTOCOL, helper, reply.value))
        return ReachResult(
            bool(doc["reachable"]), str(doc["detail"]), answered=bool(doc.get("answered", True))
        )
    except (P2PDaemonError, P2PHandlerError, asyncio.TimeoutError, ValueError, KeyError, SwarmAuthError) as e:
        return ReachResult(
            False, f"{helper} did not answer the reachability check: {type(e).__name__} {e}", answered=False
        )
