"""What a simulation reports: throughput, latencies, what happened to every request, KV use per node,
each edge's carried flow beside its planned flow, and a per-second timeline (for churn)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LatencyStats:
    count: int
    mean: float
    p50: float
    p95: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> LatencyStats:
        if not samples:
            return cls(0, math.nan, math.nan, math.nan)
        ordered = sorted(samples)
        return cls(
            len(ordered), sum(ordered) / len(ordered), percentile(ordered, 50), percentile(ordered, 95)
        )


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of sorted samples (numpy's default method)."""
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class NodeReport:
    id: str
    gpu: str
    #: layers held at the end ([start, end)); None if it held none or left
    layers: tuple[int, int] | None
    kv_budget_tokens: int
    kv_peak_tokens: int
    #: time-average of the KV tokens reserved, over the measured window
    kv_mean_tokens: float
    #: fraction of the measured window the node spent computing
    busy_fraction: float


@dataclass(frozen=True)
class EdgeReport:
    src: str
    dst: str
    planned_tokens_per_s: float
    carried_tokens_per_s: float


@dataclass(frozen=True)
class TimelinePoint:
    """One second of simulated time."""

    time_s: float
    decode_tokens: int
    in_flight: int
    waiting: int


@dataclass(frozen=True)
class PlanChange:
    time_s: float
    reason: str
    method: str
    max_flow_tokens_per_s: float
    nodes_reloading: int


@dataclass(frozen=True)
class SimResult:
    cluster: str
    plan_method: str
    scheduler: str
    mode: str
    seed: int
    duration_s: float
    warmup_s: float
    #: the simulated time the run reached (beyond duration_s when draining)
    end_s: float
    decode_tokens_per_s: float
    #: prompt + decode tokens/s entering the pipelines (the flow the plan's max flow bounds)
    carried_tokens_per_s: float
    max_flow_tokens_per_s: float
    prompt_latency_s: LatencyStats
    decode_latency_s: LatencyStats
    arrived: int
    admitted: int
    completed: int
    rejected: dict[str, int]
    in_flight_at_end: int
    waiting_at_end: int
    #: requests that lost a hop to churn and were routed again (their context replayed)
    rerouted: int
    nodes: tuple[NodeReport, ...]
    edges: tuple[EdgeReport, ...]
    timeline: tuple[TimelinePoint, ...] = ()
    plan_changes: tuple[PlanChange, ...] = ()
    events_processed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flow_fraction(self) -> float:
        """Carried over the plan's max flow."""
        return (
            self.carried_tokens_per_s / self.max_flow_tokens_per_s if self.max_flow_tokens_per_s > 0 else 0.0
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["flow_fraction"] = self.flow_fraction
        return _finite(doc)


def _finite(value: Any) -> Any:
    """JSON has no NaN: an empty statistic becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
