"""The client's route choice over a registry and a plan (no network): IWRR over the plan's flows,
skipping peers that are avoided, stale, without free KV or not serving their planned range, and
falling back to any live chain of serving nodes when the plan has no route left."""

from __future__ import annotations

from dataclasses import replace

from helix_p2p.client.view import RoutePicker, Snapshot, chain_over_records
from swarm_builders import NOW, node, plan

from helix_p2p.plan import EdgeFlow

A1, A2, B1, B2 = (f"Qm{c * 30}" for c in "abcd")
MODEL = "tiny-llama"


def two_replicas():
    records = {
        A1: node(A1, layers=(0, 4)),
        A2: node(A2, layers=(0, 4)),
        B1: node(B1, layers=(4, 8)),
        B2: node(B2, layers=(4, 8)),
    }
    flows = [EdgeFlow("source", a, 10.0) for a in (A1, A2)]
    flows += [EdgeFlow(a, b, 5.0) for a in (A1, A2) for b in (B1, B2)]
    flows += [EdgeFlow(b, "sink", 10.0) for b in (B1, B2)]
    placement = {p: r.layers for p, r in records.items()}
    return records, plan(1, A1, placement, flows=tuple(flows))


def pick(snapshot, avoid=frozenset(), picker=None, new_tokens=8):
    picker = picker or RoutePicker(MODEL)
    return picker.pick(snapshot, 10, new_tokens, set(avoid), now=NOW)


def test_iwrr_spreads_requests_over_both_replicas_of_each_range():
    records, p = two_replicas()
    picker = RoutePicker(MODEL)
    routes = [pick(Snapshot(records, p, NOW), picker=picker)[0] for _ in range(8)]
    heads = [r[0].peer_id for r in routes]
    tails = [r[1].peer_id for r in routes]
    assert heads.count(A1) == heads.count(A2) == 4
    assert tails.count(B1) == tails.count(B2) == 4
    assert all((r[0].start, r[0].end, r[1].start, r[1].end) == (0, 4, 4, 8) for r in routes)


def test_avoided_stale_full_and_unready_peers_are_skipped():
    records, p = two_replicas()
    snap = Snapshot(records, p, NOW)
    for _ in range(4):
        route, _ = pick(snap, avoid={A1})
        assert route[0].peer_id == A2
    stale = dict(records, **{B1: replace(records[B1], updated_at=NOW - 100)})
    full = dict(records, **{B1: replace(records[B1], free_kv_tokens=17)})  # 10 + 8 tokens needed
    loading = dict(records, **{B1: replace(records[B1], layers=(2, 8))})
    for view in (stale, full, loading):
        for _ in range(4):
            assert pick(Snapshot(view, p, NOW))[0][1].peer_id == B2


def test_without_a_plan_route_any_chain_of_serving_nodes():
    records, _ = two_replicas()
    route, _ = pick(Snapshot(records, None, NOW), avoid={A1, B2})
    assert [h.peer_id for h in route] == [A2, B1]
    # a node holding everything is the shortest chain
    whole = dict(records, **{"Qm" + "e" * 30: node("Qm" + "e" * 30, layers=(0, 8))})
    assert len(chain_over_records(whole, 10)) == 1


def test_no_route_names_the_missing_layers():
    records, p = two_replicas()
    route, why = pick(Snapshot(records, p, NOW), avoid={B1, B2})
    assert route is None
    assert "no live node serves layers [4, 8)" in why
    route, why = pick(Snapshot({}, None, NOW))
    assert route is None and "no plan" in why
