"""KV-cache-aware admission: route a request now, or let it wait in a bounded FIFO, or reject it with
a reason. Nothing is dropped silently: every offered request ends as admitted or rejected.

The caller owns the KV accounting: after an `Admitted`, it reserves `pipeline.kv_tokens` on every
hop before routing the next request (the loads a router sees are the caller's live view), and it
releases them when the request ends, then calls `drain` so waiting requests get the freed room."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from helix_p2p.cluster import NodeId
from helix_p2p.routing.pipeline import NodeLoad, NoRoute, NoRouteReason, Pipeline, Router, RouteRequest

T = TypeVar("T")


class RejectReason(str, Enum):
    #: no route had free KV cache and the wait queue was full
    QUEUE_FULL = "queue_full"
    #: the request's KV cache is larger than a whole node holds on every route
    TOO_LONG = "too_long"
    #: the plan has no path from the source to the sink over live nodes
    NO_PATH = "no_path"
    #: a node of its pipeline left, and no other route could take it over (see the simulator)
    NODE_LEFT = "node_left"


@dataclass(frozen=True)
class Admitted:
    pipeline: Pipeline


@dataclass(frozen=True)
class Queued:
    #: 0-based place in the wait queue
    position: int


@dataclass(frozen=True)
class Rejected:
    reason: RejectReason
    detail: str


_PERMANENT = {NoRouteReason.TOO_LONG: RejectReason.TOO_LONG, NoRouteReason.NO_PATH: RejectReason.NO_PATH}


class AdmissionQueue(Generic[T]):
    """Requests (`T` is the caller's handle) waiting for KV cache, first come first served."""

    def __init__(self, router: Router, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("queue capacity must be >= 0")
        self.router = router
        self.capacity = capacity
        self._waiting: deque[tuple[T, RouteRequest]] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def waiting(self) -> list[T]:
        return [item for item, _ in self._waiting]

    def offer(
        self, item: T, request: RouteRequest, loads: Mapping[NodeId, NodeLoad], *, front: bool = False
    ) -> Admitted | Queued | Rejected:
        """Admit now if a route has room and nobody is waiting ahead (or `front`, for a request
        that was already admitted once and lost its route); else wait; else reject."""
        if front or not self._waiting:
            outcome = self.router.route(request, loads)
            if isinstance(outcome, Pipeline):
                return Admitted(outcome)
            if outcome.reason in _PERMANENT:
                return Rejected(_PERMANENT[outcome.reason], outcome.detail)
        if len(self._waiting) >= self.capacity:
            return Rejected(
                RejectReason.QUEUE_FULL,
                f"no route has free KV cache and {self.capacity} requests already wait",
            )
        if front:
            self._waiting.appendleft((item, request))
            return Queued(0)
        self._waiting.append((item, request))
        return Queued(len(self._waiting) - 1)

    def drain(self, loads: Mapping[NodeId, NodeLoad]) -> Iterator[tuple[T, Admitted | Rejected]]:
        """Admit waiting requests from the head while routes have room. A head that can never be
        routed is rejected and the next one tried; the first that must keep waiting stops the
        drain (first come, first served). Reserve each admitted request's KV before the next
        iteration: the generator routes the next one only when resumed."""
        while self._waiting:
            item, request = self._waiting[0]
            outcome: Pipeline | NoRoute = self.router.route(request, loads)
            if isinstance(outcome, Pipeline):
                self._waiting.popleft()
                yield item, Admitted(outcome)
            elif outcome.reason in _PERMANENT:
                self._waiting.popleft()
                yield item, Rejected(_PERMANENT[outcome.reason], outcome.detail)
            else:
                return

    def reject_all(self, reason: RejectReason, detail: str) -> list[tuple[T, Rejected]]:
        """Empty the queue, rejecting everyone (e.g. at shutdown)."""
        out = [(item, Rejected(reason, detail)) for item, _ in self._waiting]
        self._waiting.clear()
        return out

    def set_router(self, router: Router) -> None:
        """Route over a new plan from now on (after re-planning)."""
        self.router = router
