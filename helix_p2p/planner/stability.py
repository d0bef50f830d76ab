"""Re-planning that moves few layers: the MILP's second, lexicographic stage.

Loading weights is the slowest thing a node does, and a swarm that re-plans on every join would
reload most of its layers if the solver returned any one of the many near-equal optima (noisy link
measurements decide which). So when a previous placement exists, the MILP runs a second stage
after its search (milp.solve_milp):

  among placements whose flow is at least (1 - tol) * F1, where F1 is the exact max flow of the
  first stage's best placement, choose one that makes nodes load the fewest new layers.

Moved layers (`helix_p2p.plan.moved_layers`): sum over the nodes that held a range of the layers
they must newly load, |new range \\ previous range|. A node that held nothing (a newcomer) loads
without interrupting anyone, so its layers are free: in the model below it is a supply N[c] of
members that keep any range whole (w), and after the stage `place_idle` gives still-idle nodes the
range that adds most flow (the stage is indifferent to them). The model is milp.build_model's (same variables y[c,s,k] = members of class c holding
[s, s+k), same flow rows and cover cuts), with the flow constrained instead of maximised and:

  P[c,r]                   members of class c that previously held range r (data)
  z[c,r,key] >= 0          members of c moved from previous range r onto the new range `key`,
                           only for ranges that overlap r (the others keep nothing)
  w[c,key] >= 0            newcomers of c (N[c] of them: members that held nothing) on `key`
  (a) sum_key z[c,r,key] <= P[c,r]      a member keeps at most one range
  (a') sum_key w[c,key]  <= N[c]
  (b) sum_r z[c,r,key] + w[c,key] <= y[key]   a new range is kept by at most as many as hold it
  kept  = sum overlap(r, key) * z[c,r,key] + sum k * w[c,key]
  min   moved = sum_key k * y[key] - kept
  s.t.  flow >= (1 - tol) * F1,  moved <= moved(first stage's placement)

For integer y, (a) and (b) are a transportation problem with integer supplies and demands, so
its LP optimum is attained at an integral vertex: an assignment of previous holders to new
ranges. z can therefore stay continuous and `kept` is exactly the most layers that relabelling
members within their class can keep; `assign_members` makes that assignment concrete afterwards.
(With classes split into single nodes, as on small clusters, P[c,r] is 0 or 1 and z is a plain
choice.) The last row is a cutoff, always met by the first stage's placement.

The stage gets its own share of the time limit (the search stops that much earlier) and its
result is re-scored by the exact max flow: it replaces the first stage's placement only if that
flow is within the tolerance and fewer layers move. HiGHS through MathOpt takes no solution
hint, so with HiGHS the stage searches from scratch; the cutoff row and the cover cuts (valid
above the flow floor) keep it small."""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ortools.graph.python import linear_sum_assignment
from ortools.math_opt.python import mathopt

from helix_p2p.cluster import Cluster, NodeId
from helix_p2p.flow import max_flow
from helix_p2p.plan import Placement, moved_layers
from helix_p2p.planner.classes import ClassLink, NodeClass
from helix_p2p.planner.core import PlanOptions

if TYPE_CHECKING:
    from helix_p2p.planner.milp import ClassModel

log = logging.getLogger(__name__)

#: share of the time limit kept back from the first stage for this one when a previous plan exists
STAGE_TIME_SHARE = 0.25
#: the stage is skipped when less than this is left (building the model alone takes longer)
MIN_STAGE_S = 0.5

Key = tuple[int, int, int]  # (class, start, k), as in milp.py
_NONE_BETTER = ("INFEASIBLE", "INFEASIBLE_OR_UNBOUNDED")


def stage_reserve_s(options: PlanOptions, previous: Placement | None) -> float:
    """Seconds the first stage must leave for this one."""
    if not previous or options.keep_layers_tolerance is None or options.partial_inference:
        return 0.0
    return STAGE_TIME_SHARE * options.time_limit_s


def assign_members(
    classes: list[NodeClass], counts: Mapping[Key, int], previous: Placement | None
) -> dict[NodeId, tuple[int, int]]:
    """Give each class's ranges to its members so that the fewest layers must be loaded: a
    min-cost assignment per class, cost |new range minus the member's previous range|."""
    previous = previous or {}
    placement: dict[NodeId, tuple[int, int]] = {}
    for c, cls in enumerate(classes):
        wanted = [
            (start, start + k) for (cc, start, k), n in sorted(counts.items()) if cc == c for _ in range(n)
        ]
        members = list(cls.members)
        if len(wanted) > len(members):
            raise ValueError(f"class {c} has {len(members)} members but {len(wanted)} ranges to hold")
        if not any(m in previous for m in members):
            placement.update(zip(members, wanted))  # nothing to keep: members in order
            continue
        solver = linear_sum_assignment.SimpleLinearSumAssignment()
        # Columns past the wanted ranges are "holds nothing" (cost 0), so the problem is square.
        for i, member in enumerate(members):
            for j in range(len(members)):
                cost = _to_load(wanted[j], previous.get(member)) if j < len(wanted) else 0
                solver.add_arc_with_cost(i, j, cost)
        if solver.solve() != solver.OPTIMAL:
            raise RuntimeError(f"assignment of class {c} failed")  # square with all arcs: cannot happen
        for i, member in enumerate(members):
            j = solver.right_mate(i)
            if j < len(wanted):
                placement[member] = wanted[j]
    return placement


