"""The discrete-event simulator: what a placement and a scheduler deliver on a cluster, without
owning it. `simulate(cluster, plan, SimConfig(...))` -> `SimResult`. Pure: no wall clock, no I/O
beyond reading the bundled profiles and traces, deterministic for a seed."""

from __future__ import annotations

from helix_p2p.sim.churn import ChurnError, ChurnEvent, ChurnSchedule, parse_churn, read_churn
from helix_p2p.sim.engine import MODES, SimConfig, SimError, SimInvariantError, Simulator, simulate
from helix_p2p.sim.profiles import (
    BatchLimits,
    GpuProfile,
    LatencyCurve,
    ProfileError,
    load_profile,
    profiles_for,
)
from helix_p2p.sim.results import EdgeReport, LatencyStats, NodeReport, PlanChange, SimResult, TimelinePoint
from helix_p2p.sim.traces import LengthSampler, RequestSpec, TraceError, load_lengths, online_arrivals

__all__ = [
    "MODES",
    "BatchLimits",
    "ChurnError",
    "ChurnEvent",
    "ChurnSchedule",
    "EdgeReport",
    "GpuProfile",
    "LatencyCurve",
    "LatencyStats",
    "LengthSampler",
    "NodeReport",
    "PlanChange",
    "ProfileError",
    "RequestSpec",
    "SimConfig",
    "SimError",
    "SimInvariantError",
    "SimResult",
    "Simulator",
    "TimelinePoint",
    "TraceError",
    "load_lengths",
    "load_profile",
    "online_arrivals",
    "parse_churn",
    "profiles_for",
    "read_churn",
    "simulate",
]
