"""The Helix placement MILP, on classes of interchangeable nodes (classes.py).

Formulation. L layers, boundaries p = 0..L. For each class c (N_c members, capacity cap_c(k)
holding k layers, source and sink capacities src_c, snk_c) and each range [s, s+k):

  y[c,s,k] in {0..N_c}  how many members of c hold exactly [s, s+k)
  h[c,s,k] >= 0         tokens/s through those members together

  (1) sum_{s,k} y[c,s,k] <= N_c                       each node holds at most one range
  (2) h[c,s,k] <= u(c,s,k) * y[c,s,k]                 node capacity, where
        u(c,s,k) = min(cap_c(k), src_c if s == 0, snk_c if s+k == L)
      A member starting at 0 receives all its flow over its own source edge and one ending at L
      sends all of it over its own sink edge, so folding those edges into u is exact.
  (3) flow conservation at every inner boundary p = 1..L-1: what nodes ending at p hand on,
      nodes starting at p take over.
  max F = sum_k h[c,0,k]  (the flow leaving the source; by (3) it also reaches the sink)

(3) in full needs a flow w[a,b,p] from class a (ending at p) to class b (starting at p):
      sum_b w[a,b,p] = sum_{s+k=p} h[a,s,k]      sum_a w[a,b,p] = sum_k h[b,p,k]
  When every node pair of (a, b) has a link at least as fast as the slower node's best capacity,
  the pair is *free*: any split between the two sides is realisable (the north-west corner rule
  gives a transport plan whose every arc carries at most min(supply, demand), which such a link
  holds), so w needs no bound. Otherwise, with E[a,p] = sum_{s+k=p} y[a,s,k] members of a ending
  at p and S[b,p] = sum_k y[b,p,k] members of b starting there, the node-level capacity is
  link_ab * E[a,p] * S[b,p]; the product is replaced by its McCormick over-estimators
      w[a,b,p] <= link_ab * N_b * E[a,p]      w[a,b,p] <= link_ab * N_a * S[b,p]
  which are exact when a class has one member and a relaxation otherwise.
  When every pair is free, w is summed out and (3) becomes one balance row per boundary:
      sum_{s+k=p} h[.,s,k] = sum_k h[.,p,k]

Every step is exact or a relaxation of the per-node problem, so the solver's dual bound is a proven
upper bound on the best placement's flow. The placement it returns is re-scored with the exact max
flow (flow.py), which is the objective we report: if a relaxation was used, the solver's value may
be optimistic but the plan's never is."""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass

from ortools.math_opt.python import mathopt

from helix_p2p.cluster import Cluster, NodeId
from helix_p2p.flow import max_flow
from helix_p2p.plan import Placement, Plan
from helix_p2p.planner.classes import NodeClass, class_links, free_blocks, node_classes
from helix_p2p.planner.core import PlanOptions, Progress, plan_from_placement

BACKENDS = {"scip": mathopt.SolverType.GSCIP, "highs": mathopt.SolverType.HIGHS, "cpsat": mathopt.SolverType.CP_SAT}
DEFAULT_BACKEND = "scip"

Range = tuple[int, int]  # (start, k)


@dataclass
class ClassModel:
    model: mathopt.Model
    classes: list[NodeClass]
    y: dict[tuple[int, int, int], mathopt.Variable]
    h: dict[tuple[int, int, int], mathopt.Variable]
    flow: mathopt.LinearExpression
    exact: bool
    num_blocks: int


def ranges_of(cls: NodeClass, num_layers: int) -> list[Range]:
    """The ranges a member of `cls` can usefully hold (zero-capacity ones are left out)."""
    out = []
    for start in range(num_layers):
        for k in range(1, min(cls.max_layers, num_layers - start) + 1):
            if range_capacity(cls, start, k, num_layers) > 0:
                out.append((start, k))
    return out


def range_capacity(cls: NodeClass, start: int, k: int, num_layers: int) -> float:
    cap = cls.capacity_tokens_per_s[k - 1]
    if start == 0:
        cap = min(cap, cls.source_tokens_per_s)
    if start + k == num_layers:
        cap = min(cap, cls.sink_tokens_per_s)
    return cap


