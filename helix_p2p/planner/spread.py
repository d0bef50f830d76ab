"""A post-step over a chosen placement: the same total flow, spread over parallel replicas.

A max flow is rarely unique. Dinic (`helix_p2p.flow`) returns whichever flow its augmenting paths
happen to build, and that one often leaves a replica of a stage at zero while its twin runs at
capacity. The plan's edge flows are what IWRR weighs (`helix_p2p.routing`), so a replica at zero
is never used: its KV cache and its batches are lost to the requests, although the flow model
says nothing against using it.

This step keeps the placement and the total flow F and chooses, among the flows of value F, one
that loads nodes evenly, with three linear programs over the placement's flow graph (variables: a
flow f_e on every edge, 0 <= f_e <= cap_e; conservation at every node; x_v = inflow of v <= cap_v;
the source sends F):

1. maximise t subject to x_v >= t * cap_v for every node that lies on some source-to-sink path:
   the least-used node is used as much as possible, so no replica that can carry flow sits idle;
2. with t held at its optimum, minimise U subject to x_v <= U * cap_v: among those, the most-used
   node is used as little as possible, so the slack is shared rather than piled on one branch.
3. LPs 1 and 2 bind only the extremes: when the least-used node is one whose flow cannot move (a
   lone replica of a stage) and the most-used one is a lone bottleneck, the split between two
   replicas elsewhere is left to the solver (Swarm's 70B placement: two T4 twins at 649 and 109
   tokens/s, and IWRR served 135 decode tokens/s where random served 162). With t and U held, LP 3
   minimises sum_v phi(x_v / cap_v), phi convex piecewise linear with breakpoints every 1/20, a
   linear stand-in for the sum of squared utilisations: equal twins end within 1/20 of each other.

All three are LPs (GLOP). An LP answer is a vertex of its polytope, so its edge flows are sparse: on a
stage placement (LLaMA-2-70B, 24 GPUs: 4 A100 stages, then 4 stages of 2 L4s, then 4 of 3 T4s) it
sends each replica's whole output to one replica of the next stage, i.e. a few disjoint chains.
IWRR uses only edges with planned flow, so every request was pinned to one of 4 pipelines, while
random routing mixes 1,000+; the pinned requests move through a chain in lockstep (fewer, larger
batches: an A100 busy 20% of the time instead of 78%, a token taking 1.20 s instead of 0.99 s),
and IWRR served 295 decode tokens/s where random served 341 on the same placement.

4. Then, keeping every node's throughput x_v from the LPs, each layer boundary's flow is re-split
   in proportion: without partial inference every edge u -> v crosses the boundary end(u) =
   start(v), and the flow over one boundary is a transport problem with row sums x_u and column
   sums x_v, independent of the other boundaries. Iterative proportional fitting over the edges
   the placement enables gives its maximum-entropy solution (with every pair linked, f_uv =
   x_u x_v / X, each replica's output spread over the next stage as that stage's shares), so IWRR
   interleaves requests over every path the placement allows. A boundary whose mixed split would
   break a link's capacity (or that does not converge) keeps the LP's split.

The result is re-checked by `check_flows` and kept only if it is feasible and carries F within
1e-9 relative, otherwise the max flow's own edge flows stay. The total flow, the placement and the
bound never change: only the split between parallel branches does."""

from __future__ import annotations

import logging
from dataclasses import replace

from helix_p2p.cluster import SINK, SOURCE, Cluster
from helix_p2p.flow import FlowCheckError, build_flow_graph, check_flows
from helix_p2p.plan import EdgeFlow, Placement, Plan

log = logging.getLogger(__name__)

#: relative slack on t between the two LPs (floating-point room for GLOP)
_SLACK = 1e-9
#: LP 3's breakpoints: it balances utilisations to within 1 / _BALANCE_STEPS of each other
_BALANCE_STEPS = 20
#: above this many flow-graph edges LP 3 is skipped: it adds (steps - 1) variables per node (a
#: 1,000-node swarm placement, 47,467 edges: 11 s more CPU than LPs 1 and 2)
BALANCE_MAX_EDGES = 20_000
#: edge flows below this fraction of the total are dropped (LP noise, not a route)
_NEGLIGIBLE = 1e-9
#: above this many flow-graph edges the max flow's own split is kept: building the LP in Python
#: grows with the edges (47,467 edges, a 1,000-node swarm placement: 5.5 s of CPU)
MAX_EDGES = 200_000