def _to_load(new: tuple[int, int], old: tuple[int, int] | None) -> int:
    if old is None:
        return 0  # a node that held nothing interrupts no one by loading (plan.moved_layers)
    return (new[1] - new[0]) - max(0, min(new[1], old[1]) - max(new[0], old[0]))


@dataclass(frozen=True)
class StageResult:
    placement: dict[NodeId, tuple[int, int]]
    details: dict[str, object]


def keep_previous_layers(
    cluster: Cluster,
    classes: list[NodeClass],
    links: dict[tuple[int, int], ClassLink],
    first: Placement,
    previous: Placement,
    options: PlanOptions,
    deadline: float,
    mode: str,
    backend: str,
    min_layers: int = 1,
    score: Callable[[Placement], float] | None = None,
    max_mean_hops: float | None = None,
) -> StageResult:
    """The placement to publish given the first stage's best (`first`) and the previous one: the
    first relabelled within classes, or, if the stage finds one, a placement within the flow
    tolerance that moves fewer layers. `mode` and `min_layers` are build_model's, as in the
    first stage's search (the stage's model must admit only what the first stage's does).
    `score` is what chose `first` when that was more than its flow (e.g. a servability measure):
    a placement replaces `first` only if its score too is within the tolerance of first's.
    `max_mean_hops` bounds the stage's sum of node flows by that many times its flow (servable.py:
    no deeper than the placement the first stage chose), so its search looks where `score` holds."""
    from helix_p2p.planner.milp import placement_to_counts

    relabelled = assign_members(classes, placement_to_counts(classes, first), previous)
    first_moved = moved_layers(previous, relabelled)
    first_flow = max_flow(cluster, relabelled).value_tokens_per_s
    tol = options.keep_layers_tolerance
    details: dict[str, object] = {"best_flow_tokens_per_s": first_flow, "best_flow_moved_layers": first_moved}
    if tol is None or options.partial_inference or first_moved == 0 or first_flow <= 0:
        filled = place_idle(cluster, relabelled, deadline)
        return StageResult(filled, details | {"stage": "skipped", "idle_placed": len(filled) - len(relabelled)})
    started = time.monotonic()
    floor = (1.0 - tol) * first_flow
    best, best_moved, origin = relabelled, first_moved, "first stage"
    score_floor = None if score is None else (1.0 - tol) * score(relabelled)

    def acceptable(candidate: Placement) -> bool:
        # The model may be a relaxation (multi-member classes across slow links): trust only the
        # exact flow.
        if max_flow(cluster, candidate).value_tokens_per_s < floor * (1 - 1e-9):
            return False
        return score is None or score(candidate) >= score_floor * (1 - 1e-9)

    kept = _still_holdable(cluster, previous)
    if kept and acceptable(kept):
        # Following the previous plan is within the tolerance: nothing needs to move.
        best, best_moved, origin = kept, 0, "previous plan"
    terminations = []
    proven: float | None = None  # a lower bound on the layers any placement within tolerance moves
    stage = None
    if best_moved > 0:
        stage = _build_stage(
            cluster, classes, links, previous, floor, deadline, mode, min_layers, max_mean_hops
        )
        if stage is None:
            terminations.append("OUT_OF_TIME_BUILDING")
    # Two searches in one model, each from the best so far: first with every previous holder kept
    # on its range (only newcomers and idle nodes placed: small and fast), then all nodes free.
    for holders_stay, share in ((True, 0.4), (False, 1.0)):
        if stage is None or best_moved == 0 or (left_s := deadline - time.monotonic()) < MIN_STAGE_S:
            break
        counts, termination, lower = _solve_stage(
            stage,
            cluster,
            best,
            best_moved - 1,
            options,
            time.monotonic() + share * left_s,
            backend,
            holders_stay=holders_stay,
        )
        terminations.append(termination)
        if not holders_stay and stage.cm.refutes:
            # A relaxation's bound holds for every placement; with no placement better than the
            # cutoff, the best so far is optimal.
            proven = best_moved if termination in _NONE_BETTER else lower
        if counts is None:
            continue
        candidate = assign_members(classes, counts, previous)
        moved = moved_layers(previous, candidate)
        if moved < best_moved and acceptable(candidate):
            best, best_moved = candidate, moved
            origin = "holders kept" if holders_stay else "all nodes free"
    details |= {
        "stage": origin,
        "stage_terminations": terminations,
        "stage_seconds": round(time.monotonic() - started, 2),
        "moved_layers_lower_bound": 0
        if best_moved == 0
        else None
        if proven is None
        else min(best_moved, proven),
    }
    # The stage is indifferent to newcomers (their loads are free); give those it left idle the
    # range that adds most flow, if it keeps the score.
    filled = place_idle(cluster, best, deadline, accept=acceptable)
    details["idle_placed"] = len(filled) - len(best)
    best = filled
    if best is not relabelled:
        log.info(
            "keeping layers: %d moved instead of %d, flow %.2f instead of %.2f tokens/s (%s)",
            best_moved,
            first_moved,
            max_flow(cluster, best).value_tokens_per_s,
            first_flow,
            origin,
        )
    return StageResult(dict(best), details)


