"""The data plane's messages as typed values: opening a session along a route, a step, closing, and
the replies. Every message checks itself when built (`__post_init__`), so a decoded message that
exists is well formed; what depends on the serving node (its layers, its budget, its limits) is
checked there.

A session's route is the list of hops (peer, layers [start, end)) that tile the model's layers in
order. The client sends `OpenSession` and each `Step` to the first hop only; each hop forwards to
the next one itself (`hop_index` says where in the route a message is), and the reply of the last
hop travels back along the same calls."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from helix_p2p.protocol.errors import DataPlaneError, ErrorCode, MalformedMessageError, error_for
from helix_p2p.shard.errors import SamplingError
from helix_p2p.shard.sampling import GREEDY, SamplingParams

#: ids a client picks (a uuid4 hex fits); printable, so they can go in logs as they are
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
#: a libp2p peer id in base58 (no 0, O, I, l)
PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{20,128}")
#: protocol-wide caps; each node applies its own, lower limits (`DataPlaneLimits`)
MAX_ROUTE_HOPS = 256
MAX_LAYERS = 1 << 16
MAX_LENGTH = 1 << 24
MAX_STOP_TOKENS = 64
MAX_MESSAGE_CHARS = 2000
TOKEN_DTYPE = torch.int64
HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _is_int(x: object) -> bool:
    return type(x) is int  # bool is an int subclass, and never a count here


def _is_finite_number(x: object) -> bool:
    if type(x) not in (int, float):
        return False
    try:
        return math.isfinite(x)  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float (JSON allows any digits)
        return False


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        shown = repr(session_id)[:80]
        raise MalformedMessageError(
            f"session id {shown} is not 1-64 characters of letters, digits and . _ : - (starting with a letter or digit)"
        )
    return session_id


@dataclass(frozen=True)
class RouteHop:
    """One stage of a route: `peer_id` runs layers [start, end)."""

    peer_id: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str) or not PEER_ID.fullmatch(self.peer_id):
            raise MalformedMessageError(f"route hop peer {repr(self.peer_id)[:80]} is not a base58 peer id")
        if not (_is_int(self.start) and _is_int(self.end) and 0 <= self.start < self.end <= MAX_LAYERS):
            raise MalformedMessageError(
                f"route hop {self.peer_id}: layers [{self.start!r}, {self.end!r}) are not a non-empty range"
            )

    @property
    def layers(self) -> tuple[int, int]:
        return (self.start, self.end)


class _PipelineLike(Protocol):
    @property
    def hops(self) -> Sequence[object]: ...


def route_from_pipeline(pipeline: _PipelineLike) -> tuple[RouteHop, ...]:
    """A `helix_p2p.routing.Pipeline` (hops with peer, start, end) as a route."""
    return tuple(RouteHop(str(h.peer), int(h.start), int(h.end)) for h in pipeline.hops)  # type: ignore[attr-defined]


def check_route(route: Sequence[RouteHop]) -> tuple[RouteHop, ...]:
    route = tuple(route)
    if not 1 <= len(route) <= MAX_ROUTE_HOPS:
        raise MalformedMessageError(f"a route has 1 to {MAX_ROUTE_HOPS} hops, this one {len(route)}")
    if not all(isinstance(h, RouteHop) for h in route):
        raise MalformedMessageError("route hops must be RouteHop values")
    if route[0].start != 0:
        raise MalformedMessageError(f"a route starts at layer 0, this one at {route[0].start}")
    for a, b in itertools.pairwise(route):
        if a.end != b.start:
            raise MalformedMessageError(
                f"route hops must tile the layers: [{a.start}, {a.end}) on {a.peer_id} "
                f"is followed by [{b.start}, {b.end}) on {b.peer_id}"
            )
    return route


@dataclass(frozen=True)
class OpenSession:
    """Open a session on `route[hop_index]` and, through it, on every later hop."""

    session_id: str
    route: tuple[RouteHop, ...]
    max_length: int
    sampling: SamplingParams = GREEDY
    hop_index: int = 0

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        object.__setattr__(self, "route", check_route(self.route))
        if not (_is_int(self.hop_index) and 0 <= self.hop_index < len(self.route)):
            raise MalformedMessageError(
                f"hop index {self.hop_index!r} is outside the route's {len(self.route)} hops"
            )
        if not (_is_int(self.max_length) and 1 <= self.max_length <= MAX_LENGTH):
            raise MalformedMessageError(
                f"max_length must be an int in [1, {MAX_LENGTH}], got {self.max_length!r}"
            )
        if not isinstance(self.sampling, SamplingParams):
            raise MalformedMessageError("sampling must be SamplingParams")
        if len(self.sampling.stop_token_ids) > MAX_STOP_TOKENS:
            raise MalformedMessageError(f"at most {MAX_STOP_TOKENS} stop tokens")

    @property
    def hop(self) -> RouteHop:
        return self.route[self.hop_index]

    @property
    def is_last(self) -> bool:
        return self.hop_index == len(self.route) - 1

    def forwarded(self) -> OpenSession:
        """The same message for the next hop."""
        return replace(self, hop_index=self.hop_index + 1)


@dataclass(frozen=True)
class Step:
    """Positions [position, position + n) of a session: `token_ids` [n] for the first hop (and the
    last one, when its sampling reads the history), `hidden_states` [n, hidden] for later hops."""

    session_id: str
    position: int
    token_ids: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        if not (_is_int(self.position) and 0 <= self.position < MAX_LENGTH):
            raise MalformedMessageError(
                f"position must be an int in [0, {MAX_LENGTH}), got {self.position!r}"
            )
        ids, hidden = self.token_ids, self.hidden_states
        if ids is None and hidden is None:
            raise MalformedMessageError(
                f"session {self.session_id}: a step carries token_ids or hidden_states"
            )
        if ids is not None and not (
            isinstance(ids, torch.Tensor) and ids.ndim == 1 and ids.dtype == TOKEN_DTYPE
        ):
            raise MalformedMessageError(f"session {self.session_id}: token_ids must be a 1-D int64 tensor")
        if hidden is not None and not (
            isinstance(hidden, torch.Tensor) and hidden.ndim == 2 and hidden.dtype in HIDDEN_DTYPES
        ):
            raise MalformedMessageError(
                f"session {self.session_id}: hidden_states must be a [tokens, hidden] float32/bfloat16/float16 tensor"
            )
        if ids is not None and hidden is not None and ids.shape[0] != hidden.shape[0]:
            raise MalformedMessageError(
                f"session {self.session_id}: {ids.shape[0]} token ids for {hidden.shape[0]} hidden states"
            )
        if self.num_tokens < 1:
            raise MalformedMessageError(f"session {self.session_id}: a step needs at least one token")

    @property
    def num_tokens(self) -> int:
        x = self.hidden_states if self.hidden_states is not None else self.token_ids
        assert x is not None
        return int(x.shape[0])

    @property
    def payload_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.token_ids, self.hidden_states) if t is not None
        )


@dataclass(frozen=True)
class CloseSession:
    session_id: str

    def __post_init__(self) -> None:
        check_session_id(self.session_id)


Request = OpenSession | Step | CloseSession


# --- replies -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    """Every hop from this one to the last has reserved the session's KV cache."""

    session_id: str
    #: how many hops, from the one that answered to the last, opened it
    hops: int

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        if not (_is_int(self.hops) and 1 <= self.hops <= MAX_ROUTE_HOPS):
            raise MalformedMessageError(f"an open reply covers 1 to {MAX_ROUTE_HOPS} hops, got {self.hops!r}")


