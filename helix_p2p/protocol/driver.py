"""A minimal client of the data plane: open a session along a given route, send prefill and decode
steps to its first hop, receive the tokens the last hop samples, close. Routing, failover and
replay belong to the client library (`helix_p2p.client`); this is the part both it and the tests
share.

    async with await RemoteSession.open(p2p, route, max_length=64) as session:
        tokens = await session.generate(prompt_ids, max_new_tokens=16)"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import torch
from hivemind.p2p import P2P
from typing_extensions import Self

from helix_p2p.protocol.errors import MalformedMessageError
from helix_p2p.protocol.messages import (
    Closed,
    CloseSession,
    Failure,
    Generated,
    Opened,
    OpenSession,
    Reply,
    RouteHop,
    Step,
    check_route,
)
from helix_p2p.protocol.transport import call_peer
from helix_p2p.protocol.wire import encode_request
from helix_p2p.shard.sampling import GREEDY, SamplingParams

DEFAULT_TIMEOUT_S = 120.0


def _expect(reply: Reply, kind: type, session_id: str) -> Reply:
    if isinstance(reply, Failure):
        raise reply.exception()
    if not isinstance(reply, kind) or reply.session_id != session_id:
        raise MalformedMessageError(
            f"expected a {kind.__name__} reply for session {session_id}, got {reply!r}"
        )
    return reply


class RemoteSession:
    """One session on a route. Steps are sent one at a time (a session's steps are ordered)."""

    def __init__(
        self,
        p2p: P2P,
        route: tuple[RouteHop, ...],
        session_id: str,
        max_length: int,
        sampling: SamplingParams,
        timeout_s: float,
    ) -> None:
        self.p2p = p2p
        self.route = route
        self.session_id = session_id
        self.max_length = max_length
        self.sampling = sampling
        self.timeout_s = timeout_s
        #: positions [0, length) are in every hop's KV cache
        self.length = 0
        self.closed = False

    @classmethod
    async def open(
        cls,
        p2p: P2P,
        route: Sequence[RouteHop],
        max_length: int,
        sampling: SamplingParams = GREEDY,
        *,
        session_id: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> RemoteSession:
        route = check_route(route)
        sid = session_id or uuid.uuid4().hex
        message = OpenSession(sid, route, max_length, sampling)
        reply = await call_peer(p2p, route[0].peer_id, encode_request(message), timeout_s)
        _expect(reply, Opened, sid)
        return cls(p2p, route, sid, max_length, sampling, timeout_s)

    async def step(self, token_ids: Sequence[int] | torch.Tensor, position: int | None = None) -> Generated:
        """Run positions [position, position + n) (default: continue the session) through the route;
        returns the token the last hop sampled after them."""
        ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        position = self.length if position is None else position
        message = Step(self.session_id, position, token_ids=ids)
        reply = await call_peer(self.p2p, self.route[0].peer_id, encode_request(message), self.timeout_s)
        generated = _expect(reply, Generated, self.session_id)
        assert isinstance(generated, Generated)
        self.length = position + int(ids.shape[0])
        return generated

    async def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Prefill the prompt, then decode one token per step until a stop token or max_new_tokens."""
        tokens: list[int] = []
        result = await self.step(prompt_ids)
        while True:
            tokens.append(result.token_id)
            if result.finished or len(tokens) >= max_new_tokens:
                return tokens
            result = await self.step([result.token_id])

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        message = CloseSession(self.session_id)
        reply = await call_peer(self.p2p, self.route[0].peer_id, encode_request(message), self.timeout_s)
        _expect(reply, Closed, self.session_id)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def generate(
    p2p: P2P,
    route: Sequence[RouteHop],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[int]:
    """Open a session sized for the prompt and the new tokens, generate, close."""
    session = await RemoteSession.open(
        p2p, route, len(prompt_ids) + max_new_tokens, sampling, timeout_s=timeout_s
    )
    async with session:
        return await session.generate(prompt_ids, max_new_tokens)
