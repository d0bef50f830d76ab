"""The planner's entry point and the pieces every method shares."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from helix_p2p.cluster import Cluster, NodeId
from helix_p2p.flow import max_flow
from helix_p2p.plan import Placement, Plan, PlanError, moved_layers

#: MILP solvers (OR-Tools MathOpt backends), the default first. HiGHS is the default: on the
#: bundled and synthetic clusters all three reach the same flows and bounds, but on 160 small
#: exact models HiGHS took 7.9 s in all (worst 0.7 s) against SCIP's 59.5 s (worst 14.4 s), and
#: CP-SAT (6.1 s) scales flows to integers and overran a 60 s limit by 20 s at 100 nodes.
#: Named here so that the CLI can list them without importing OR-Tools.
BACKEND_NAMES = ("highs", "scip", "cpsat")


@dataclass(frozen=True)
class Progress:
    """A solver's state during a long solve, for progress displays."""

    elapsed_s: float
    best_tokens_per_s: float
    bound_tokens_per_s: float | None
    #: what the solver is doing now, for people watching (e.g. "searching above 1353.10")
    activity: str = ""


@dataclass(frozen=True)
class PlanOptions:
    method: str = "milp"
    time_limit_s: float = 60.0
    partial_inference: bool = False
    seed: int = 0
    #: called whenever the best flow or the bound improves (long solves)
    progress: Callable[[Progress], None] | None = field(default=None, compare=False)
    #: solver threads; None = all cores
    threads: int | None = None
    #: MILP backend: "scip", "highs" or "cpsat" (see milp.py and benchmarks/planner.py)
    backend: str = BACKEND_NAMES[0]
    #: re-choose the edge flows (same total) so that parallel replicas share it (spread.py):
    #: IWRR weighs the plan's edge flows, and a replica a max flow leaves at zero is never used
    spread_flows: bool = True
    #: with a previous plan, the MILP accepts up to this relative loss of flow (0.02 = 2 %) against
    #: the best placement it found for one that moves fewer layers (stability.py: loading weights
    #: is slow, and near-equal optima abound); None takes the best flow found as it is
    keep_layers_tolerance: float | None = 0.02
    #: MILP: publish, among the max-flow placement and shallower stage placements, the one of most
    #: flow per hop (flow / mean hops a token passes), the flow that can actually be served
    #: (servable.py); False publishes the max-flow placement
    servable: bool = True


def plan_from_placement(
    cluster: Cluster,
    placement: Placement,
    *,
    method: str,
    solve_seconds: float,
    upper_bound_tokens_per_s: float | None = None,
    partial_inference: bool = False,
    details: Mapping[str, object] | None = None,
) -> Plan:
    """Score a placement with the exact max flow and wrap it as a Plan."""
    flow = max_flow(cluster, placement, partial_inference)
    bound = upper_bound_tokens_per_s
    if bound is not None:
        # A proven bound can never be below a flow we can exhibit; float noise from the solver
        # must not report a negative gap.
        bound = max(bound, flow.value_tokens_per_s)
    return Plan(
        cluster=cluster.name,
        method=method,
        placement=dict(placement),
        flows=flow.flows,
        objective_tokens_per_s=flow.value_tokens_per_s,
        upper_bound_tokens_per_s=bound,
        solve_seconds=solve_seconds,
        partial_inference=partial_inference,
        details=dict(details or {}),
    )


def check_can_hold_model(cluster: Cluster) -> None:
    total = cluster.total_max_layers()
    if total < cluster.model.num_layers:
        raise PlanError(
            f"cluster {cluster.name!r} cannot hold the model: its nodes hold at most {total} layers "
            f"together (sum of max_layers) but {cluster.model.name!r} has {cluster.model.num_layers}"
        )


def plan(cluster: Cluster, options: PlanOptions | None = None, previous: Plan | None = None) -> Plan:
    """Choose a placement for `cluster` with `options.method`; see METHODS."""
    options = options or PlanOptions()
    method = METHODS.get(options.method)
    if method is None:
        raise PlanError(f"unknown planning method {options.method!r}; choose one of {', '.join(METHODS)}")
    tolerance = options.keep_layers_tolerance
    if tolerance is not None and not 0.0 <= tolerance < 1.0:
        raise PlanError(f"keep_layers_tolerance must be in [0, 1) or None, not {tolerance!r}")
    check_can_hold_model(cluster)
    started = time.monotonic()
    result = method(cluster, options, previous)
    if isinstance(result, Plan):
        return _with_moved_layers(_spread(cluster, options, result), previous)
    placement, bound, details = result
    # Petals routes a request to any server holding the next layer it needs, which is exactly the
    # partial-inference edge rule; scoring its placement without it would misrepresent Petals.
    partial = options.partial_inference or options.method == "petals"
    scored = plan_from_placement(
        cluster,
        placement,
        method=options.method,
        solve_seconds=time.monotonic() - started,
        upper_bound_tokens_per_s=bound,
        partial_inference=partial,
        details=details,
    )
    return _with_moved_layers(_spread(cluster, options, scored), previous)


def _with_moved_layers(result: Plan, previous: Plan | None) -> Plan:
    """Records in `details["moved_layers"]` how many layers nodes must load to follow `result`
    from `previous` (what decides whether a re-plan is worth adopting)."""
    if previous is None:
        return result
    moved = moved_layers(previous.placement, result.placement)
    return replace(result, details={**result.details, "moved_layers": moved})


def _spread(cluster: Cluster, options: PlanOptions, result: Plan) -> Plan:
    if not options.spread_flows:
        return result
    from helix_p2p.planner.spread import spread_plan

    return spread_plan(cluster, result)


def _milp(cluster: Cluster, options: PlanOptions, previous: Plan | None) -> Plan:
    from helix_p2p.planner.milp import solve_milp

    return solve_milp(cluster, options, previous)


def _baseline(name: str) -> Callable[..., tuple[dict[NodeId, tuple[int, int]], None, dict]]:
    def run(cluster: Cluster, options: PlanOptions, previous: Plan | None):
        from helix_p2p.planner import baselines

        return getattr(baselines, name)(cluster, seed=options.seed), None, {}

    return run


METHODS: dict[str, Callable[[Cluster, PlanOptions, Plan | None], object]] = {
    "milp": _milp,
    "petals": _baseline("petals_placement"),
    "swarm": _baseline("swarm_placement"),
    "sp": _baseline("separate_pipelines_placement"),
}