def build_model(
    cluster: Cluster, classes: list[NodeClass], restrict: bool = False, cap_tokens_per_s: float | None = None
) -> ClassModel:
    """The model above; with `restrict`, no flow crosses between blocks (an exact restriction
    whose solutions are real, used to find placements when the full model is a relaxation)."""
    num_layers = cluster.model.num_layers
    links = class_links(cluster, classes)
    model = mathopt.Model(name=f"helix-{cluster.name}")
    y: dict[tuple[int, int, int], mathopt.Variable] = {}
    h: dict[tuple[int, int, int], mathopt.Variable] = {}
    ending: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # (class, boundary) -> keys
    starting: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for c, cls in enumerate(classes):
        for start, k in ranges_of(cls, num_layers):
            key = (c, start, k)
            y[key] = model.add_integer_variable(lb=0, ub=cls.count, name=f"y[{c},{start},{k}]")
            h[key] = model.add_variable(lb=0, name=f"h[{c},{start},{k}]")
            u = range_capacity(cls, start, k, num_layers)
            if cap_tokens_per_s is not None:
                u = min(u, cap_tokens_per_s)  # no node carries more than the whole flow
            model.add_linear_constraint(h[key] <= u * y[key])  # (2)
            ending.setdefault((c, start + k), []).append(key)
            starting.setdefault((c, start), []).append(key)
        model.add_linear_constraint(
            mathopt.fast_sum(y[key] for key in y if key[0] == c) <= cls.count  # (1)
        )

    def total(keys: list[tuple[int, int, int]], var: dict) -> mathopt.LinearExpression:
        return mathopt.fast_sum(var[key] for key in keys)

    blocks = free_blocks(classes, links)
    block_of = {c: x for x, block in enumerate(blocks) for c in block}
    block_count = [sum(classes[c].count for c in block) for block in blocks]
    # Block pair capacity: the fastest link between them (an over-estimate where links differ).
    block_link: dict[tuple[int, int], float] = {}
    for (a, b), link in links.items():
        x, z = block_of[a], block_of[b]
        if x != z and link.max_tokens_per_s > 0:
            block_link[(x, z)] = max(block_link.get((x, z), 0.0), link.max_tokens_per_s)
    for p in range(1, num_layers):
        ends = [[key for c in block for key in ending.get((c, p), [])] for block in blocks]
        starts = [[key for c in block for key in starting.get((c, p), [])] for block in blocks]
        if len(blocks) == 1:
            model.add_linear_constraint(total(ends[0], h) == total(starts[0], h))  # (3), summed
            continue
        w_out: dict[int, list[mathopt.LinearExpression]] = {}
        w_in: dict[int, list[mathopt.LinearExpression]] = {}
        for x in range(len(blocks)):
            if ends[x] and starts[x]:
                w = model.add_variable(lb=0, name=f"w[{x},{x},{p}]")  # inside the block: free
                w_out.setdefault(x, []).append(w)
                w_in.setdefault(x, []).append(w)
        if not restrict:
            for (x, z), cap in block_link.items():
                if not ends[x] or not starts[z]:
                    continue
                w = model.add_variable(lb=0, name=f"w[{x},{z},{p}]")
                w_out.setdefault(x, []).append(w)
                w_in.setdefault(z, []).append(w)
                model.add_linear_constraint(w <= cap * block_count[z] * total(ends[x], y))
                model.add_linear_constraint(w <= cap * block_count[x] * total(starts[z], y))
        for x in range(len(blocks)):
            if ends[x]:
                model.add_linear_constraint(total(ends[x], h) == mathopt.fast_sum(w_out.get(x, [])))
            if starts[x]:
                model.add_linear_constraint(total(starts[x], h) == mathopt.fast_sum(w_in.get(x, [])))
    # (4) cover: some node holds every layer. Not implied by the LP (which may spread fractions of
    # nodes over single layers), valid for every placement with positive flow, and it cuts the
    # root bound from the compute bound to something that knows 24 GPUs must share 80 layers.
    for layer in range(num_layers):
        covering = [key for key in y if key[1] <= layer < key[1] + key[2]]
        model.add_linear_constraint(mathopt.fast_sum(y[key] for key in covering) >= 1)
    flow = mathopt.fast_sum(h[key] for key in h if key[1] == 0)
    model.maximize(flow)
    # One block, or no flow between blocks: every flow the model admits is realisable.
    exact = len(blocks) == 1 or restrict
    return ClassModel(model, classes, y, h, flow, exact, len(blocks))


