"""Which peers a node measures its links to. Measuring all n^2 pairs does not scale (a 1,000-node
swarm would run a million probes), so each node probes at most `k` peers per round: first those it
exchanges activations with under the current plan (their links matter most), then peers whose
layer ranges meet its own (candidates for the next plan), then a random sample of the rest, which
over rounds spreads measurements across the swarm. Peers measured within `max_age_s` are skipped.
The planner estimates the pairs nobody measured (`cluster_view.link_between`)."""

from __future__ import annotations

import random
from collections.abc import Mapping

from helix_p2p.swarm.records import LinkMeasurement, NodeRecord, PlanRecord


def plan_neighbors(me: str, plan: PlanRecord | None) -> set[str]:
    """Peers that send activations to `me` or receive them from `me` under `plan`."""
    if plan is None:
        return set()
    peers = set()
    for flow in plan.flows:
        if flow.tokens_per_s <= 0:
            continue
        if flow.src == me:
            peers.add(flow.dst)
        elif flow.dst == me:
            peers.add(flow.src)
    return peers & set(plan.placement)


def adjoining_peers(me: NodeRecord, records: Mapping[str, NodeRecord]) -> set[str]:
    if me.layers is None:
        return set()
    start, end = me.layers
    return {
        peer
        for peer, r in records.items()
        if peer != me.peer_id and r.layers is not None and (r.layers[0] == end or r.layers[1] == start)
    }


def choose_probe_targets(
    me: NodeRecord,
    records: Mapping[str, NodeRecord],
    plan: PlanRecord | None,
    last_measured: Mapping[str, float],
    *,
    k: int,
    now: float,
    max_age_s: float,
    rng: random.Random,
) -> list[str]:
    """Up to `k` live peers to probe this round, most useful first."""
    live = {peer for peer, r in records.items() if peer != me.peer_id and r.is_live(now)}
    due = {peer for peer in live if now - last_measured.get(peer, float("-inf")) >= max_age_s}
    chosen: list[str] = []
    for group in (plan_neighbors(me.peer_id, plan), adjoining_peers(me, records)):
        for peer in sorted(group & due):
            if peer not in chosen:
                chosen.append(peer)
    rest = sorted(due - set(chosen))
    rng.shuffle(rest)
    chosen += rest
    return chosen[:k]


def links_to_announce(
    measurements: Mapping[str, LinkMeasurement],
    records: Mapping[str, NodeRecord],
    *,
    now: float,
    max_links: int,
    max_age_s: float,
    preferred: set[str],
) -> tuple[LinkMeasurement, ...]:
    """The measurements that go into the node's record: fresh ones to live peers, plan neighbours
    first, then the most recent, at most `max_links` (the record's size cap)."""
    fresh = [
        m
        for peer, m in measurements.items()
        if peer in records and records[peer].is_live(now) and now - m.measured_at <= max_age_s
    ]
    fresh.sort(key=lambda m: (m.peer not in preferred, -m.measured_at, m.peer))
    return tuple(fresh[:max_links])
