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
  Classes whose pairs are all free form a *block* (classes.free_blocks, e.g. a region of fast
  links); inside a block w is summed out, so (3) needs one balance row per block and boundary
      sum_{c in X, s+k=p} h[c,s,k] - (flow to other blocks) = sum_{c in X} h[c,p,k] - (flow from them)
  and w exists only between classes of different blocks. One block: a single row per boundary.
  Classes in bounded pairs are split into single nodes while the cluster is small
  (classes.split_for_exactness), which makes every McCormick bound exact.
  build_model's `mode` picks the full model above, its restriction with no flow between blocks
  (fast to search, solutions real), or its relaxation with links ignored (fast to refute).

(4) every layer is held by some node; (5) cover cuts valid only for flows above a target, derived
in add_cover_cuts. The solve loop (solve_milp) turns those into a sequence of "is there a
placement with flow above T?" questions, starting from the best heuristic placement and the
solver-free bound of bounds.py.

Every step is exact or a relaxation of the per-node problem (the restriction is used only to find
placements, never to bound), so refutations and dual bounds prove upper bounds on the best
placement's flow. Every placement found is re-scored with the exact max flow (flow.py), which is
the objective we report: a relaxation's value may be optimistic, the plan's never is."""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
from dataclasses import dataclass

from ortools.math_opt.python import mathopt
from ortools.util.python.solve_interrupter import SolveInterrupter

from helix_p2p.cluster import Cluster, NodeId
from helix_p2p.flow import max_flow
from helix_p2p.plan import Placement, Plan, PlanError
from helix_p2p.planner.bounds import counting_bound
from helix_p2p.planner.classes import (
    ClassLink,
    NodeClass,
    class_links,
    free_blocks,
    node_classes,
    split_for_exactness,
)
from helix_p2p.planner.core import BACKEND_NAMES, PlanOptions, Progress, plan_from_placement
from helix_p2p.planner.servable import flow_per_hop, most_servable, servability
from helix_p2p.planner.servable import stage_reserve_s as servable_reserve_s
from helix_p2p.planner.stability import keep_previous_layers, stage_reserve_s

_SOLVERS = {
    "scip": mathopt.SolverType.GSCIP,
    "highs": mathopt.SolverType.HIGHS,
    "cpsat": mathopt.SolverType.CP_SAT,
}
BACKENDS = {name: _SOLVERS[name] for name in BACKEND_NAMES}

Range = tuple[int, int]  # (start, k)

log = logging.getLogger(__name__)


@dataclass
class ClassModel:
    model: mathopt.Model
    classes: list[NodeClass]
    y: dict[tuple[int, int, int], mathopt.Variable]
    h: dict[tuple[int, int, int], mathopt.Variable]
    flow: mathopt.LinearExpression
    #: every solution's flow is realisable by its placement
    solutions_real: bool
    #: infeasibility and dual bounds hold for every placement (not a restriction)
    refutes: bool


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
    cluster: Cluster,
    classes: list[NodeClass],
    mode: str = "full",
    cap_tokens_per_s: float | None = None,
    links: dict[tuple[int, int], ClassLink] | None = None,
    deadline: float | None = None,
) -> ClassModel:
    """The model above. `mode` says how flow between blocks is modelled:
    - "full": bounded per class pair as derived above;
    - "restricted": not at all (an exact restriction: its solutions are real, its refutations
      prove nothing), to search fast where the full model is large;
    - "relaxed": links ignored, all blocks one (a relaxation: its refutations are proofs, its
      solutions may not be real), to prove bounds fast."""
    num_layers = cluster.model.num_layers
    links = class_links(cluster, classes) if links is None else links
    model = mathopt.Model(name=f"helix-{cluster.name}")
    y: dict[tuple[int, int, int], mathopt.Variable] = {}
    h: dict[tuple[int, int, int], mathopt.Variable] = {}
    ending: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # (class, boundary) -> keys
    starting: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for c, cls in enumerate(classes):
        _check_deadline(deadline)
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

    blocks = free_blocks(classes, links) if mode != "relaxed" else [list(range(len(classes)))]
    block_of = {c: x for x, block in enumerate(blocks) for c in block}
    restrict = mode == "restricted"
    for p in range(1, num_layers):
        _check_deadline(deadline)
        if len(blocks) == 1:
            ends = [key for c in range(len(classes)) for key in ending.get((c, p), [])]
            starts = [key for c in range(len(classes)) for key in starting.get((c, p), [])]
            model.add_linear_constraint(total(ends, h) == total(starts, h))  # (3), summed
            continue
        # Each class splits what it hands on at p into a part kept inside its block (free, so
        # only the block's totals must match) and flows to classes of other blocks (bounded).
        out_parts: dict[int, list] = {c: [] for c in range(len(classes)) if ending.get((c, p))}
        in_parts: dict[int, list] = {c: [] for c in range(len(classes)) if starting.get((c, p))}
        inside_out: dict[int, list] = {}
        inside_in: dict[int, list] = {}
        for c, parts in out_parts.items():
            v = model.add_variable(lb=0, name=f"o[{c},{p}]")
            parts.append(v)
            inside_out.setdefault(block_of[c], []).append(v)
        for c, parts in in_parts.items():
            v = model.add_variable(lb=0, name=f"i[{c},{p}]")
            parts.append(v)
            inside_in.setdefault(block_of[c], []).append(v)
        for x in set(inside_out) | set(inside_in):
            model.add_linear_constraint(
                mathopt.fast_sum(inside_out.get(x, [])) == mathopt.fast_sum(inside_in.get(x, []))
            )
        if not restrict:
            for (a, b), link in links.items():
                if block_of[a] == block_of[b] or a not in out_parts or b not in in_parts:
                    continue
                if link.max_tokens_per_s <= 0:
                    continue
                w = model.add_variable(lb=0, name=f"w[{a},{b},{p}]")
                out_parts[a].append(w)
                in_parts[b].append(w)
                others_b, others_a = classes[b].count, classes[a].count
                model.add_linear_constraint(w <= link.max_tokens_per_s * others_b * total(ending[(a, p)], y))
                model.add_linear_constraint(
                    w <= link.max_tokens_per_s * others_a * total(starting[(b, p)], y)
                )
        for c, parts in out_parts.items():
            model.add_linear_constraint(total(ending[(c, p)], h) == mathopt.fast_sum(parts))
        for c, parts in in_parts.items():
            model.add_linear_constraint(total(starting[(c, p)], h) == mathopt.fast_sum(parts))
    # (4) cover: some node holds every layer. Not implied by the LP (which may spread fractions of
    # nodes over single layers), valid for every placement with positive flow, and it cuts the
    # root bound from the compute bound to something that knows 24 GPUs must share 80 layers.
    for layer in range(num_layers):
        covering = [key for key in y if key[1] <= layer < key[1] + key[2]]
        model.add_linear_constraint(mathopt.fast_sum(y[key] for key in covering) >= 1)
    flow = mathopt.fast_sum(h[key] for key in h if key[1] == 0)
    model.maximize(flow)
    one_block = len(free_blocks(classes, links)) == 1
    # Solutions are real when the model is exact: one block, no flow between blocks, or only
    # bounded pairs with a one-member side (where the McCormick bounds are exact).
    real = (
        one_block
        or restrict
        or (
            mode == "full"
            and all(
                block_of[a] == block_of[b] or (link.uniform and min(classes[a].count, classes[b].count) == 1)
                for (a, b), link in links.items()
            )
        )
    )
    return ClassModel(model, classes, y, h, flow, solutions_real=real, refutes=one_block or not restrict)


def placement_to_counts(classes: list[NodeClass], placement: Placement) -> dict[tuple[int, int, int], int]:
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


def add_cover_cuts(
    cm: ClassModel,
    cluster: Cluster,
    target: float,
    levels: tuple[int, ...] = (2, 3, 4, 5, 6),
    deadline: float | None = None,
) -> None:
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
        _check_deadline(deadline)
        weights = {
            key: range_capacity(cm.classes[key[0]], key[1], key[2], num_layers) / target for key in keys
        }
        for m in levels:
            # Rounding up keeps the cut valid under float noise: a node just below the target is
            # treated as covering alone, which only weakens the cut.
            coef = {
                key: m if a >= 1 - 1e-9 else 1 + math.floor((m - 1) * a + 1e-9) for key, a in weights.items()
            }
            cm.model.add_linear_constraint(mathopt.fast_sum(coef[key] * cm.y[key] for key in keys) >= m)


@dataclass
class _Attempt:
    """One solve of the model restricted to flows >= target."""

    target: float
    #: the model was no restriction, so its infeasibility or dual bound is a proof
    refutes: bool
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
    mode: str = "full",
    exactly: bool = False,
    on_log=None,
    links: dict[tuple[int, int], ClassLink] | None = None,
) -> _Attempt:
    """With `exactly`, ask for flow == target rather than >= target: equivalent for deciding
    whether the target is reachable (a flow scales down), and then no node carries more than
    the target, which tightens (2) to h <= min(u, target) * y."""
    started = time.monotonic()
    try:
        cm = build_model(
            cluster,
            classes,
            mode,
            cap_tokens_per_s=target if exactly else None,
            links=links,
            deadline=deadline,
        )
        if exactly:
            cm.model.add_linear_constraint(cm.flow == target)
        else:
            cm.model.add_linear_constraint(cm.flow >= target)
        add_cover_cuts(cm, cluster, target, deadline=deadline)
    except _OutOfTime:
        return _Attempt(target, False, False, None, None, "OUT_OF_TIME_BUILDING", time.monotonic() - started)
    params = mathopt.SolveParameters(
        # model building counts against the caller's time too
        time_limit=datetime.timedelta(seconds=max(0.2, deadline - time.monotonic())),
        relative_gap_tolerance=1e-7,
        absolute_gap_tolerance=1e-6,
        threads=None if backend == "highs" else options.threads,  # HiGHS takes no thread count here
        random_seed=options.seed,
    )
    model_params = None
    if hint is not None and backend != "highs":  # HiGHS through MathOpt takes no hints
        model_params = mathopt.ModelSolveParameters(solution_hints=[hint_for(cm, cluster, hint)])
    interrupter = None
    if backend == "cpsat":
        # CP-SAT was seen overrunning its time limit by 20 s on 100 nodes; it honours an
        # interrupter (SCIP and HiGHS through MathOpt do not), so it gets one at the deadline.
        interrupter = SolveInterrupter()
        timer = threading.Timer(max(0.2, deadline - time.monotonic()), interrupter.interrupt)
        timer.daemon = True
        timer.start()
    try:
        result = mathopt.solve(
            cm.model,
            BACKENDS[backend],
            params=params,
            model_params=model_params,
            msg_cb=on_log,
            interrupter=interrupter,
        )
    except Exception as e:  # noqa: BLE001 - OR-Tools raises internal status errors of its own types
        # A solver failing on one probe is no reason to lose the plan: the loop keeps the best
        # placement and bound so far and treats this probe as undecided.
        log.warning("%s failed on target %.4f: %s", backend, target, e)
        return _Attempt(target, cm.refutes, False, None, None, f"ERROR: {e}", time.monotonic() - started)
    reason = result.termination.reason
    placement = None
    if result.has_primal_feasible_solution():
        values = result.variable_values()
        counts = {key: n for key, var in cm.y.items() if (n := round(values[var])) > 0}
        placement = counts_to_placement(classes, counts, previous)
    infeasible = reason in (
        mathopt.TerminationReason.INFEASIBLE,
        mathopt.TerminationReason.INFEASIBLE_OR_UNBOUNDED,
    )
    return _Attempt(
        target=target,
        refutes=cm.refutes,
        infeasible=infeasible,
        placement=placement,
        # With the flow fixed to the target the dual bound is the target itself: it says nothing.
        dual_bound=None if infeasible or exactly else _dual_bound(result),
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
    deadline = started + options.time_limit_s - min(5.0, 0.1 * options.time_limit_s)
    if options.backend not in BACKENDS:
        raise PlanError(f"unknown MILP backend {options.backend!r}; choose one of {', '.join(BACKENDS)}")
    backend = options.backend
    classes, links = split_for_exactness(cluster, node_classes(cluster), EXACT_SPLIT_MAX_NODES)
    previous_placement = dict(previous.placement) if previous else None
    # the search stops early enough to leave the keep-layers stage its share (stability.py)
    search_deadline = deadline - stage_reserve_s(options, previous_placement) - servable_reserve_s(options)
    best = best_heuristic_placement(cluster, options, previous)
    lo = max_flow(cluster, best).value_tokens_per_s
    hi = counting_bound(classes, cluster.model.num_layers, cluster.compute_upper_bound_tokens_per_s())
    origin = "heuristic"
    warm_flow = lo
    attempts: list[_Attempt] = []
    tracker = _ProgressTracker(options, started)
    tracker.report(lo, hi, "heuristics done")
    tolerance = 1e-6
    target = None  # None: search just above the best flow; else bisect the bound here
    # Solvers overrun short time limits on big models (presolve does not look at the clock), so
    # the worst overrun seen so far is kept back from every later budget.
    overrun_s = 0.0
    while (
        hi - lo > max(tolerance * hi, 1e-9)
        and (remaining := search_deadline - time.monotonic()) > 1.0 + overrun_s
    ):
        improving = target is None
        # any positive flow beats none: with nothing found yet, ask for a sliver of the bound
        probe = (lo * (1 + tolerance) if lo > 0 else hi * tolerance) if improving else target
        budget = (remaining - overrun_s) * (0.6 if not attempts else 0.5)
        activity = f"searching above {lo:.2f}" if improving else f"testing whether {probe:.2f} is reachable"
        tracker.report(lo, hi, activity)
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
            mode=_search_mode(cluster, classes, best, links)
            if improving
            else _bound_mode(cluster, classes, links),
            exactly=not improving,
            on_log=tracker.on_solver_log,
            links=links,
        )
        attempts.append(attempt)
        overrun_s = max(overrun_s, attempt.seconds - budget)
        improved = False
        if attempt.placement is not None:
            flow = max_flow(cluster, attempt.placement).value_tokens_per_s
            if flow > lo:
                best, lo, origin, improved = attempt.placement, flow, "milp", True
        if not attempt.refutes:
            pass
        elif attempt.infeasible:
            hi = min(hi, probe)
        elif attempt.dual_bound is not None:
            # The solve speaks only of flows >= probe; flows below it are bounded by probe.
            hi = min(hi, max(attempt.dual_bound, probe))
        if improved:
            target = None  # look above the new best
        elif attempt.infeasible and attempt.refutes:
            target = None if improving else (lo + hi) / 2
        else:
            # Neither found nor refuted in time: probe nearer the bound, where refuting is easier.
            target = (lo + hi) / 2 if improving else (probe + hi) / 2
    hi = max(hi, lo)
    servable: dict[str, object] = {}
    if options.servable and not options.partial_inference:
        # The max flow prices neither depth nor KV: publish the placement that serves most (servable.py).
        stage = most_servable(cluster, best, deadline - stage_reserve_s(options, previous_placement))
        best, servable = stage.placement, stage.details
    keep_layers: dict[str, object] = {}
    if previous_placement:
        # Among placements of nearly the best flow, publish one that moves few layers; at least,
        # give each class's ranges to the members that held the most of them (stability.py).
        stage = keep_previous_layers(
            cluster,
            classes,
            links,
            best,
            previous_placement,
            options,
            deadline,
            _search_mode(cluster, classes, best, links),
            backend,
            # a placement that moves fewer layers must not be deeper than the servable choice
            score=(lambda p: flow_per_hop(servability(cluster, p))) if servable else None,
            max_mean_hops=servability(cluster, best).mean_hops * (1 + 1e-6) if servable else None,
        )
        best, keep_layers = stage.placement, stage.details
    tracker.report(lo, hi, "done")
    bound: float | None = hi
    if options.partial_inference:
        # Partial inference only adds edges, so a placement's flow can exceed what this
        # boundary-matching model describes; we prove no bound for it, and pick among the MILP's
        # placement and the heuristics' (Petals' among them) by their flow with partial edges.
        from helix_p2p.planner.heuristics import candidate_placements

        bound = None
        pool = [best, *(p for p in candidate_placements(cluster, options, previous) if p)]
        best = max(pool, key=lambda p: max_flow(cluster, p, partial_inference=True).value_tokens_per_s)
    details = {
        "backend": backend,
        "classes": len(classes),
        "blocks": len(free_blocks(classes, links)),
        "warm_start_tokens_per_s": warm_flow,
        "source_of_best": origin,
        "keep_layers": keep_layers,
        "servable": servable,
        "solves": [
            {
                "target": a.target,
                "refutes": a.refutes,
                "termination": a.termination,
                "seconds": round(a.seconds, 2),
            }
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


#: Above this many (class pair, boundary) link variables the full model is too slow to search in.
FULL_MODEL_MAX_PAIR_VARIABLES = 5000
#: Classes in bounded link pairs are split into single nodes (exact model) up to this many nodes.
EXACT_SPLIT_MAX_NODES = 48


def _bound_mode(cluster: Cluster, classes: list[NodeClass], links: dict[tuple[int, int], ClassLink]) -> str:
    """The model to refute targets in: the full one while small (it sees slow links), else the
    relaxation that ignores links (fast)."""
    return "full" if _pair_variables(cluster, classes, links) <= FULL_MODEL_MAX_PAIR_VARIABLES else "relaxed"


def _pair_variables(
    cluster: Cluster, classes: list[NodeClass], links: dict[tuple[int, int], ClassLink]
) -> int:
    blocks = free_blocks(classes, links)
    block_of = {c: x for x, block in enumerate(blocks) for c in block}
    return sum(1 for (a, b) in links if block_of[a] != block_of[b]) * cluster.model.num_layers


def _search_mode(
    cluster: Cluster, classes: list[NodeClass], best: Placement, links: dict[tuple[int, int], ClassLink]
) -> str:
    """The model to search for better placements in: the full one while it is small, else the
    restriction to flow inside blocks (when the best placement so far is one of its solutions, so
    the solver starts from it)."""
    if _pair_variables(cluster, classes, links) <= FULL_MODEL_MAX_PAIR_VARIABLES:
        return "full"
    return "restricted" if _within_blocks(cluster, classes, best, links) else "full"


def _within_blocks(
    cluster: Cluster, classes: list[NodeClass], placement: Placement, links: dict[tuple[int, int], ClassLink]
) -> bool:
    """Whether the placement's max flow uses no edge between two blocks."""
    blocks = free_blocks(classes, links)
    block_of = {m: x for x, block in enumerate(blocks) for c in block for m in classes[c].members}
    flows = max_flow(cluster, placement).flows
    return all(block_of[f.src] == block_of[f.dst] for f in flows if f.src in block_of and f.dst in block_of)


