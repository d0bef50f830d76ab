"""`helix-cluster/1`, `helix-plan/1`, `helix-placement/1`: round trips, the bundled clusters, and a
clear error (file, field path, problem) for every kind of malformed file."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from builders import (
    A100,
    BUNDLED_CLUSTERS,
    KV_BOUND,
    L4,
    T4,
    Hardware,
    bundled_cluster,
    make_cluster,
    node,
    nodes_of,
    write_json,
)

from helix_p2p.cluster import Cluster, NodeId
from helix_p2p.data import CLUSTERS_DIR
from helix_p2p.errors import HelixError
from helix_p2p.formats import (
    FormatError,
    check_placement,
    cluster_to_dict,
    parse_cluster,
    plan_to_dict,
    read_cluster,
    read_placement,
    read_plan,
    write_cluster,
    write_placement,
    write_plan,
)
from helix_p2p.plan import EdgeFlow, PlacementRecord, Plan


def small_cluster() -> Cluster:
    return make_cluster(
        [node("a100-0", A100, region="us"), node("l4-0", L4, region="eu", max_layers=3), *nodes_of(T4, 2)],
        num_layers=6,
        links=[("a100-0", "l4-0", 500.0), ("l4-0", "t4-0"), ("t4-0", "t4-1", 80.5)],
        coordinator={"a100-0": (1000.0, 0.0), "t4-1": (0.0, 900.0), "l4-0": (10.0, 10.0)},
        name="small",
        published={"paper_flow": 123.4, "nested": {"list": [1, 2.5, None], "note": "from a table"}},
    )


def small_plan(**changes: Any) -> Plan:
    fields: dict[str, Any] = {
        "cluster": "small",
        "method": "swarm",
        "placement": {NodeId("a100-0"): (0, 3), NodeId("l4-0"): (3, 6)},
        "flows": (
            EdgeFlow("source", "a100-0", 12.5),
            EdgeFlow("a100-0", "l4-0", 12.5),
            EdgeFlow("l4-0", "sink", 12.5),
        ),
        "objective_tokens_per_s": 12.5,
        "upper_bound_tokens_per_s": 40.25,
        "solve_seconds": 0.125,
        "partial_inference": False,
    }
    fields.update(changes)
    return Plan(**fields)


# ---------------------------------------------------------------------------------------- round trips


def test_cluster_round_trip(tmp_path: Path) -> None:
    cluster = small_cluster()
    write_cluster(cluster, tmp_path / "c.json")
    again = read_cluster(tmp_path / "c.json")
    assert again == cluster
    # the written file is itself in the documented shape, and writing it again changes nothing
    assert json.loads((tmp_path / "c.json").read_text())["format"] == "helix-cluster/1"
    write_cluster(again, tmp_path / "c2.json")
    assert (tmp_path / "c2.json").read_text() == (tmp_path / "c.json").read_text()


def test_cluster_round_trip_keeps_real_tables_bit_for_bit(tmp_path: Path) -> None:
    table = (1987.96933583407, 901.9376894944129, 539.0387352860497, 1e-300, 5e300)
    cluster = make_cluster([node("x", KV_BOUND), node("y", Hardware("odd", table))], num_layers=3)
    write_cluster(cluster, tmp_path / "c.json")
    assert read_cluster(tmp_path / "c.json").node_by_id[NodeId("y")].tokens_per_s == table


@pytest.mark.parametrize("bound", [40.25, None])
@pytest.mark.parametrize("partial", [False, True])
def test_plan_round_trip(tmp_path: Path, bound: float | None, partial: bool) -> None:
    plan = small_plan(upper_bound_tokens_per_s=bound, partial_inference=partial)
    write_plan(plan, tmp_path / "p.json")
    again = read_plan(tmp_path / "p.json")
    assert again == plan
    assert again.gap == plan.gap


def test_plan_round_trip_drops_only_details(tmp_path: Path) -> None:
    plan = small_plan(details={"backend": "cp-sat", "status": "OPTIMAL"})
    write_plan(plan, tmp_path / "p.json")
    again = read_plan(tmp_path / "p.json")
    assert again == plan  # `details` is kept out of the file format (and out of equality)
    assert dict(again.details) == {}
    assert set(plan_to_dict(plan)) == {
        "format", "cluster", "method", "placement", "flows", "objective_tokens_per_s",
        "upper_bound_tokens_per_s", "solve_seconds", "partial_inference",
    }  # fmt: skip


def test_plan_partial_inference_defaults_to_false(tmp_path: Path) -> None:
    doc = plan_to_dict(small_plan(partial_inference=True))
    del doc["partial_inference"]
    assert read_plan(write_json(tmp_path / "p.json", doc)).partial_inference is False


@pytest.mark.parametrize(
    "max_flow,reported", [(1289.5557702751464, 1289.5557702751735), (None, None), (0.0, None)]
)
def test_placement_round_trip(tmp_path: Path, max_flow: float | None, reported: float | None) -> None:
    record = PlacementRecord(
        cluster="single24-llama70b",
        placement={NodeId("a100-0"): (0, 12), NodeId("l4-0"): (12, 19), NodeId("t4-3"): (70, 80)},
        max_flow=max_flow,
        reported=reported,
    )
    write_placement(record, tmp_path / "pl.json")
    assert read_placement(tmp_path / "pl.json") == record


def test_placement_optional_numbers_may_be_absent(tmp_path: Path) -> None:
    doc = {"format": "helix-placement/1", "cluster": "c", "placement": {"a": [0, 3]}}
    record = read_placement(write_json(tmp_path / "pl.json", doc))
    assert record == PlacementRecord("c", {NodeId("a"): (0, 3)}, None, None)


@pytest.mark.parametrize("name", BUNDLED_CLUSTERS)
def test_bundled_cluster_parses_and_round_trips(tmp_path: Path, name: str) -> None:
    cluster = bundled_cluster(name)
    raw = json.loads((CLUSTERS_DIR / f"{name}.json").read_text())
    assert cluster.name == raw["name"]
    assert len(cluster.nodes) == len(raw["nodes"]) and len(cluster.links) == len(raw["links"])
    assert cluster.model.num_layers == raw["model"]["num_layers"]
    for spec, doc in zip(cluster.nodes, raw["nodes"]):
        assert spec.tokens_per_s == tuple(doc["tokens_per_s"][: doc["max_layers"]])
    assert cluster.published == raw["published"]
    write_cluster(cluster, tmp_path / "c.json")
    assert read_cluster(tmp_path / "c.json") == cluster


def test_the_bundled_clusters_are_all_there() -> None:
    assert set(BUNDLED_CLUSTERS) >= {
        "single24-llama70b",
        "single24-llama30b",
        "single24-llama30b-sub-a100",
        "single24-llama30b-sub-l4",
        "single24-llama30b-sub-t4",
        "cluster10-llama30b",
    }


# ------------------------------------------------------------------------------- malformed clusters

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """A mutation that sets the value at a dotted path such as `nodes.1.max_layers`."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return mutate


