"""A shard's open sessions: their KV caches and samplers, their reservations against the shard's
KV cap, and their ends (close, or idle timeout). Closed ids are remembered for a while, so a late
step hears "closed" (or "expired after 300 s idle") rather than "unknown"."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from helix_p2p.shard.api import SessionInfo
from helix_p2p.shard.errors import (
    KVCapacityError,
    SessionClosedError,
    SessionExistsError,
    UnknownSessionError,
)
from helix_p2p.shard.kv_cache import SessionKV
from helix_p2p.shard.sampling import Sampler

logger = logging.getLogger(__name__)

#: how many closed session ids are remembered, to say "closed" rather than "unknown"
CLOSED_MEMORY = 4096


@dataclass
class Session:
    id: str
    start: int
    end: int
    max_length: int
    kv: SessionKV
    sampler: Sampler | None
    #: token ids of positions [0, kv.length), kept only when sampling reads them
    history: torch.Tensor | None
    last_used: float

    def info(self, now: float) -> SessionInfo:
        return SessionInfo(
            self.id,
            (self.start, self.end),
            self.max_length,
            self.kv.length,
            self.kv.nbytes,
            now - self.last_used,
        )


class SessionTable:
    """The open sessions of one shard (not thread-safe by itself: the shard holds its lock)."""

    def __init__(
        self, *, idle_timeout_s: float, max_kv_tokens: int | None, clock: Callable[[], float], where: str
    ) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.max_kv_tokens = max_kv_tokens
        self.clock = clock
        #: how the shard names itself in errors, e.g. "layers [0, 8)"
        self.where = where
        self._open: dict[str, Session] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._open.values()))

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._open

    @property
    def reserved_kv_tokens(self) -> int:
        return sum(s.max_length for s in self._open.values())

    @property
    def free_kv_tokens(self) -> int | None:
        return None if self.max_kv_tokens is None else self.max_kv_tokens - self.reserved_kv_tokens

    def check_room(self, session_id: str, max_length: int) -> None:
        """Refuse a new session that exists already or would pass the KV cap."""
        if session_id in self._open:
            raise SessionExistsError(f"session {session_id!r} is already open")
        free = self.free_kv_tokens
        if free is not None and max_length > free:
            raise KVCapacityError(
                f"session {session_id!r}: max_length {max_length} exceeds the {free} free KV positions"
            )

    def add(self, session: Session) -> None:
        self.check_room(session.id, session.max_length)
        self._open[session.id] = session
        self._closed.pop(session.id, None)
        logger.debug(
            "session %s opened: layers [%d, %d), max_length %d",
            session.id, session.start, session.end, session.max_length,
        )  # fmt: skip

    def get(self, session_id: str) -> Session:
        session = self._open.get(session_id)
        if session is not None:
            return session
        reason = self._closed.get(session_id)
        if reason is not None:
            raise SessionClosedError(f"session {session_id!r} is {reason}")
        raise UnknownSessionError(f"session {session_id!r} is not open on {self.where}")

    def close(self, session_id: str, reason: str = "closed") -> None:
        """Drop the session and with it the last reference to its KV cache."""
        self.get(session_id)
        del self._open[session_id]
        self._closed[session_id] = reason
        while len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)
        logger.debug("session %s %s", session_id, reason)

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Close sessions idle for more than `idle_timeout_s`; returns their ids."""
        now = self.clock() if now is None else now
        expired = [sid for sid, s in self._open.items() if now - s.last_used > self.idle_timeout_s]
        for sid in expired:
            self.close(sid, f"expired after {self.idle_timeout_s:g} s idle")
        return expired
