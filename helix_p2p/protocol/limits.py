"""What one node lets callers use: sessions, queued steps, KV positions, bytes in flight, message
and step sizes, idle time.

Volunteers serve strangers, so every resource a message can claim has a cap, and the caps that
matter against one greedy caller are per peer: a peer past one of its caps is answered busy, naming
the cap, while other peers are still served. Node-wide caps (`max_sessions`, `max_bytes_in_flight`,
the shard's KV budget) bound the total, which is what bounds memory against many peer ids at once.
`PeerQuota` is the bookkeeping (pure; the serving side calls it from its event loop). The peer that
counts is the one that sends the message: for the first hop that is the client, for later hops the
hop before, which carries all its clients' sessions (so per-peer caps should leave room for a
neighbour's traffic)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from helix_p2p.errors import HelixError

MIB = 1 << 20


class LimitsError(HelixError):
    """A `DataPlaneLimits` setting is out of range."""


@dataclass(frozen=True)
class DataPlaneLimits:
    #: sessions open on this node at once, from everyone
    max_sessions: int = 1024
    #: sessions one peer may hold open here
    max_sessions_per_peer: int = 256
    #: steps from one peer that may be queued or running here at once
    max_queued_steps_per_peer: int = 256
    #: KV positions (sum of max_length) one peer's sessions may reserve here
    max_kv_tokens_per_peer: int = 1 << 20
    #: request bytes from one peer being received or served here at once
    max_bytes_in_flight_per_peer: int = 512 * MIB
    #: request bytes being received or served here at once, from everyone
    max_bytes_in_flight: int = 1024 * MIB
    #: tokens in one step (a prefill longer than this is sent in several steps)
    max_step_tokens: int = 8192
    #: the largest request accepted, in bytes (hidden states of a long prefill)
    max_request_bytes: int = 256 * MIB
    #: a session untouched this long is closed and its KV freed
    idle_timeout_s: float = 300.0
    #: how long a hop waits for the next one before answering "unreachable"
    hop_timeout_s: float = 120.0
    #: decode/prefill steps one batched forward may take
    max_batch_steps: int = 64

    def __post_init__(self) -> None:
        counts = ("max_sessions", "max_sessions_per_peer", "max_queued_steps_per_peer", "max_kv_tokens_per_peer",
                  "max_bytes_in_flight_per_peer", "max_bytes_in_flight", "max_step_tokens",
                  "max_request_bytes", "max_batch_steps")  # fmt: skip
        for name in counts:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise LimitsError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("idle_timeout_s", "hop_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise LimitsError(f"{name} must be a finite number > 0, got {value!r}")


class PeerQuota:
    """What each peer holds here: open sessions and their KV positions, steps in flight, request
    bytes in flight. `refuse_*` says why a peer may not take more (None: it may, then call `add_*`)."""

    def __init__(self, limits: DataPlaneLimits) -> None:
        self.limits = limits
        self.sessions: Counter[str] = Counter()
        self.kv_tokens: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()
        self.bytes_in_flight: Counter[str] = Counter()

    @property
    def total_sessions(self) -> int:
        return sum(self.sessions.values())

    @property
    def total_bytes_in_flight(self) -> int:
        return sum(self.bytes_in_flight.values())

    def refuse_session(self, peer: str, kv_tokens: int = 0) -> str | None:
        limits = self.limits
        if self.total_sessions >= limits.max_sessions:
            return f"it holds its limit of {limits.max_sessions} sessions"
        if self.sessions[peer] >= limits.max_sessions_per_peer:
            return f"peer {peer} already holds its limit of {limits.max_sessions_per_peer} sessions here"
        if self.kv_tokens[peer] + kv_tokens > limits.max_kv_tokens_per_peer:
            return (
                f"peer {peer} holds {self.kv_tokens[peer]} KV positions here and asks for {kv_tokens} more, "
                f"over its limit of {limits.max_kv_tokens_per_peer} per peer"
            )
        return None

    def add_session(self, peer: str, kv_tokens: int = 0) -> None:
        self.sessions[peer] += 1
        if kv_tokens:
            self.kv_tokens[peer] += kv_tokens

    def remove_session(self, peer: str, kv_tokens: int = 0) -> None:
        self._decrement(self.sessions, peer)
        if kv_tokens:
            self._decrement(self.kv_tokens, peer, kv_tokens)

    def refuse_step(self, peer: str) -> str | None:
        if self.steps[peer] >= self.limits.max_queued_steps_per_peer:
            return f"peer {peer} already has its limit of {self.limits.max_queued_steps_per_peer} steps queued here"
        return None

    def add_step(self, peer: str) -> None:
        self.steps[peer] += 1

    def remove_step(self, peer: str) -> None:
        self._decrement(self.steps, peer)

    def refuse_bytes(self, peer: str, num_bytes: int) -> str | None:
        limits = self.limits
        if self.bytes_in_flight[peer] + num_bytes > limits.max_bytes_in_flight_per_peer:
            return (
                f"peer {peer} has {self.bytes_in_flight[peer]} request bytes in flight here and sends "
                f"{num_bytes} more, over its limit of {limits.max_bytes_in_flight_per_peer} bytes per peer"
            )
        if self.total_bytes_in_flight + num_bytes > limits.max_bytes_in_flight:
            return f"it has its limit of {limits.max_bytes_in_flight} request bytes in flight"
        return None

    def add_bytes(self, peer: str, num_bytes: int) -> None:
        if num_bytes:
            self.bytes_in_flight[peer] += num_bytes

    def remove_bytes(self, peer: str, num_bytes: int) -> None:
        if num_bytes:
            self._decrement(self.bytes_in_flight, peer, num_bytes)

    @staticmethod
    def _decrement(counter: Counter[str], peer: str, amount: int = 1) -> None:
        if counter[peer] < amount:
            raise RuntimeError(f"quota for {peer} released more than taken")
        counter[peer] -= amount
        if not counter[peer]:
            del counter[peer]