@dataclass(frozen=True)
class Generated:
    """The last hop's answer to a step: the next token after positions [position, position + n)."""

    session_id: str
    position: int
    num_tokens: int
    token_id: int
    #: a stop token, or the session has no room for another position
    finished: bool

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        for name in ("position", "num_tokens", "token_id"):
            value = getattr(self, name)
            if not (_is_int(value) and 0 <= value < MAX_LENGTH * 64):
                raise MalformedMessageError(f"step reply {name} must be an int >= 0, got {value!r}")
        if type(self.finished) is not bool:
            raise MalformedMessageError("step reply 'finished' must be a bool")


@dataclass(frozen=True)
class Closed:
    session_id: str

    def __post_init__(self) -> None:
        check_session_id(self.session_id)


@dataclass(frozen=True)
class Failure:
    """An error reply: what went wrong and which peer said so."""

    code: ErrorCode
    message: str
    peer_id: str = field(default="")

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            raise MalformedMessageError(f"unknown error code {self.code!r}")
        if not isinstance(self.message, str) or not isinstance(self.peer_id, str):
            raise MalformedMessageError("an error reply's message and peer are strings")
        object.__setattr__(self, "message", self.message[:MAX_MESSAGE_CHARS])

    @classmethod
    def of(cls, error: DataPlaneError, peer_id: str) -> Failure:
        return cls(error.code, str(error), error.peer_id or peer_id)

    def exception(self) -> DataPlaneError:
        where = f" (peer {self.peer_id})" if self.peer_id and self.peer_id not in self.message else ""
        return error_for(self.code, f"{self.message}{where}", self.peer_id or None)


Reply = Opened | Generated | Closed | Failure


def sampling_from_fields(fields: dict[str, object]) -> SamplingParams:
    """SamplingParams from decoded fields, refusing wrong types (a SamplingError becomes malformed)."""
    temperature, top_p, penalty = fields["temperature"], fields["top_p"], fields["repetition_penalty"]
    top_k, seed, stops = fields["top_k"], fields["seed"], fields["stop_token_ids"]
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", penalty)):
        if not _is_finite_number(value):
            raise MalformedMessageError(f"sampling {name} must be a finite number, got {value!r}")
    if not _is_int(top_k):
        raise MalformedMessageError(f"sampling top_k must be an int, got {top_k!r}")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 1 << 63):
        raise MalformedMessageError(f"sampling seed must be null or an int in [0, 2^63), got {seed!r}")
    if not (isinstance(stops, list) and len(stops) <= MAX_STOP_TOKENS and all(_is_int(t) for t in stops)):
        raise MalformedMessageError(
            f"sampling stop_token_ids must be a list of at most {MAX_STOP_TOKENS} ints"
        )
    try:
        return SamplingParams(
            temperature=float(temperature),
            top_k=top_k,
            top_p=float(top_p),
            repetition_penalty=float(penalty),
            seed=seed,
            stop_token_ids=tuple(stops),
        )
    except SamplingError as e:
        raise MalformedMessageError(f"sampling: {e}") from None


__all__ = [
    "CloseSession",
    "Closed",
    "ErrorCode",
    "Failure",
    "Generated",
    "OpenSession",
    "Opened",
    "Reply",
    "Request",
    "RouteHop",
    "Step",
    "check_route",
    "check_session_id",
    "route_from_pipeline",
    "sampling_from_fields",
]