def spread_plan(cluster: Cluster, plan: Plan) -> Plan:
    """`plan` with its edge flows re-chosen to spread the same total over parallel replicas (see
    the module docstring); `plan` itself when there is nothing to spread or the LP fails."""
    total = plan.objective_tokens_per_s
    if total <= 0 or not plan.placement:
        return plan
    flows = spread_flows(cluster, plan.placement, total, plan.partial_inference)
    if flows is None:
        return plan
    return replace(plan, flows=flows, details={**plan.details, "flows": "spread"})


def spread_flows(
    cluster: Cluster,
    placement: Placement,
    total_tokens_per_s: float,
    partial_inference: bool = False,
) -> tuple[EdgeFlow, ...] | None:
    """Edge flows of value `total_tokens_per_s` (at most the placement's max flow) that first
    maximise the least node utilisation, then minimise the largest; None if the LP fails."""
    from ortools.math_opt.python import mathopt

    graph = build_flow_graph(cluster, placement, partial_inference)
    live = _on_some_path(graph.edges)
    edges = [
        e for e in graph.edges if (e.src == SOURCE or e.src in live) and (e.dst == SINK or e.dst in live)
    ]
    nodes = [v for v in graph.node_capacity_tokens_per_s if v in live]
    if not edges or not nodes:
        return None
    if len(edges) > MAX_EDGES:
        log.info("not spreading the flow: %d edges (more than %d)", len(edges), MAX_EDGES)
        return None
    caps = graph.node_capacity_tokens_per_s

    model = mathopt.Model(name="spread")
    f = [model.add_variable(lb=0.0, ub=e.capacity_tokens_per_s) for e in edges]
    into: dict[str, list[int]] = {}
    out_of: dict[str, list[int]] = {}
    for i, e in enumerate(edges):
        out_of.setdefault(e.src, []).append(i)
        into.setdefault(e.dst, []).append(i)
    inflow = {v: mathopt.fast_sum(f[i] for i in into.get(v, [])) for v in nodes}
    for v in nodes:
        model.add_linear_constraint(inflow[v] == mathopt.fast_sum(f[i] for i in out_of.get(v, [])))
        model.add_linear_constraint(inflow[v] <= caps[v])
    sent = mathopt.fast_sum(f[i] for i in out_of.get(SOURCE, []))
    # Exactly the total: a plan's flows must carry its objective (the flow was found by Dinic on
    # the same capacities, so the LP is feasible up to round-off, which GLOP's tolerances absorb).
    model.add_linear_constraint(sent == total_tokens_per_s)

    # LP 1: raise the least-used node. Utilisations are in [0, 1].
    t = model.add_variable(lb=0.0, ub=1.0, name="t")
    for v in nodes:
        model.add_linear_constraint(inflow[v] >= caps[v] * t)
    model.maximize(t)
    first = _solve(model)
    if first is None:
        return None
    t_best = first.variable_values()[t]

    # LP 2: with t held, lower the most-used node.
    t.lower_bound = max(0.0, t_best * (1 - 1e-6) - _SLACK)
    u = model.add_variable(lb=0.0, ub=1.0, name="u")
    for v in nodes:
        model.add_linear_constraint(inflow[v] <= caps[v] * u)
    model.minimize(u)
    second = _solve(model)
    values = (second or first).variable_values()

    # LP 3: with t and U held, balance the nodes between them: minimise sum_v phi(x_v / cap_v), phi
    # convex piecewise linear (slope k on [k/K, (k+1)/K)), a linear stand-in for sum of squares.
    if second is not None and len(edges) <= BALANCE_MAX_EDGES:
        u_best = second.variable_values()[u]
        u.upper_bound = min(1.0, u_best * (1 + 1e-6) + _SLACK)
        penalty = []
        for v in nodes:
            for k in range(1, _BALANCE_STEPS):
                excess = model.add_variable(lb=0.0)
                model.add_linear_constraint(excess * caps[v] >= inflow[v] - caps[v] * (k / _BALANCE_STEPS))
                penalty.append(excess)
        model.minimize(mathopt.fast_sum(penalty))
        third = _solve(model)
        if third is not None:
            values = third.variable_values()

    floor = total_tokens_per_s * _NEGLIGIBLE
    split = {(e.src, e.dst): values[f[i]] for i, e in enumerate(edges) if values[f[i]] > floor}
    if not partial_inference:
        caps_by_edge = {(e.src, e.dst): e.capacity_tokens_per_s for e in edges}
        split = mix_boundaries(split, caps_by_edge, placement)
    flows = tuple(EdgeFlow(src, dst, value) for (src, dst), value in split.items() if value > floor)
    try:
        value = check_flows(cluster, placement, flows, partial_inference)
    except FlowCheckError as e:
        log.warning("spreading the flow gave an infeasible flow (%s); keeping the max flow's", e)
        return None
    if abs(value - total_tokens_per_s) > 1e-9 * total_tokens_per_s + 1e-9:
        log.warning(
            "spreading the flow changed its value (%.9f, not %.9f); keeping the max flow's",
            value,
            total_tokens_per_s,
        )
        return None
    return flows


