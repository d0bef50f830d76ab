"""A post-step over a chosen placement: the same total flow, spread over parallel replicas.

A max flow is rarely unique. Dinic (`helix_p2p.flow`) returns whichever flow its augmenting paths
happen to build, and that one often leaves a replica of a stage at zero while its twin runs at
capacity. The plan's edge flows are what IWRR weighs (`helix_p2p.routing`), so a replica at zero
is never used: its KV cache and its batches are lost to the requests, although the flow model
says nothing against using it.

This step keeps the placement and the total flow F and chooses, among the flows of value F, one
that loads nodes evenly, with two linear programs over the placement's flow graph (variables: a
flow f_e on every edge, 0 <= f_e <= cap_e; conservation at every node; x_v = inflow of v <= cap_v;
the source sends F):

1. maximise t subject to x_v >= t * cap_v for every node that lies on some source-to-sink path:
   the least-used node is used as much as possible, so no replica that can carry flow sits idle;
2. with t held at its optimum, minimise U subject to x_v <= U * cap_v: among those, the most-used
   node is used as little as possible, so the slack is shared rather than piled on one branch.

Both are LPs (GLOP); the result is re-checked by `check_flows` and kept only if it is feasible and
carries F within 1e-9 relative, otherwise the max flow's own edge flows stay. The total flow, the
placement and the bound never change: only the split between parallel branches does."""

from __future__ import annotations

import logging
from dataclasses import replace

from helix_p2p.cluster import SINK, SOURCE, Cluster
from helix_p2p.flow import FlowCheckError, build_flow_graph, check_flows
from helix_p2p.plan import EdgeFlow, Placement, Plan

log = logging.getLogger(__name__)

#: relative slack on t between the two LPs (floating-point room for GLOP)
_SLACK = 1e-9
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

    floor = total_tokens_per_s * _NEGLIGIBLE
    flows = tuple(EdgeFlow(e.src, e.dst, values[f[i]]) for i, e in enumerate(edges) if values[f[i]] > floor)
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