def placement_to_counts(
    classes: list[NodeClass], placement: Placement
) -> dict[tuple[int, int, int], int]:
    class_of = {member: c for c, cls in enumerate(classes) for member in cls.members}
    counts: dict[tuple[int, int, int], int] = {}
    for node, (start, end) in placement.items():
        key = (class_of[node], start, end - start)
        counts[key] = counts.get(key, 0) + 1
    return counts


def counts_to_placement(
    classes: list[NodeClass], counts: dict[tuple[int, int, int], int], previous: Placement | None = None
) -> dict[NodeId, tuple[int, int]]:
    """Give each class's ranges to concrete members, keeping members on the range they held in
    `previous` where possible (fewer layers to load)."""
    placement: dict[NodeId, tuple[int, int]] = {}
    previous = previous or {}
    for c, cls in enumerate(classes):
        wanted = []
        for (cc, start, k), n in sorted(counts.items()):
            if cc == c:
                wanted += [(start, start + k)] * n
        free = list(cls.members)
        rest = []
        for rng in wanted:
            keeper = next((m for m in free if previous.get(m) == rng), None)
            if keeper is None:
                rest.append(rng)
            else:
                placement[keeper] = rng
                free.remove(keeper)
        for rng, member in zip(rest, free):
            placement[member] = rng
    return placement


def hint_for(cm: ClassModel, cluster: Cluster, placement: Placement) -> mathopt.SolutionHint:
    counts = placement_to_counts(cm.classes, placement)
    node_flow = max_flow(cluster, placement).node_flow_tokens_per_s
    class_of = {member: c for c, cls in enumerate(cm.classes) for member in cls.members}
    flows: dict[tuple[int, int, int], float] = {}
    for node, (start, end) in placement.items():
        key = (class_of[node], start, end - start)
        flows[key] = flows.get(key, 0.0) + node_flow.get(node, 0.0)
    values = {var: float(counts.get(key, 0)) for key, var in cm.y.items()}
    values.update({var: flows.get(key, 0.0) for key, var in cm.h.items()})
    return mathopt.SolutionHint(variable_values=values)


def add_cover_cuts(cm: ClassModel, cluster: Cluster, target: float, levels: tuple[int, ...] = (2, 3, 4, 5, 6)) -> None:
    """(5) cover cuts, valid for placements whose flow is at least `target`.

    Every token passes every layer on exactly one node, so the nodes holding layer l carry the
    whole flow: sum_{j covers l} u_j >= F >= target, with a_j = u_j / target, sum_j a_j >= 1.
    The LP satisfies that with fractions of nodes; integer node counts need more. For an integer
    m >= 2 let c_m(a) = m if a >= 1 (the node covers the layer alone) and 1 + floor((m-1) a)
    otherwise, so c_m(a) > (m-1) a. If no covering node has a >= 1, sum c_m > (m-1) sum a >= m-1,
    hence (integers) sum_j c_m(a_j) y_j >= m; if one has, it alone gives m. Summed over layers
    these say, e.g., that 24 GPUs covering 80 layers alone must each hold few layers, which is
    what proves the single-pipeline optimum of Helix's clusters that the plain LP cannot see."""
    num_layers = cluster.model.num_layers
    coverage: dict[int, list[tuple[int, int, int]]] = {layer: [] for layer in range(num_layers)}
    for key in cm.y:
        _, start, k = key
        for layer in range(start, start + k):
            coverage[layer].append(key)
    for layer, keys in coverage.items():
        weights = {
            key: range_capacity(cm.classes[key[0]], key[1], key[2], num_layers) / target for key in keys
        }
        for m in levels:
            # Rounding up keeps the cut valid under float noise: a node just below the target is
            # treated as covering alone, which only weakens the cut.
            coef = {key: m if a >= 1 - 1e-9 else 1 + math.floor((m - 1) * a + 1e-9) for key, a in weights.items()}
            cm.model.add_linear_constraint(mathopt.fast_sum(coef[key] * cm.y[key] for key in keys) >= m)


