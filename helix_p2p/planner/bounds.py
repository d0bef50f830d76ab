"""Upper bounds on the best placement's flow that need no solver: necessary conditions for a flow F,
each obtained by summing a per-layer condition over the L layers, so that every node contributes
what its best layer count k allows. F is a bound once a condition fails above it; the conditions
weaken as F falls, so bisection finds the largest F that passes them all.

Per layer l, the nodes j holding l carry the whole flow: sum_j g_j = F with g_j <= min(u_j, F).
- capped:  sum_i k_i * min(u_i(k_i), F) >= L * F
- counting (cover cuts, milp.py): with a = u/F and c_m(a) = m if a >= 1 else 1 + floor((m-1) a),
           sum_i k_i * c_m(a_i) >= m * L   for every m >= 2
A node holding nothing contributes 0, so each node contributes max(0, max_k ...)."""

from __future__ import annotations

import math

from helix_p2p.planner.classes import NodeClass

LEVELS = tuple(range(2, 17))


def passes(classes: list[NodeClass], num_layers: int, flow: float) -> bool:
    """Whether a flow of `flow` tokens/s passes every necessary condition above."""
    if flow <= 0:
        return True
    capped = sum(
        cls.count * max(k * min(u, flow) for k, u in enumerate(cls.capacity_tokens_per_s, 1))
        for cls in classes
    )
    if capped < num_layers * flow * (1 - 1e-12):
        return False
    for m in LEVELS:
        units = 0
        for cls in classes:
            best = 0
            for k, u in enumerate(cls.capacity_tokens_per_s, 1):
                a = u / flow
                # rounded up under float noise: a node just below F counts as covering alone
                c = m if a >= 1 - 1e-9 else 1 + math.floor((m - 1) * a + 1e-9)
                best = max(best, k * c)
            units += cls.count * best
        if units < m * num_layers:
            return False
    return True


def counting_bound(classes: list[NodeClass], num_layers: int, upper: float, iterations: int = 60) -> float:
    """The smallest F found (by bisection below `upper`, itself a valid bound) above which the
    conditions fail: no placement's flow exceeds it."""
    lo, hi = 0.0, upper
    if passes(classes, num_layers, hi):
        return hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if passes(classes, num_layers, mid):
            lo = mid
        else:
            hi = mid
    return hi
