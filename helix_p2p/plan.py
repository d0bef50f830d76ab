"""What a planner produces: a placement (which contiguous layers each node holds) and the max-flow
edge flows that route requests over it (`helix-plan/1`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from helix_p2p.cluster import NodeId
from helix_p2p.errors import HelixError

#: placement[node] = (start, end): the node holds layers start .. end-1. Absent nodes hold nothing.
Placement = Mapping[NodeId, tuple[int, int]]


@dataclass(frozen=True)
class EdgeFlow:
    """Tokens/s on one edge of the flow graph; `src`/`dst` are node ids or "source"/"sink"."""

    src: str
    dst: str
    tokens_per_s: float


@dataclass(frozen=True)
class Plan:
    cluster: str
    method: str
    placement: Placement
    flows: tuple[EdgeFlow, ...]
    objective_tokens_per_s: float
    #: a proven bound on the best placement's flow; None for heuristics that prove nothing
    upper_bound_tokens_per_s: float | None
    solve_seconds: float
    partial_inference: bool = False
    #: free-form facts about the solve (backend, status, warm start, ...), kept out of the file format
    details: Mapping[str, object] = field(default_factory=dict, compare=False)

    @property
    def gap(self) -> float | None:
        """Relative gap between the bound and the flow found, (bound - flow) / bound."""
        if self.upper_bound_tokens_per_s is None:
            return None
        if self.upper_bound_tokens_per_s - self.objective_tokens_per_s <= 1e-9:
            return 0.0  # also a cluster that can carry no flow, bounded by a sliver above 0
        return max(
            0.0, (self.upper_bound_tokens_per_s - self.objective_tokens_per_s) / self.upper_bound_tokens_per_s
        )


@dataclass(frozen=True)
class PlacementRecord:
    """A bare placement with its flow (`helix-placement/1`), e.g. a layout published in a paper."""

    cluster: str
    placement: Placement
    max_flow: float | None = None
    reported: float | None = None


def moved_layers(old: Mapping[str, tuple[int, int]], new: Mapping[str, tuple[int, int]]) -> int:
    """How many (node, layer) pairs `new` assigns to nodes serving in `old` that `old` did not
    give them: the layers serving nodes must load to follow it, each load a node's pause. A node
    that held nothing (a newcomer, an idle node) loads without interrupting anyone, so its layers
    do not count: re-plans must not leave a joining volunteer idle to save a "move"."""
    total = 0
    for node, (start, end) in new.items():
        previous = old.get(node)
        if previous is None:
            continue
        total += (end - start) - max(0, min(end, previous[1]) - max(start, previous[0]))
    return total


class PlanError(HelixError):
    """A planner cannot produce a plan for this input (e.g. the cluster cannot hold the model)."""
