"""Placement: which contiguous layers each node holds so that the source-to-sink flow is largest.

`plan(cluster, options, previous)` is the one entry point. Methods: the Helix MILP (`milp`) and the
baselines it is measured against (`petals`, `swarm`, `sp` for separate pipelines). Every method's
placement is scored by the same exact max flow (`helix_p2p.flow`)."""

from __future__ import annotations

from helix_p2p.planner.core import BACKEND_NAMES, METHODS, PlanOptions, Progress, plan, plan_from_placement

__all__ = ["BACKEND_NAMES", "METHODS", "PlanOptions", "Progress", "plan", "plan_from_placement"]