#: seconds past the stage's deadline that placing idle nodes may still take (a newcomer left
#: idle is a volunteer's GPU wasted until the next re-plan)
IDLE_GRACE_S = 1.0


def place_idle(
    cluster: Cluster,
    placement: Placement,
    deadline: float,
    accept: Callable[[Placement], bool] | None = None,
) -> dict[NodeId, tuple[int, int]]:
    """`placement` with each node that holds nothing given, greedily (fastest first), the range
    that raises the exact max flow most, when one raises it and `accept` agrees. Adding a node
    never lowers max flow and loading it pauses no one, so this costs the swarm nothing; ranges
    are tried longest first so a short deadline still tries the node's fullest ranges."""
    result = dict(placement)
    num_layers = cluster.model.num_layers
    idle = sorted(
        (n for n in cluster.nodes if n.id not in result and n.max_layers > 0),
        key=lambda n: -max(n.tokens_per_s, default=0.0),
    )
    if not idle:
        return result
    flow = max_flow(cluster, result).value_tokens_per_s

    def late() -> bool:
        return time.monotonic() > deadline + IDLE_GRACE_S

    for i, node in enumerate(idle):
        if i > 0 and late():
            break  # the first idle node gets its fullest ranges tried whatever the clock says
        best_range, best_flow = None, flow * (1 + 1e-9) + 1e-9
        top_k = min(node.max_layers, num_layers)
        for k in range(top_k, 0, -1):
            if k < top_k and late():
                break
            for start in range(num_layers - k + 1):
                candidate = result | {node.id: (start, start + k)}
                value = max_flow(cluster, candidate).value_tokens_per_s
                if value > best_flow and (accept is None or accept(candidate)):
                    best_range, best_flow = (start, start + k), value
        if best_range is not None:
            result[node.id] = best_range
            flow = best_flow
    return result


@dataclass
class _StageModel:
    cm: ClassModel
    moved: mathopt.LinearExpression
    #: moved <= bound: only placements better than the best so far are of use
    cutoff: mathopt.LinearConstraint
    #: y[key] >= P[key] while holders must stay, relaxed to >= 0 after
    holders: list[tuple[mathopt.LinearConstraint, int]]


def _build_stage(
    cluster: Cluster,
    classes: list[NodeClass],
    links: dict[tuple[int, int], ClassLink],
    previous: Placement,
    floor: float,
    deadline: float,
    mode: str,
    min_layers: int,
    max_mean_hops: float | None = None,
) -> _StageModel | None:
    """The model of the module docstring, or None if building it ran past the deadline."""
    from helix_p2p.planner.milp import _OutOfTime, add_cover_cuts, build_model

    try:
        # min_layers only when set, so the stage also runs on a build_model without that option
        depth = {"min_layers": min_layers} if min_layers != 1 else {}
        cm = build_model(cluster, classes, mode, links=links, deadline=deadline, **depth)
        cm.model.add_linear_constraint(cm.flow >= floor)
        if max_mean_hops is not None:
            cm.model.add_linear_constraint(mathopt.fast_sum(cm.h.values()) <= max_mean_hops * cm.flow)
        add_cover_cuts(cm, cluster, floor, deadline=deadline)
        moved = _moved_expression(cm.model, classes, cm.y, previous)
    except _OutOfTime:
        return None
    cutoff = cm.model.add_linear_constraint(moved <= math.inf)
    holders = [
        (cm.model.add_linear_constraint(cm.y[key] >= 0), held)
        for key, held in _held_counts(classes, previous).items()
        if key in cm.y
    ]
    cm.model.minimize(moved)
    return _StageModel(cm, moved, cutoff, holders)