@dataclass
class _Attempt:
    """One solve of the model restricted to flows >= target."""

    target: float
    #: solved the restriction (no flow between blocks): its infeasibility or bound proves nothing
    restricted: bool
    infeasible: bool
    placement: dict[NodeId, tuple[int, int]] | None
    dual_bound: float | None
    termination: str
    seconds: float


def _attempt(
    cluster: Cluster,
    classes: list[NodeClass],
    target: float,
    hint: Placement | None,
    backend: str,
    deadline: float,
    options: PlanOptions,
    previous: Placement | None,
    restrict: bool = False,
    exactly: bool = False,
) -> _Attempt:
    """With `exactly`, ask for flow == target rather than >= target: equivalent for deciding
    whether the target is reachable (a flow scales down), and then no node carries more than
    the target, which tightens (2) to h <= min(u, target) * y."""
    started = time.monotonic()
    cm = build_model(cluster, classes, restrict, cap_tokens_per_s=target if exactly else None)
    if exactly:
        cm.model.add_linear_constraint(cm.flow == target)
    else:
        cm.model.add_linear_constraint(cm.flow >= target)
    add_cover_cuts(cm, cluster, target)
    params = mathopt.SolveParameters(
        # model building counts against the caller's time too
        time_limit=datetime.timedelta(seconds=max(0.2, deadline - time.monotonic())),
        relative_gap_tolerance=1e-7,
        absolute_gap_tolerance=1e-6,
        threads=options.threads,
        random_seed=options.seed,
    )
    model_params = None
    if hint is not None and backend != "highs":  # HiGHS through MathOpt takes no hints
        model_params = mathopt.ModelSolveParameters(solution_hints=[hint_for(cm, cluster, hint)])
    result = mathopt.solve(cm.model, BACKENDS[backend], params=params, model_params=model_params)
    reason = result.termination.reason
    placement = None
    if result.has_primal_feasible_solution():
        values = result.variable_values()
        counts = {key: int(round(values[var])) for key, var in cm.y.items() if round(values[var]) > 0}
        placement = counts_to_placement(classes, counts, previous)
    infeasible = reason in (mathopt.TerminationReason.INFEASIBLE, mathopt.TerminationReason.INFEASIBLE_OR_UNBOUNDED)
    return _Attempt(
        target=target,
        restricted=restrict and cm.num_blocks > 1,
        infeasible=infeasible,
        placement=placement,
        dual_bound=None if infeasible else _dual_bound(result),
        termination=reason.name,
        seconds=time.monotonic() - started,
    )


