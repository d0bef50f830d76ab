"""When the elected planner re-plans, and whether a new plan is worth the layers it moves.

- Membership: the plan lists the members it planned over; when the live members differ (a node
  left, went stale, or joined) and the difference has held for a debounce period, re-plan.
- Periodically: solve again on the current registry (measured links and throughputs drift) and
  adopt the result only if it gains enough flow to pay for moving layers (loading weights is slow):
  with no layers moved any gain counts; otherwise the flow must grow by `min_gain` (relative).
- The previous plan goes to the planner restricted to the live members, so methods that honour it
  can keep most nodes where they are: the MILP publishes, among placements within
  `PlanOptions.keep_layers_tolerance` (2 %) of the best flow it found, one that moves the fewest
  layers (planner/stability.py), and says how many in `details["moved_layers"]`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from helix_p2p.cluster import Cluster, NodeId
from helix_p2p.plan import Plan
from helix_p2p.planner import plan_from_placement
from helix_p2p.swarm.records import PlanRecord

#: flows within this many tokens/s count as equal (float noise from solvers)
FLOW_EPSILON = 1e-6


def live_placement(
    placement: Mapping[str, tuple[int, int]], cluster: Cluster
) -> dict[NodeId, tuple[int, int]]:
    """The part of `placement` that the live cluster can still run: nodes present, ranges they can hold."""
    kept: dict[NodeId, tuple[int, int]] = {}
    for peer, (start, end) in placement.items():
        node = cluster.node_by_id.get(NodeId(peer))
        if node is None or end > cluster.model.num_layers or end - start > node.max_layers:
            continue
        kept[NodeId(peer)] = (start, end)
    return kept


def previous_plan_on(cluster: Cluster, record: PlanRecord | None) -> Plan | None:
    """`record`'s placement rescored on the live cluster (what following it now yields), or None."""
    if record is None or record.num_layers != cluster.model.num_layers:
        return None
    placement = live_placement(record.placement, cluster)
    if not placement:
        return None
    return plan_from_placement(
        cluster,
        placement,
        method=record.method,
        solve_seconds=0.0,
        partial_inference=record.partial_inference,
        details={"epoch": record.epoch},
    )


def worth_adopting(
    current_tokens_per_s: float, new_tokens_per_s: float, moved_layers: int, min_gain: float
) -> bool:
    if new_tokens_per_s <= current_tokens_per_s + FLOW_EPSILON:
        return False
    if moved_layers == 0 or current_tokens_per_s <= FLOW_EPSILON:
        return True
    return new_tokens_per_s >= current_tokens_per_s * (1.0 + min_gain)


def plan_record_of(
    plan: Plan,
    *,
    epoch: int,
    planner: str,
    model: str,
    num_layers: int,
    members: Iterable[str],
    created_at: float,
) -> PlanRecord:
    return PlanRecord(
        epoch=epoch,
        planner=planner,
        model=model,
        num_layers=num_layers,
        method=plan.method,
        members=tuple(sorted(members)),
        placement={str(peer): span for peer, span in plan.placement.items()},
        flows=plan.flows,
        objective_tokens_per_s=plan.objective_tokens_per_s,
        upper_bound_tokens_per_s=plan.upper_bound_tokens_per_s,
        solve_seconds=plan.solve_seconds,
        created_at=created_at,
        partial_inference=plan.partial_inference,
    )


@dataclass
class MembershipWatch:
    """Debounces membership: reports a member set only after it has held for `debounce_s`."""

    debounce_s: float
    _members: frozenset[str] | None = None
    _since: float = 0.0

    def observe(self, members: Iterable[str], now: float) -> frozenset[str] | None:
        """Feed the current member set; returns it once stable for the debounce period, else None."""
        members = frozenset(members)
        if members != self._members:
            self._members, self._since = members, now
        return members if now - self._since >= self.debounce_s else None