def _solve_stage(
    stage: _StageModel,
    cluster: Cluster,
    hint: Placement,
    most_moved: int,
    options: PlanOptions,
    deadline: float,
    backend: str,
    *,
    holders_stay: bool,
) -> tuple[dict[Key, int] | None, str, int | None]:
    """The placement's counts (or None), the termination, and a lower bound on moved layers
    from the solver's dual bound (or None)."""
    from helix_p2p.planner.milp import BACKENDS, _dual_bound, hint_for

    stage.cutoff.upper_bound = most_moved
    for row, held in stage.holders:
        row.lower_bound = held if holders_stay else 0
    cm = stage.cm
    params = mathopt.SolveParameters(
        time_limit=datetime.timedelta(seconds=max(0.2, deadline - time.monotonic())),
        # moved is an integer for every integer placement: a gap below 1 proves the optimum
        absolute_gap_tolerance=0.99,
        threads=None if backend == "highs" else options.threads,
        random_seed=options.seed,
    )
    model_params = None
    if backend != "highs":  # HiGHS through MathOpt takes no hints
        model_params = mathopt.ModelSolveParameters(solution_hints=[hint_for(cm, cluster, hint)])
    try:
        result = mathopt.solve(cm.model, BACKENDS[backend], params=params, model_params=model_params)
    except Exception as e:  # noqa: BLE001 - OR-Tools raises internal status errors of its own types
        # The first stage's placement stands; a failed refinement is no reason to lose the plan.
        log.warning("%s failed on the keep-layers stage: %s", backend, e)
        return None, f"ERROR: {e}", None
    termination = result.termination.reason.name
    bound = _dual_bound(result)
    # moved is an integer: a bound of 11.2 proves 12
    lower = None if bound is None else max(0, math.ceil(bound - 1e-6))
    if not result.has_primal_feasible_solution():
        return None, termination, lower
    values = result.variable_values()
    return {key: n for key, var in cm.y.items() if (n := round(values[var])) > 0}, termination, lower


def _moved_expression(
    model: mathopt.Model,
    classes: list[NodeClass],
    y: Mapping[Key, mathopt.Variable],
    previous: Placement,
) -> mathopt.LinearExpression:
    """sum k * y - kept, with the transportation rows (a) and (b) of the module docstring."""
    held = {(c, (start, start + k)): n for (c, start, k), n in _held_counts(classes, previous).items()}
    by_class: dict[int, list[Key]] = {}
    for key in y:
        by_class.setdefault(key[0], []).append(key)
    kept_terms = []
    keepers: dict[Key, list[mathopt.Variable]] = {}
    for c, cls in enumerate(classes):
        newcomers = sum(1 for m in cls.members if m not in previous)
        if newcomers == 0:
            continue
        row = []
        for key in by_class.get(c, []):
            w = model.add_variable(lb=0, ub=newcomers, name=f"w[{key}]")
            row.append(w)
            keepers.setdefault(key, []).append(w)
            kept_terms.append(key[2] * w)
        if row:
            model.add_linear_constraint(mathopt.fast_sum(row) <= newcomers)  # (a')
    for (c, (old_start, old_end)), supply in held.items():
        row = []
        for key in by_class.get(c, []):
            _, start, k = key
            overlap = min(start + k, old_end) - max(start, old_start)
            if overlap <= 0:
                continue
            z = model.add_variable(lb=0, ub=supply, name=f"z[{c},{old_start},{old_end},{start},{k}]")
            row.append(z)
            keepers.setdefault(key, []).append(z)
            kept_terms.append(overlap * z)
        if row:
            model.add_linear_constraint(mathopt.fast_sum(row) <= supply)  # (a)
    for key, zs in keepers.items():
        model.add_linear_constraint(mathopt.fast_sum(zs) <= y[key])  # (b)
    loaded = mathopt.fast_sum(key[2] * var for key, var in y.items())
    return loaded - mathopt.fast_sum(kept_terms)


def _held_counts(classes: list[NodeClass], previous: Placement) -> dict[Key, int]:
    """P[c,r]: how many members of each class held each range, keyed like y."""
    held: dict[Key, int] = {}
    for c, cls in enumerate(classes):
        for member in cls.members:
            if (rng := previous.get(member)) is not None:
                key = (c, rng[0], rng[1] - rng[0])
                held[key] = held.get(key, 0) + 1
    return held


def _still_holdable(cluster: Cluster, previous: Placement) -> dict[NodeId, tuple[int, int]]:
    """The previous placement's entries that the cluster can still hold as they are."""
    return {
        node: (start, end)
        for node, (start, end) in previous.items()
        if (spec := cluster.node_by_id.get(node)) is not None
        and end <= cluster.model.num_layers
        and end - start <= spec.max_layers
    }
