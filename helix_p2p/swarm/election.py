"""Who plans, and which plan a node follows (DESIGN.md, "Election and re-planning").

The rule is a pure function of the registry, so every peer with the same view gets the same answer:
among live, planner-eligible nodes serving the model, the one that joined first (by its own signed
`joined_at`), ties broken by a hash of the peer id. Seniority keeps the role stable: a node that
joins does not take the role from a working planner; when the planner leaves or stops refreshing,
the next-oldest takes over as soon as the others see its record go stale.

Views differ briefly, so plans carry an epoch. A node follows the newest plan signed by the planner
it elects, and ignores plans from anyone else, however new."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from helix_p2p.swarm.records import NodeRecord, PlanRecord


def planner_rank(record: NodeRecord) -> tuple[float, bytes]:
    return (record.joined_at, hashlib.sha256(record.peer_id.encode()).digest())


def candidates(records: Mapping[str, NodeRecord], now: float, model_id: str) -> list[NodeRecord]:
    return [r for r in records.values() if r.is_live(now) and r.planner_eligible and r.model.id == model_id]


def elect_planner(records: Mapping[str, NodeRecord], now: float, model_id: str) -> str | None:
    """The peer id that should plan for `model_id`, or None if no live node may."""
    pool = candidates(records, now, model_id)
    return min(pool, key=planner_rank).peer_id if pool else None


def choose_plan(
    plans: Iterable[PlanRecord], elected: str | None, current: PlanRecord | None, model_id: str
) -> PlanRecord | None:
    """The plan to follow: the elected planner's newest plan when it is newer than `current`, or
    when `current` came from a planner that is no longer elected; otherwise `current`."""
    mine = [p for p in plans if elected is not None and p.planner == elected and p.model == model_id]
    if not mine:
        return current
    best = max(mine, key=lambda p: (p.epoch, p.created_at))
    if current is None or best.epoch > current.epoch:
        return best
    if current.planner != elected:
        # The elected planner is the authority even if a departed one had counted further.
        return best
    return current


def next_epoch(plans: Iterable[PlanRecord], planner: str, current: PlanRecord | None) -> int:
    """The epoch for `planner`'s next plan: past the plan it follows and past any plan it signed
    before (a restarted planner's old plan may still be in the DHT, and nodes following it accept
    only a newer epoch from the same planner). Other peers' epochs do not count: a node adopts the
    elected planner's plan whatever the epoch of a plan from a planner no longer elected, so no
    member can push the epochs up by publishing a huge one."""
    epochs = [p.epoch for p in plans if p.planner == planner]
    if current is not None:
        epochs.append(current.epoch)
    return max(epochs, default=0) + 1