def solve_milp(cluster: Cluster, options: PlanOptions, previous: Plan | None = None) -> Plan:
    """Best placement within the time limit and a proven bound, by a sequence of MILP solves.

    Each solve asks for a placement with flow >= target (which admits the target-specific cover
    cuts above). First target: just above the best flow known (from the heuristics, then from
    each solve), so a solve either finds a better placement or proves there is none. When a solve
    neither finds nor refutes, targets bisect between the best flow and the bound to tighten the
    bound. A solve that proves "no placement reaches target" makes target the new bound."""
    from helix_p2p.planner.heuristics import best_heuristic_placement

    started = time.monotonic()
    # Keep a little time back for scoring the final placement.
    deadline = started + options.time_limit_s - min(3.0, 0.08 * options.time_limit_s)
    backend = options.backend if options.backend in BACKENDS else DEFAULT_BACKEND
    classes = node_classes(cluster)
    previous_placement = dict(previous.placement) if previous else None
    best = best_heuristic_placement(cluster, options, previous)
    lo = max_flow(cluster, best).value_tokens_per_s
    hi = cluster.compute_upper_bound_tokens_per_s()
    origin = "heuristic"
    warm_flow = lo
    attempts: list[_Attempt] = []
    tracker = _ProgressTracker(options, started)
    tracker.report(lo, hi)
    tolerance = 1e-6
    target = None  # None: search just above the best flow; else bisect the bound here
    while hi - lo > tolerance * hi and (remaining := deadline - time.monotonic()) > 0.5:
        improving = target is None
        probe = lo * (1 + tolerance) if improving else target
        budget = remaining * (0.6 if not attempts else 0.5)
        # Search for better placements in the exact restriction when the best one fits it; decide
        # bisection probes on the full model (a relaxation where blocks exist), whose refutations
        # are proofs.
        attempt = _attempt(
            cluster,
            classes,
            probe,
            best,
            backend,
            time.monotonic() + budget,
            options,
            previous_placement,
            restrict=improving and _within_blocks(cluster, classes, best),
            exactly=not improving,
        )
        attempts.append(attempt)
        improved = False
        if attempt.placement is not None:
            flow = max_flow(cluster, attempt.placement).value_tokens_per_s
            if flow > lo:
                best, lo, origin, improved = attempt.placement, flow, "milp", True
        if attempt.restricted:
            pass
        elif attempt.infeasible:
            hi = min(hi, probe)
        elif attempt.dual_bound is not None:
            # The solve speaks only of flows >= probe; flows below it are bounded by probe.
            hi = min(hi, max(attempt.dual_bound, probe))
        tracker.report(lo, hi)
        if improved:
            target = None  # look above the new best
        elif attempt.infeasible and not attempt.restricted:
            target = None if improving else (lo + hi) / 2
        else:
            # Neither found nor refuted in time: probe nearer the bound, where refuting is easier.
            target = (lo + hi) / 2 if improving else (probe + hi) / 2
    hi = max(hi, lo)
    bound: float | None = hi
    if options.partial_inference:
        # Partial inference only adds edges, so a placement's flow can exceed what this
        # boundary-matching model describes; we prove no bound for it.
        bound = None
    details = {
        "backend": backend,
        "classes": len(classes),
        "blocks": len(free_blocks(classes, class_links(cluster, classes))),
        "warm_start_tokens_per_s": warm_flow,
        "source_of_best": origin,
        "solves": [
            {"target": a.target, "restricted": a.restricted, "termination": a.termination, "seconds": round(a.seconds, 2)}
            for a in attempts
        ],
    }
    return plan_from_placement(
        cluster,
        best,
        method="milp",
        solve_seconds=time.monotonic() - started,
        upper_bound_tokens_per_s=bound,
        partial_inference=options.partial_inference,
        details=details,
    )


def _within_blocks(cluster: Cluster, classes: list[NodeClass], placement: Placement) -> bool:
    """Whether the placement's max flow uses no edge between two blocks."""
    blocks = free_blocks(classes, class_links(cluster, classes))
    block_of = {m: x for x, block in enumerate(blocks) for c in block for m in classes[c].members}
    flows = max_flow(cluster, placement).flows
    return all(
        block_of[f.src] == block_of[f.dst] for f in flows if f.src in block_of and f.dst in block_of
    )


def _dual_bound(result: mathopt.SolveResult) -> float | None:
    bound = result.termination.objective_bounds.dual_bound
    return None if math.isinf(bound) or math.isnan(bound) else bound


class _ProgressTracker:
    """Reports the best flow and the bound as they improve."""

    def __init__(self, options: PlanOptions, started: float) -> None:
        self.callback = options.progress
        self.started = started
        self.last: tuple[float, float | None] | None = None

    def report(self, best: float, bound: float | None) -> None:
        if self.callback is not None and (best, bound) != self.last:
            self.last = (best, bound)
            self.callback(Progress(time.monotonic() - self.started, best, bound))
