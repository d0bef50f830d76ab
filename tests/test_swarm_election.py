"""The election rule, plan choice, epochs, re-plan decisions, the registry as a Cluster, probing."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from swarm_builders import MODEL, NOW, link, node, plan

from helix_p2p.planner import PlanOptions
from helix_p2p.planner import plan as run_planner
from helix_p2p.swarm.cluster_view import (
    RELAYED_LINK_FACTOR,
    UNMEASURED_LATENCY_S,
    planning_members,
    registry_to_cluster,
)
from helix_p2p.swarm.election import choose_plan, elect_planner, next_epoch
from helix_p2p.swarm.probing import choose_probe_targets, links_to_announce, plan_neighbors
from helix_p2p.swarm.records import NodeState, Reachability
from helix_p2p.swarm.replan import (
    MembershipWatch,
    live_placement,
    plan_record_of,
    previous_plan_on,
    worth_adopting,
)


def registry(*records):
    return {r.peer_id: r for r in records}


# ------------------------------------------------------------------------------------------ election


def test_the_oldest_live_eligible_node_is_elected_by_everyone():
    records = registry(
        node("QmA", joined_at=NOW - 10), node("QmB", joined_at=NOW - 50), node("QmC", joined_at=NOW - 30)
    )
    assert elect_planner(records, NOW, MODEL.id) == "QmB"
    # any iteration order gives the same answer
    assert elect_planner(dict(reversed(list(records.items()))), NOW, MODEL.id) == "QmB"


def test_election_skips_stale_leaving_ineligible_and_other_models():
    oldest = node("QmA", joined_at=NOW - 90)
    records = registry(
        replace(oldest, updated_at=NOW - 11),  # missed two 5 s refreshes
        node("QmB", joined_at=NOW - 80, state=NodeState.LEAVING),
        node("QmC", joined_at=NOW - 70, planner_eligible=False),
        node("QmD", joined_at=NOW - 60, model=replace(MODEL, id="other")),
        node("QmE", joined_at=NOW - 50),
    )
    assert elect_planner(records, NOW, MODEL.id) == "QmE"
    assert elect_planner(records, NOW, "other") == "QmD"
    assert elect_planner({}, NOW, MODEL.id) is None


def test_ties_on_join_time_break_by_peer_id_hash_deterministically():
    records = registry(*(node(f"Qm{i}", joined_at=NOW - 10) for i in range(6)))
    winners = {
        elect_planner(dict(random.Random(s).sample(list(records.items()), 6)), NOW, MODEL.id)
        for s in range(5)
    }
    assert len(winners) == 1


def test_a_node_follows_only_the_elected_planner_and_the_newest_epoch():
    ours = plan(4, "QmA", {"QmA": (0, 8)})
    forged = plan(99, "QmX", {"QmX": (0, 8)})
    assert choose_plan([ours, forged], "QmA", None, MODEL.id) == ours
    newer = plan(5, "QmA", {"QmA": (0, 8)})
    assert choose_plan([ours, newer, forged], "QmA", ours, MODEL.id) == newer
    assert choose_plan([ours], "QmA", newer, MODEL.id) == newer  # never step back on the same planner
    assert choose_plan([forged], "QmA", ours, MODEL.id) == ours  # nothing from the elected one: keep
    other_model = plan(6, "QmA", {"QmA": (0, 8)}, model="other")
    assert choose_plan([other_model], "QmA", ours, MODEL.id) == ours


def test_a_new_planner_takes_over_even_below_the_old_epoch():
    old = plan(7, "QmA", {"QmA": (0, 8)})
    takeover = plan(3, "QmB", {"QmB": (0, 8)})
    assert choose_plan([old, takeover], "QmB", old, MODEL.id) == takeover


def test_next_epoch_counts_past_its_own_plans_and_the_followed_one_only():
    plans = [plan(4, "QmA", {"QmA": (0, 8)}), plan(1000, "QmX", {"QmX": (0, 8)})]
    assert next_epoch(plans, "QmA", None) == 5  # a restarted planner outranks its old plan
    assert next_epoch(plans, "QmB", plan(9, "QmA", {"QmA": (0, 8)})) == 10
    assert next_epoch(plans, "QmB", None) == 1  # QmX's huge epoch does not inflate ours
    # and nodes still switch to the new planner's lower epoch
    assert (
        choose_plan([plans[1], plan(1, "QmB", {"QmB": (0, 8)})], "QmB", plans[1], MODEL.id).planner == "QmB"
    )


# ------------------------------------------------------------------------------- registry as cluster


def test_registry_becomes_a_cluster_with_measured_and_estimated_links():
    a = node("QmA", links=(link("QmB", bytes_per_s=5e7, rtt_s=0.02),), nic_out_bytes_per_s=2e8)
    b = node("QmB", nic_in_bytes_per_s=3e8, nic_out_bytes_per_s=4e8)
    c = node("QmC", reachability=Reachability.RELAY, max_layers=2, tokens_per_s=(50.0, 25.0, 10.0))
    members = planning_members(registry(a, b, c), NOW, MODEL.id)
    cluster = registry_to_cluster(members)
    assert [n.id for n in cluster.nodes] == ["QmA", "QmB", "QmC"]
    assert cluster.model.num_layers == 8 and cluster.model.activation_bytes == 64 * 4
    assert cluster.node_by_id["QmC"].tokens_per_s == (50.0, 25.0)
    ab = cluster.link_by_pair[("QmA", "QmB")]
    assert (ab.bytes_per_s, ab.latency_s) == (5e7, 0.01)
    # b -> a: a measured its inbound side of the same probe
    assert cluster.link_by_pair[("QmB", "QmA")].bytes_per_s == 5e7
    # unmeasured: min of the NICs, and a relayed end costs RELAYED_LINK_FACTOR
    bc = cluster.link_by_pair[("QmB", "QmC")]
    assert bc.bytes_per_s == pytest.approx(4e8 * RELAYED_LINK_FACTOR)
    assert bc.latency_s == UNMEASURED_LATENCY_S
    assert cluster.link_by_pair[("QmA", "QmC")].bytes_per_s == pytest.approx(2e8 * RELAYED_LINK_FACTOR)
    assert len(cluster.links) == 6


def test_newest_measurement_of_a_pair_wins():
    a = node("QmA", links=(link("QmB", bytes_per_s=1e6, at=NOW - 50),))
    b = node("QmB", links=(link("QmA", bytes_per_s=9e6, at=NOW - 5),))
    cluster = registry_to_cluster(planning_members(registry(a, b), NOW, MODEL.id))
    assert cluster.link_by_pair[("QmA", "QmB")].bytes_per_s == 9e6


def test_planning_members_drop_stale_leaving_and_mismatched_shapes():
    records = registry(
        node("QmA"),
        node("QmB"),
        node("QmC", state=NodeState.LEAVING),
        node("QmD", updated_at=NOW - 60),
        node("QmE", model=replace(MODEL, num_layers=9)),  # same id, other shape: misconfigured
    )
    assert sorted(planning_members(records, NOW, MODEL.id)) == ["QmA", "QmB"]


def test_the_planner_plans_the_registry():
    records = registry(*(node(f"Qm{i}", tokens_per_s=(100.0 * (i + 1), 60.0, 40.0, 30.0)) for i in range(4)))
    cluster = registry_to_cluster(planning_members(records, NOW, MODEL.id))
    result = run_planner(cluster, PlanOptions(method="sp"))
    covered = sorted(layer for s, e in result.placement.values() for layer in range(s, e))
    assert set(covered) == set(range(8))
    assert result.objective_tokens_per_s > 0
    record = plan_record_of(
        result, epoch=1, planner="Qm0", model=MODEL.id, num_layers=8, members=records, created_at=NOW
    )
    assert record.members == ("Qm0", "Qm1", "Qm2", "Qm3")


# ------------------------------------------------------------------------------------------ re-plan


def test_previous_plan_is_rescored_on_the_live_cluster():
    records = registry(node("QmA"), node("QmB"))
    cluster = registry_to_cluster(planning_members(records, NOW, MODEL.id))
    old = plan(3, "QmA", {"QmA": (0, 4), "QmB": (4, 8), "QmGone": (0, 4)})
    assert live_placement(old.placement, cluster) == {"QmA": (0, 4), "QmB": (4, 8)}
    previous = previous_plan_on(cluster, old)
    assert previous is not None and previous.objective_tokens_per_s == pytest.approx(100.0)
    broken = previous_plan_on(cluster, plan(3, "QmA", {"QmA": (0, 4), "QmGone": (4, 8)}))
    assert broken is not None and broken.objective_tokens_per_s == 0.0
    assert previous_plan_on(cluster, None) is None


@pytest.mark.parametrize(
    "current, new, moved, adopt",
    [
        (100.0, 100.0, 0, False),
        (100.0, 101.0, 0, True),  # free gain
        (100.0, 105.0, 3, False),  # not worth moving layers
        (100.0, 111.0, 3, True),
        (0.0, 1.0, 8, True),  # a broken plan: anything that flows
    ],
)
def test_gain_must_pay_for_moved_layers(current, new, moved, adopt):
    assert worth_adopting(current, new, moved, min_gain=0.1) is adopt


def test_membership_is_debounced():
    watch = MembershipWatch(debounce_s=2.0)
    assert watch.observe({"a", "b"}, 0.0) is None
    assert watch.observe({"a", "b"}, 1.0) is None
    assert watch.observe({"a", "b"}, 2.0) == {"a", "b"}
    assert watch.observe({"a"}, 2.5) is None  # flapped: wait again
    assert watch.observe({"a"}, 4.5) == {"a"}


# ------------------------------------------------------------------------------------------ probing


def test_probe_targets_are_bounded_and_put_plan_neighbours_first():
    me = node("QmM", layers=(2, 4))
    others = [node(f"Qm{i:03d}", layers=(0, 2) if i == 7 else None) for i in range(1000)]
    records = registry(me, *others)
    current = plan(1, "QmM", {"Qm500": (0, 2), "QmM": (2, 4), "Qm900": (4, 8)})
    assert plan_neighbors("QmM", current) == {"Qm500", "Qm900"}
    targets = choose_probe_targets(
        me, records, current, {}, k=8, now=NOW, max_age_s=300, rng=random.Random(0)
    )
    assert len(targets) == 8 and "QmM" not in targets
    assert targets[:3] == ["Qm500", "Qm900", "Qm007"]  # plan neighbours, then adjoining ranges
    # recently measured peers are not probed again
    again = choose_probe_targets(
        me, records, current, {p: NOW - 1 for p in targets}, k=8, now=NOW, max_age_s=300, rng=random.Random(0)
    )
    assert not set(again) & set(targets)


def test_announced_links_are_capped_fresh_and_live():
    records = registry(*(node(f"Qm{i}") for i in range(50)), node("QmDead", updated_at=NOW - 100))
    measurements = {f"Qm{i}": link(f"Qm{i}", at=NOW - i) for i in range(50)}
    measurements["QmDead"] = link("QmDead")
    measurements["Qm49"] = link("Qm49", at=NOW - 10_000)
    chosen = links_to_announce(
        measurements, records, now=NOW, max_links=16, max_age_s=600, preferred={"Qm40"}
    )
    assert len(chosen) == 16
    assert chosen[0].peer == "Qm40"
    assert "QmDead" not in {m.peer for m in chosen} and "Qm49" not in {m.peer for m in chosen}
