"""Node and plan records: wire round trips, strict schema checks, size caps, key names."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest
from swarm_builders import MODEL, link, node, plan

from helix_p2p.plan import EdgeFlow
from helix_p2p.swarm.keys import REGISTRY_SHARDS, SwarmPrefixError, plan_key, registry_key, registry_keys
from helix_p2p.swarm.records import (
    MAX_LINKS,
    MAX_NODE_RECORD_BYTES,
    NodeState,
    RecordError,
    moved_layers,
    node_record_from_wire,
    node_record_to_wire,
    plan_body_bytes,
    plan_record_from_body,
)


def test_node_record_round_trips_through_msgpack():
    record = node("QmA", layers=(0, 4), loading_layers=(2, 6), links=(link("QmB"), link("QmC")))
    wire = msgpack.unpackb(msgpack.packb(node_record_to_wire(record), use_bin_type=True), raw=False)
    assert node_record_from_wire(wire) == record


def test_a_full_size_honest_record_fits_the_cap():
    record = node(
        "Qm" + "x" * 44,
        max_layers=80,
        tokens_per_s=tuple(1000.0 / k for k in range(1, 81)),
        links=tuple(link("Qm" + str(i) * 44) for i in range(MAX_LINKS)),
        name="n" * 64,
        gpu="g" * 64,
    )
    packed = msgpack.packb(node_record_to_wire(record), use_bin_type=True)
    assert len(packed) <= MAX_NODE_RECORD_BYTES


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("format", "helix-node/9", "unknown format"),
        ("max_layers", 0, "max_layers"),
        ("max_layers", True, "expected an integer"),
        ("state", "dancing", "expected one of"),
        ("layers", [3, 2], "start < end"),
        ("layers", [0, 99], "start < end <= 8"),
        ("tokens_per_s", [1.0, -2.0, 1.0, 1.0], "tokens_per_s[1]"),
        ("tokens_per_s", [1.0], "has 1 entries but max_layers is 4"),
        ("nic_in_bytes_per_s", float("nan"), "finite"),
        ("name", "x" * 65, "longer than 64"),
        ("name", "bad\nname", "control characters"),
        ("refresh_s", 10_000.0, "refresh_s"),
        ("links", [["QmB", 1.0, 1.0, 0.1]], "expected [peer"),
        ("links", [["QmA", 1.0, 1.0, 0.1, 1.0]], "self link"),
        ("links", [["QmB", 1.0, 1.0, 0.1, 1.0]] * (MAX_LINKS + 1), "at most"),
        ("planner_eligible", 1, "expected a boolean"),
    ],
)
def test_node_record_schema_errors_name_the_field(field, value, message):
    wire = node_record_to_wire(node("QmA"))
    wire[field] = value
    with pytest.raises(RecordError, match="node record") as err:
        node_record_from_wire(wire)
    assert message in str(err.value)


def test_missing_field_and_non_map_are_refused():
    wire = node_record_to_wire(node("QmA"))
    del wire["state"]
    with pytest.raises(RecordError, match="'state': missing"):
        node_record_from_wire(wire)
    with pytest.raises(RecordError, match="expected a map"):
        node_record_from_wire([1, 2, 3])


def test_staleness_is_two_missed_refreshes():
    record = node("QmA", updated_at=100.0, refresh_s=5.0)
    assert record.is_live(109.9)
    assert not record.is_live(110.1)
    assert not replace(record, state=NodeState.LEAVING).is_live(100.0)


def test_plan_body_round_trips_and_is_canonical():
    record = plan(
        3, "QmA", {"QmA": (0, 4), "QmB": (4, 8)}, extra_members=["QmC"], upper_bound_tokens_per_s=12.5
    )
    body = plan_body_bytes(record)
    parsed = plan_record_from_body(body)
    assert parsed == record
    assert plan_body_bytes(parsed) == body
    assert parsed.members == ("QmA", "QmB", "QmC")


def test_plan_body_refuses_unknown_nodes_and_bad_ranges():
    record = plan(1, "QmA", {"QmA": (0, 8)})
    with pytest.raises(RecordError, match="not members"):
        plan_body_bytes(replace(record, placement={"QmZ": (0, 8)}))
    with pytest.raises(RecordError, match="not a member"):
        plan_body_bytes(replace(record, flows=(EdgeFlow("QmZ", "sink", 1.0),)))
    bad = plan_body_bytes(record).replace(b'"placement":[[0,0,8]]', b'"placement":[[0,0,9]]')
    with pytest.raises(RecordError, match="placement"):
        plan_record_from_body(bad)
    with pytest.raises(RecordError, match="not JSON"):
        plan_record_from_body(b"\xff\xfe")


def test_plan_flow_through_a_node_without_layers_is_refused():
    record = plan(1, "QmA", {"QmA": (0, 8)}, extra_members=["QmB"])
    body = plan_body_bytes(replace(record, flows=(EdgeFlow("source", "QmA", 1.0),)))
    body = body.replace(b'"flows":[[-1,0,1.0]]', b'"flows":[[-1,1,1.0]]')
    with pytest.raises(RecordError, match="holds no layers"):
        plan_record_from_body(body)


def test_moved_layers_counts_only_new_layers():
    old = {"a": (0, 4), "b": (4, 8)}
    assert moved_layers(old, old) == 0
    assert moved_layers(old, {"a": (0, 5), "b": (5, 8)}) == 1
    assert moved_layers(old, {"a": (4, 8), "b": (0, 4)}) == 8
    # a node that held nothing loads without pausing anyone: not a move
    assert moved_layers(old, {"a": (0, 4), "c": (4, 8)}) == 0
    assert moved_layers(old, {"a": (0, 4), "b": (0, 4), "c": (4, 8)}) == 4


def test_keys_live_under_the_prefix_and_shard_the_registry():
    keys = registry_keys("helix")
    assert len(keys) == REGISTRY_SHARDS == len(set(keys))
    assert all(k.startswith("helix/nodes/") for k in keys)
    assert registry_key("helix", "QmA") in keys
    assert plan_key("test-swarm") == "test-swarm/plan"
    shards = {registry_key("helix", f"Qm{i}") for i in range(200)}
    assert len(shards) == REGISTRY_SHARDS  # spread over all shards
    for bad in ("", "a/b", "x" * 65, "-lead", "sp ace"):
        with pytest.raises(SwarmPrefixError):
            registry_keys(bad)


def test_model_info_is_checked():
    wire = node_record_to_wire(node("QmA"))
    wire["model"] = dict(wire["model"], num_layers=0)
    with pytest.raises(RecordError, match="num_layers"):
        node_record_from_wire(wire)
    assert MODEL.num_layers == 8
