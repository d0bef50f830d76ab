"""Checking that peers compute honestly (`--verify-rate P`).

For a fraction P of steps, the client recomputes the step's whole prefix hop by hop with the
stateless forward call (`helix_p2p.protocol.forward`): each hop of the route and another peer
holding the same layers (any peer whose served range contains them) get the same input, and their
outputs must agree within a tolerance (`tolerance_for`: fp32 1e-3, fp16 2e-2, bf16 5e-2 of the
largest magnitude). On a disagreement a third holder, when there is one, decides: the peer it
outvotes is a *liar* (reported swarm-wide); with no third holder both are only *suspects* (avoided
for a while by this client, never reported). The agreed output feeds the next hop's check.

Last, the check closes the loop with the normal step path: when sampling is greedy, the token the
session returned must be the argmax of the agreed last-position logits (within the tolerance), so a
peer that answers forward calls honestly but lies in steps is caught too, though not pinned down
(every hop of the route becomes a suspect). What this does not catch is in SECURITY.md."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P

from helix_p2p.protocol.errors import DataPlaneError, MalformedMessageError, RemoteInternalError
from helix_p2p.protocol.forward import Forward, Forwarded, decode_forwarded, encode_forward, reply_bytes_bound
from helix_p2p.protocol.messages import RouteHop
from helix_p2p.protocol.transport import exchange
from helix_p2p.shard.sampling import SamplingParams
from helix_p2p.swarm.records import NodeRecord, NodeState

logger = logging.getLogger(__name__)

#: relative tolerance by the dtype peers compute in: different GPUs, kernels and batch shapes
#: round differently, and half precision accumulates more of it over a range of layers
TOLERANCES: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
#: replicas tried for one comparison when some do not answer
MAX_REPLICA_TRIES = 3


class VerificationError(RemoteInternalError):
    """A verified step found a peer of the route computing wrongly; the client fails over."""

    def __init__(self, message: str, suspects: Sequence[str]) -> None:
        super().__init__(message, suspects[0] if len(suspects) == 1 else None)
        self.suspects = tuple(suspects)


def tolerance_for(*dtypes: torch.dtype) -> float:
    """The widest tolerance of the dtypes compared (unknown dtypes: the half-precision one)."""
    return max(TOLERANCES.get(d, TOLERANCES[torch.bfloat16]) for d in dtypes)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the larger of max |a|, max |b|; inf for different shapes or non-finite values."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-6)
    return float((a - b).abs().max()) / scale


def outputs_match(a: torch.Tensor, b: torch.Tensor, tolerance: float | None = None) -> bool:
    tolerance = tolerance_for(a.dtype, b.dtype) if tolerance is None else tolerance
    return relative_error(a, b) <= tolerance


def holders_of(
    records: Mapping[str, NodeRecord], layers: tuple[int, int], model_id: str, exclude: set[str]
) -> list[str]:
    """Live serving peers whose layers contain `layers` (they can run that sub-range), sorted."""
    return sorted(
        p
        for p, r in records.items()
        if p not in exclude
        and r.state == NodeState.SERVING
        and r.model.id == model_id
        and r.layers is not None
        and r.layers[0] <= layers[0]
        and layers[1] <= r.layers[1]
    )


@dataclass(frozen=True)
class Verdict:
    #: outvoted by two agreeing holders of the same layers: reported
    liars: frozenset[str] = frozenset()
    #: a disagreement no third holder could settle: avoided for a while, not reported
    suspects: frozenset[str] = frozenset()
    #: the session's token is not what the agreed recomputation gives (greedy only)
    route_mismatch: bool = False
    #: hops compared with another holder / hops no other holder could check
    checked_hops: int = 0
    unverifiable_hops: int = 0
    details: tuple[str, ...] = field(default=())


class Verifier:
    def __init__(
        self,
        p2p: P2P,
        model_id: str,
        hidden_size: int,
        vocab_size: int,
        *,
        timeout_s: float,
        tolerance: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.p2p = p2p
        self.model_id = model_id
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self.tolerance = tolerance
        self.rng = rng or random.Random()
        #: comparisons made and disagreements found, for logs and tests
        self.comparisons = 0
        self.disagreements = 0

    async def forward(self, peer: str, request: Forward) -> Forwarded:
        """One forward call; a peer that fails or answers malformed raises a retryable error naming it."""
        bound = reply_bytes_bound(request, self.hidden_size, self.vocab_size)
        data = await exchange(self.p2p, peer, encode_forward(request), self.timeout_s, max_reply_bytes=bound)
        try:
            reply = decode_forwarded(data, request, bound)
        except MalformedMessageError as e:
            raise RemoteInternalError(f"peer {peer} answered a forward badly: {e}", peer) from None
        if not isinstance(reply, Forwarded):
            raise reply.exception()
        return reply

    def _match(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return outputs_match(a, b, self.tolerance)

    async def check(
        self,
        route: Sequence[RouteHop],
        token_ids: Sequence[int],
        produced_token: int,
        sampling: SamplingParams,
        holders: Callable[[tuple[int, int], set[str]], list[str]],
    ) -> Verdict:
        """Recompute positions [0, len(token_ids)) along `route`, each hop against another holder.
        `holders(layers, exclude)` lists peers that may be asked for those layers. Errors of the
        route's own hops propagate (the client fails over as for any failed step)."""
        liars: set[str] = set()
        suspects: set[str] = set()
        details: list[str] = []
        checked = unverifiable = 0
        x = torch.tensor(list(token_ids), dtype=torch.int64)
        for hop in route:
            request = (
                Forward(hop.start, hop.end, token_ids=x)
                if hop.start == 0
                else Forward(hop.start, hop.end, hidden_states=x)
            )
            candidates = holders(hop.layers, {hop.peer_id, *liars, *suspects})
            self.rng.shuffle(candidates)
            own, first = await asyncio.gather(
                self.forward(hop.peer_id, request), self._first_answer(candidates, request)
            )
            if first is None:
                unverifiable += 1
                x = own.output
                continue
            replica, theirs = first
            checked += 1
            self.comparisons += 1
            if self._match(own.output, theirs.output):
                x = own.output
                continue
            self.disagreements += 1
            err = relative_error(own.output, theirs.output)
            where = f"layers [{hop.start}, {hop.end})"
            referee = await self._first_answer([c for c in candidates if c != replica], request)
            if referee is None:
                suspects |= {hop.peer_id, replica}
                details.append(
                    f"{where}: {hop.peer_id} and {replica} disagree (error {err:.3g}), no third holder"
                )
                break
            judge, verdict = referee
            with_own, with_theirs = (
                self._match(verdict.output, own.output),
                self._match(verdict.output, theirs.output),
            )
            if with_own and not with_theirs:
                liars.add(replica)
                details.append(f"{where}: {replica} outvoted by {hop.peer_id} and {judge} (error {err:.3g})")
                x = own.output
            elif with_theirs and not with_own:
                liars.add(hop.peer_id)
                details.append(f"{where}: {hop.peer_id} outvoted by {replica} and {judge} (error {err:.3g})")
                x = theirs.output
            else:
                suspects |= {hop.peer_id, replica, judge}
                details.append(f"{where}: {hop.peer_id}, {replica} and {judge} do not settle it")
                break
        else:
            greedy = sampling.greedy and not sampling.needs_history
            if greedy and x.ndim == 1 and not self._token_fits(x, produced_token):
                details.append(
                    f"the route returned token {produced_token}, the verified logits give {int(x.argmax())}"
                )
                return Verdict(
                    frozenset(liars), frozenset(suspects), True, checked, unverifiable, tuple(details)
                )
        return Verdict(frozenset(liars), frozenset(suspects), False, checked, unverifiable, tuple(details))

    def _token_fits(self, logits: torch.Tensor, token: int) -> bool:
        """Greedy: `token` is the argmax of `logits`, or ties with it within the tolerance."""
        if not 0 <= token < logits.shape[0]:
            return False
        logits = logits.float()
        margin = (self.tolerance or tolerance_for(torch.float32)) * float(logits.abs().max())
        return float(logits[token]) >= float(logits.max()) - margin

    async def _first_answer(
        self, candidates: Sequence[str], request: Forward
    ) -> tuple[str, Forwarded] | None:
        """The first of up to MAX_REPLICA_TRIES candidates to answer the forward, or None."""
        for peer in candidates[:MAX_REPLICA_TRIES]:
            try:
                return peer, await self.forward(peer, request)
            except DataPlaneError as e:
                logger.info("verification: holder %s did not answer a forward: %s", peer, e)
        return None
