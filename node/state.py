"""A node's state, derived from what it holds rather than set by hand, so it can never disagree
with the layers: joining (in the swarm, no plan for it yet) -> loading (loading its first range)
-> serving (serving a range, possibly loading the next one) -> leaving; standby when the plan it
follows gives it no layers."""

from __future__ import annotations

from helix_p2p.swarm.records import NodeState


def derive_state(*, leaving: bool, serving: bool, loading: bool, has_plan: bool) -> NodeState:
    if leaving:
        return NodeState.LEAVING
    if serving:
        return NodeState.SERVING
    if loading:
        return NodeState.LOADING
    if has_plan:
        return NodeState.STANDBY
    return NodeState.JOINING