def _delete(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        del target[int(last) if isinstance(target, list) else last]

    return mutate


def _append_copy(key: str, index: int, **changes: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        doc[key].append({**copy.deepcopy(doc[key][index]), **changes})

    return mutate


# (mutation of a valid cluster document, field path the error must name, words it must contain)
CLUSTER_ERRORS: dict[str, tuple[Mutation, str, str]] = {
    # missing fields, at every depth
    "missing format": (_delete("format"), "format", "missing"),
    "missing name": (_delete("name"), "name", "missing"),
    "missing model": (_delete("model"), "model", "missing"),
    "missing model.num_layers": (_delete("model.num_layers"), "model.num_layers", "missing"),
    "missing model.activation_bytes": (
        _delete("model.activation_bytes"),
        "model.activation_bytes",
        "missing",
    ),
    "missing nodes": (_delete("nodes"), "nodes", "missing"),
    "missing node id": (_delete("nodes.1.id"), "nodes[1].id", "missing"),
    "missing max_layers": (_delete("nodes.2.max_layers"), "nodes[2].max_layers", "missing"),
    "missing tokens_per_s": (_delete("nodes.0.tokens_per_s"), "nodes[0].tokens_per_s", "missing"),
    "missing nic": (_delete("nodes.3.nic_out_bytes_per_s"), "nodes[3].nic_out_bytes_per_s", "missing"),
    "missing links": (_delete("links"), "links", "missing"),
    "missing link bandwidth": (_delete("links.1.bytes_per_s"), "links[1].bytes_per_s", "missing"),
    "missing link latency": (_delete("links.0.latency_s"), "links[0].latency_s", "missing"),
    "missing coordinator": (_delete("coordinator"), "coordinator", "missing"),
    "missing coordinator out": (
        _delete("coordinator.0.out_bytes_per_s"),
        "coordinator[0].out_bytes_per_s",
        "missing",
    ),
    # wrong types
    "name not a string": (_set("name", 5), "name", "expected a string, got a number"),
    "model not an object": (_set("model", [80]), "model", "expected an object, got a list"),
    "num_layers a string": (_set("model.num_layers", "80"), "model.num_layers", "expected an integer"),
    "num_layers a float": (_set("model.num_layers", 80.0), "model.num_layers", "expected an integer"),
    "nodes not a list": (_set("nodes", {"a": 1}), "nodes", "expected a list, got an object"),
    "node not an object": (_set("nodes.1", "a100-1"), "nodes[1]", "expected an object, got a string"),
    "node id a number": (_set("nodes.0.id", 7), "nodes[0].id", "expected a string"),
    "max_layers a float": (_set("nodes.0.max_layers", 2.5), "nodes[0].max_layers", "expected an integer"),
    "tokens_per_s not a list": (
        _set("nodes.0.tokens_per_s", 5.0),
        "nodes[0].tokens_per_s",
        "expected a list",
    ),
    "tokens_per_s entry a string": (
        _set("nodes.0.tokens_per_s.1", "fast"),
        "nodes[0].tokens_per_s[1]",
        "expected a number, got a string",
    ),
    "link not an object": (_set("links.0", ["a", "b"]), "links[0]", "expected an object, got a list"),
    "link bandwidth a string": (
        _set("links.0.bytes_per_s", "1e9"),
        "links[0].bytes_per_s",
        "expected a number",
    ),
    "link src null": (_set("links.0.src", None), "links[0].src", "expected a string, got null"),
    "published a list": (_set("published", [1]), "published", "expected an object, got a list"),
    # bool where a number belongs (JSON true is not 1)
    "bool as bandwidth": (_set("links.0.bytes_per_s", True), "links[0].bytes_per_s", "got a boolean"),
    "bool as nic": (
        _set("nodes.1.nic_in_bytes_per_s", False),
        "nodes[1].nic_in_bytes_per_s",
        "got a boolean",
    ),
    "bool as max_layers": (_set("nodes.1.max_layers", True), "nodes[1].max_layers", "got a boolean"),
    "bool as num_layers": (_set("model.num_layers", True), "model.num_layers", "got a boolean"),
    "bool in tokens_per_s": (
        _set("nodes.0.tokens_per_s.0", True),
        "nodes[0].tokens_per_s[0]",
        "got a boolean",
    ),
    # NaN and infinities (Python's json reads them; the format does not allow them)
    "NaN bandwidth": (_set("links.0.bytes_per_s", math.nan), "links[0].bytes_per_s", "must be finite"),
    "infinite bandwidth": (_set("links.0.bytes_per_s", math.inf), "links[0].bytes_per_s", "must be finite"),
    "NaN tokens_per_s": (
        _set("nodes.2.tokens_per_s.0", math.nan),
        "nodes[2].tokens_per_s[0]",
        "must be finite",
    ),
    "NaN coordinator": (
        _set("coordinator.1.in_bytes_per_s", math.nan),
        "coordinator[1].in_bytes_per_s",
        "must be finite",
    ),
    "-inf nic": (
        _set("nodes.0.nic_out_bytes_per_s", -math.inf),
        "nodes[0].nic_out_bytes_per_s",
        "must be finite",
    ),
    # negative or zero bandwidths and throughputs
    "zero link bandwidth": (_set("links.0.bytes_per_s", 0), "links[0].bytes_per_s", "must be > 0, got 0"),
    "negative link bandwidth": (
        _set("links.2.bytes_per_s", -5.0),
        "links[2].bytes_per_s",
        "must be > 0, got -5",
    ),
    "zero nic": (_set("nodes.1.nic_in_bytes_per_s", 0), "nodes[1].nic_in_bytes_per_s", "must be > 0"),
    "negative nic": (
        _set("nodes.1.nic_out_bytes_per_s", -1e9),
        "nodes[1].nic_out_bytes_per_s",
        "must be > 0",
    ),
    "negative coordinator": (
        _set("coordinator.0.out_bytes_per_s", -1.0),
        "coordinator[0].out_bytes_per_s",
        "must be >= 0",
    ),
    "zero tokens_per_s": (_set("nodes.0.tokens_per_s.2", 0.0), "nodes[0].tokens_per_s[2]", "must be > 0"),
    "negative latency": (_set("links.0.latency_s", -0.001), "links[0].latency_s", "must be >= 0"),
    "zero num_layers": (_set("model.num_layers", 0), "model.num_layers", "must be >= 1"),
    "zero max_layers": (_set("nodes.0.max_layers", 0), "nodes[0].max_layers", "must be >= 1"),
    "zero activation_bytes": (_set("model.activation_bytes", 0), "model.activation_bytes", "must be >= 1"),
    # max_layers longer than its table
    "max_layers past tokens_per_s": (
        _set("nodes.3.max_layers", 3),
        "nodes[3].max_layers",
        "max_layers=3 is longer than tokens_per_s (2 entries)",
    ),
    # references to unknown nodes
    "link to unknown node": (_set("links.1.dst", "ghost"), "links[1].dst", "unknown node 'ghost'"),
    "link from unknown node": (_set("links.0.src", "a100-9"), "links[0].src", "unknown node 'a100-9'"),
    "coordinator unknown node": (_set("coordinator.2.node", "nobody"), "coordinator[2].node", "unknown node"),
    # duplicates and reserved names
    "duplicate node id": (
        _set("nodes.2.id", "a100-0"),
        "nodes[2].id",
        "duplicate node id 'a100-0' (first at nodes[0])",
    ),
    "duplicate link": (_append_copy("links", 1), "links[3]", "duplicate link 'l4-0' -> 't4-0'"),
    "duplicate coordinator": (
        _append_copy("coordinator", 0),
        "coordinator[3]",
        "duplicate coordinator entry",
    ),
    "self link": (_set("links.0.dst", "a100-0"), "links[0]", "a link from 'a100-0' to itself"),
    "node named source": (_set("nodes.1.id", "source"), "nodes[1].id", "reserved"),
    "node named sink": (_set("nodes.1.id", "sink"), "nodes[1].id", "reserved"),
    "no nodes": (_set("nodes", []), "nodes", "the cluster has no nodes"),
    # the format tag
    "unknown format": (_set("format", "helix-cluster/2"), "format", "unknown format 'helix-cluster/2'"),
    "plan read as cluster": (_set("format", "helix-plan/1"), "format", "expected 'helix-cluster/1'"),
    "format not a string": (_set("format", 1), "format", "expected a string"),
}


@pytest.mark.parametrize("case", CLUSTER_ERRORS, ids=list(CLUSTER_ERRORS))
def test_malformed_cluster_names_file_field_and_problem(tmp_path: Path, case: str) -> None:
    mutate, field, problem = CLUSTER_ERRORS[case]
    doc = cluster_to_dict(small_cluster())
    mutate(doc)
    path = write_json(tmp_path / "cluster.json", doc)
    with pytest.raises(FormatError) as info:
        read_cluster(path)
    err = info.value
    assert (err.where, err.field) == (str(path), field)
    assert problem in err.problem
    message = str(err)
    assert str(path) in message and f"'{field}'" in message and problem in message
    assert "\n" not in message  # one line for the CLI
    assert isinstance(err, HelixError) and isinstance(err, ValueError)


def test_the_unmutated_document_is_valid() -> None:
    """The malformed cases above each break one thing of a document that is otherwise fine."""
    assert parse_cluster(cluster_to_dict(small_cluster())) == small_cluster()


@pytest.mark.parametrize(
    "text,problem",
    [
        ('{"format": "helix-cluster/1",', "not valid JSON"),
        ("", "not valid JSON: Expecting value at line 1 column 1"),
        ('{"a": 1}\n{"b": 2}', "not valid JSON: Extra data at line 2 column 1"),
        ("[1, 2]", "expected a JSON object at the top level, got a list"),
        ('"helix-cluster/1"', "expected a JSON object at the top level"),
        ("null", "expected a JSON object at the top level, got null"),
    ],
)
def test_not_a_cluster_document(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(FormatError, match=f"^{path}: ") as info:
        read_cluster(path)
    assert problem in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "cluster.json"
    with pytest.raises(FormatError) as info:
        read_cluster(path)
    assert str(info.value) == f"{path}: no such file"


def test_unwritable_path_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "no-such-folder" / "plan.json"
    with pytest.raises(FormatError) as info:
        write_plan(small_plan(), path)
    assert str(info.value) == f"{path}: cannot write: No such file or directory"
    with pytest.raises(FormatError, match="cannot write"):
        write_cluster(small_cluster(), tmp_path)  # a directory


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot read"):
        read_cluster(tmp_path)  # a directory
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FormatError, match=f"^{binary}: cannot read"):
        read_cluster(binary)


def test_absurd_numbers_are_format_errors_not_crashes(tmp_path: Path) -> None:
    doc = json.dumps(cluster_to_dict(small_cluster()))
    huge = doc.replace('"max_layers": 6', '"max_layers": ' + "9" * 5000, 1)
    with pytest.raises(FormatError, match="not valid JSON"):
        read_cluster(_write_text(tmp_path / "huge_int.json", huge))
    overflow = doc.replace('"bytes_per_s": 500000.0', '"bytes_per_s": ' + "9" * 400, 1)
    with pytest.raises(FormatError) as info:
        read_cluster(_write_text(tmp_path / "overflow.json", overflow))
    assert info.value.field == "links[0].bytes_per_s" and "too large" in info.value.problem
    with pytest.raises(FormatError, match="not valid JSON"):
        read_cluster(_write_text(tmp_path / "deep.json", "[" * 100_000))


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_max_layers_may_exceed_the_model_and_longer_tables_are_cut() -> None:
    """A node may be able to hold more layers than this model has; a longer table than max_layers is
    accepted and cut to max_layers (its extra entries mean nothing)."""
    doc = cluster_to_dict(small_cluster())
    doc["nodes"][1]["tokens_per_s"] += [1.0, 2.0]
    cluster = parse_cluster(doc)
    assert cluster.nodes[1].tokens_per_s == L4.tokens_per_s[:3]
    assert cluster.nodes[0].max_layers == 6 == cluster.model.num_layers


def test_optional_fields() -> None:
    doc = cluster_to_dict(small_cluster())
    del doc["source"], doc["published"], doc["nodes"][0]["region"], doc["coordinator"][0]["latency_s"]
    cluster = parse_cluster(doc, where="mem")
    assert cluster.source == "" and cluster.published == {}
    assert cluster.nodes[0].region == "default"
    assert cluster.coordinator[0].latency_s == 0.0


# ------------------------------------------------------------------------- malformed plans, placements


def _plan_doc() -> dict[str, Any]:
    return plan_to_dict(small_plan())


PLAN_ERRORS: dict[str, tuple[Mutation, str, str]] = {
    "missing objective": (_delete("objective_tokens_per_s"), "objective_tokens_per_s", "missing"),
    "missing bound": (_delete("upper_bound_tokens_per_s"), "upper_bound_tokens_per_s", "missing"),
    "missing flows": (_delete("flows"), "flows", "missing"),
    "missing method": (_delete("method"), "method", "missing"),
    "missing placement": (_delete("placement"), "placement", "missing"),
    "missing flow dst": (_delete("flows.1.dst"), "flows[1].dst", "missing"),
    "negative flow": (_set("flows.2.tokens_per_s", -1.0), "flows[2].tokens_per_s", "must be >= 0"),
    "NaN flow": (_set("flows.0.tokens_per_s", math.nan), "flows[0].tokens_per_s", "must be finite"),
    "bool flow": (_set("flows.0.tokens_per_s", True), "flows[0].tokens_per_s", "got a boolean"),
    "NaN bound": (_set("upper_bound_tokens_per_s", math.nan), "upper_bound_tokens_per_s", "must be finite"),
    "string bound": (
        _set("upper_bound_tokens_per_s", "1e3"),
        "upper_bound_tokens_per_s",
        "expected a number",
    ),
    "negative objective": (_set("objective_tokens_per_s", -3), "objective_tokens_per_s", "must be >= 0"),
    "negative seconds": (_set("solve_seconds", -0.5), "solve_seconds", "must be >= 0"),
    "partial not a bool": (_set("partial_inference", "yes"), "partial_inference", "expected a boolean"),
    "placement a list": (_set("placement", [[0, 3]]), "placement", "expected an object, got a list"),
    "range backwards": (
        _set("placement.l4-0", [6, 3]),
        "placement.l4-0",
        "expected 0 <= start < end, got [6, 3]",
    ),
    "range empty": (_set("placement.l4-0", [3, 3]), "placement.l4-0", "expected 0 <= start < end"),
    "range negative": (_set("placement.a100-0", [-1, 3]), "placement.a100-0", "expected 0 <= start < end"),
    "range one number": (_set("placement.a100-0", [3]), "placement.a100-0", "expected [start, end]"),
    "range floats": (_set("placement.a100-0", [0.0, 3.0]), "placement.a100-0", "as two integers"),
    "range bools": (_set("placement.a100-0", [False, True]), "placement.a100-0", "as two integers"),
    "range a string": (_set("placement.a100-0", "0-3"), "placement.a100-0", "expected [start, end]"),
    "placement of source": (_set("placement.source", [0, 1]), "placement.source", "reserved"),
    "unknown format": (_set("format", "helix-plan/0"), "format", "unknown format 'helix-plan/0'"),
    "cluster read as plan": (_set("format", "helix-cluster/1"), "format", "expected 'helix-plan/1'"),
}


@pytest.mark.parametrize("case", PLAN_ERRORS, ids=list(PLAN_ERRORS))
def test_malformed_plan_names_file_field_and_problem(tmp_path: Path, case: str) -> None:
    mutate, field, problem = PLAN_ERRORS[case]
    doc = _plan_doc()
    mutate(doc)
    path = write_json(tmp_path / "plan.json", doc)
    with pytest.raises(FormatError) as info:
        read_plan(path)
    assert (info.value.where, info.value.field) == (str(path), field)
    assert problem in info.value.problem
    assert str(path) in str(info.value) and field in str(info.value)


PLACEMENT_ERRORS: dict[str, tuple[Mutation, str, str]] = {
    "missing cluster": (_delete("cluster"), "cluster", "missing"),
    "missing placement": (_delete("placement"), "placement", "missing"),
    "negative max_flow": (_set("max_flow", -1.0), "max_flow", "must be >= 0"),
    "string reported": (_set("reported", "1289"), "reported", "expected a number"),
    "bool max_flow": (_set("max_flow", True), "max_flow", "got a boolean"),
    "bad range": (_set("placement.a", [2, 1]), "placement.a", "expected 0 <= start < end"),
    "unknown format": (_set("format", "helix-placement/9"), "format", "unknown format"),
}


@pytest.mark.parametrize("case", PLACEMENT_ERRORS, ids=list(PLACEMENT_ERRORS))
def test_malformed_placement_names_file_field_and_problem(tmp_path: Path, case: str) -> None:
    mutate, field, problem = PLACEMENT_ERRORS[case]
    doc = {"format": "helix-placement/1", "cluster": "c", "placement": {"a": [0, 3]}, "max_flow": 1.0,
           "reported": 1.0}  # fmt: skip
    mutate(doc)
    path = write_json(tmp_path / "placement.json", doc)
    with pytest.raises(FormatError) as info:
        read_placement(path)
    assert (info.value.where, info.value.field) == (str(path), field)
    assert problem in info.value.problem and str(path) in str(info.value)


# ------------------------------------------------------------------------------------ check_placement


def test_check_placement_accepts_a_fitting_placement() -> None:
    cluster = small_cluster()
    check_placement({NodeId("a100-0"): (0, 6), NodeId("l4-0"): (3, 6), NodeId("t4-1"): (4, 6)}, cluster)
    check_placement({}, cluster)  # holding nothing is allowed


@pytest.mark.parametrize(
    "node_id,rng,problem",
    [
        ("l4-0", (4, 7), "[4, 7) is outside the model's 6 layers"),
        ("a100-0", (6, 7), "outside the model's 6 layers"),
        ("t4-0", (3, 3), "outside the model"),
        ("t4-0", (-1, 1), "outside the model"),
        ("l4-0", (0, 4), "holds 4 layers but max_layers is 3"),
        ("t4-1", (2, 5), "holds 3 layers but max_layers is 2"),
        ("ghost", (0, 1), "unknown node 'ghost' (not in cluster 'small')"),
    ],
)
def test_check_placement_rejects(node_id: str, rng: tuple[int, int], problem: str) -> None:
    placement = {NodeId("a100-0"): (0, 3), NodeId(node_id): rng}
    with pytest.raises(FormatError) as info:
        check_placement(placement, small_cluster(), where="layout.json")
    assert (info.value.where, info.value.field) == ("layout.json", f"placement.{node_id}")
    assert problem in info.value.problem
    assert str(info.value).startswith(f"layout.json: field 'placement.{node_id}': ")