def mix_boundaries(
    flows: dict[tuple[str, str], float],
    capacity: dict[tuple[str, str], float],
    placement: Placement,
) -> dict[tuple[str, str], float]:
    """`flows` (edge -> tokens/s, no partial inference) with each layer boundary's flow re-split by
    iterative proportional fitting over the `capacity` edges between nodes that carry flow: the
    same flow through every node, spread over every enabled edge (module docstring, step 4)."""
    out_sum: dict[str, float] = {}
    in_sum: dict[str, float] = {}
    for (src, dst), value in flows.items():
        out_sum[src] = out_sum.get(src, 0.0) + value
        in_sum[dst] = in_sum.get(dst, 0.0) + value

    def boundary(src: str) -> int:
        return 0 if src == SOURCE else placement[src][1]

    by_boundary: dict[int, list[tuple[str, str]]] = {}
    for src, dst in capacity:
        if out_sum.get(src, 0.0) > 0 and in_sum.get(dst, 0.0) > 0:
            by_boundary.setdefault(boundary(src), []).append((src, dst))
    mixed = dict(flows)
    for pairs in by_boundary.values():
        fitted = _fit(pairs, out_sum, in_sum)
        if fitted is None or any(v > capacity[e] for e, v in fitted.items()):
            continue
        for e in [e for e in mixed if e in capacity and boundary(e[0]) == boundary(pairs[0][0])]:
            del mixed[e]
        mixed.update(fitted)
    return mixed


#: iterative proportional fitting: rounds, and the relative error of the row sums at which it stops
_FIT_ROUNDS = 500
_FIT_TOLERANCE = 1e-12


def _fit(
    pairs: list[tuple[str, str]], rows: dict[str, float], cols: dict[str, float]
) -> dict[tuple[str, str], float] | None:
    """Edge values on `pairs` with row sums `rows` and column sums `cols` (maximum entropy), or
    None if the fitting does not converge (the support cannot meet the sums with all-positive
    values)."""
    value = dict.fromkeys(pairs, 1.0)
    for _ in range(_FIT_ROUNDS):
        for sums, side in ((rows, 0), (cols, 1)):
            total: dict[str, float] = {}
            for e, v in value.items():
                total[e[side]] = total.get(e[side], 0.0) + v
            for e in value:
                value[e] *= sums[e[side]] / total[e[side]]
        # Columns are exact after their scaling; stop once the rows are too.
        row_total: dict[str, float] = {}
        for e, v in value.items():
            row_total[e[0]] = row_total.get(e[0], 0.0) + v
        if all(abs(row_total.get(u, 0.0) - rows[u]) <= _FIT_TOLERANCE * rows[u] for u in row_total):
            return value
    return None


def _solve(model):
    from ortools.math_opt.python import mathopt

    result = mathopt.solve(model, mathopt.SolverType.GLOP)
    if result.termination.reason != mathopt.TerminationReason.OPTIMAL:
        log.warning("spreading the flow: the LP ended %s; keeping the max flow's", result.termination.reason)
        return None
    return result


def _on_some_path(edges) -> set[str]:
    """Nodes reachable from the source and reaching the sink (only those can carry flow)."""
    succ: dict[str, list[str]] = {}
    pred: dict[str, list[str]] = {}
    for e in edges:
        succ.setdefault(e.src, []).append(e.dst)
        pred.setdefault(e.dst, []).append(e.src)

    def reach(start: str, step: dict[str, list[str]]) -> set[str]:
        seen, stack = {start}, [start]
        while stack:
            for w in step.get(stack.pop(), []):
                if w not in seen:
                    seen.add(w)
                    stack.append(w)
        return seen

    return (reach(SOURCE, succ) & reach(SINK, pred)) - {SOURCE, SINK}