def _dual_bound(result: mathopt.SolveResult) -> float | None:
    bound = result.termination.objective_bounds.dual_bound
    return None if math.isinf(bound) or math.isnan(bound) else bound


class _OutOfTime(Exception):
    """Building a model ran past the attempt's deadline (building is Python, and at hundreds of
    nodes it can take longer than the solve would have had)."""


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _OutOfTime


class _ProgressTracker:
    """Reports the best flow and the bound as they improve, and a heartbeat while a solve runs
    (fed by the solver's log lines, so it costs nothing when nobody listens)."""

    HEARTBEAT_S = 5.0

    def __init__(self, options: PlanOptions, started: float) -> None:
        self.callback = options.progress
        self.started = started
        self.best = 0.0
        self.bound: float | None = None
        self.activity = ""
        self.last_report = started

    def report(self, best: float, bound: float | None, activity: str = "") -> None:
        self.best, self.bound, self.activity = best, bound, activity
        if self.callback is not None:
            self.last_report = time.monotonic()
            self.callback(Progress(self.last_report - self.started, best, bound, activity))

    def on_solver_log(self, lines: list[str]) -> None:
        del lines  # the log's format differs per backend; only its rhythm is used
        if self.callback is not None and time.monotonic() - self.last_report >= self.HEARTBEAT_S:
            self.report(self.best, self.bound, self.activity)
