"""Reading and writing `helix-cluster/1`, `helix-plan/1` and `helix-placement/1` (FORMATS.md).

Readers check every field and raise `FormatError` naming the file, the field (as a path such as
`nodes[3].max_layers`) and what is wrong, so a user never sees a traceback from deep inside."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from helix_p2p.cluster import SINK, SOURCE, Cluster, CoordinatorLink, Link, ModelShape, NodeId, NodeSpec
from helix_p2p.errors import HelixError
from helix_p2p.plan import EdgeFlow, Placement, PlacementRecord, Plan

CLUSTER_FORMAT = "helix-cluster/1"
PLAN_FORMAT = "helix-plan/1"
PLACEMENT_FORMAT = "helix-placement/1"


class FormatError(HelixError, ValueError):
    """A file (or in-memory document) does not follow its format."""

    def __init__(self, where: str, field: str, problem: str) -> None:
        self.where = where
        self.field = field
        self.problem = problem
        location = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {location}{problem}")


class _Reader:
    """Typed access to a decoded JSON document that reports the path of any bad field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, problem: str) -> FormatError:
        return FormatError(self.where, path, problem)

    def get(self, obj: Mapping[str, Any], key: str, path: str, *, optional: bool = False) -> Any:
        if not isinstance(obj, Mapping):
            raise self.fail(path, f"expected an object, got {_kind(obj)}")
        full = f"{path}.{key}" if path else key
        if key not in obj:
            if optional:
                return None
            raise self.fail(full, "missing")
        return obj[key]

    def str_(self, obj: Mapping[str, Any], key: str, path: str = "", *, optional: bool = False) -> str:
        value = self.get(obj, key, path, optional=optional)
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            raise self.fail(_join(path, key), f"expected a string, got {_kind(value)}")
        return value

    def int_(self, obj: Mapping[str, Any], key: str, path: str = "", *, minimum: int | None = None) -> int:
        value = self.get(obj, key, path)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(_join(path, key), f"expected an integer, got {_kind(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(_join(path, key), f"must be >= {minimum}, got {value}")
        return value

    def number(
        self,
        obj: Mapping[str, Any],
        key: str,
        path: str = "",
        *,
        positive: bool = False,
        non_negative: bool = False,
        optional: bool = False,
    ) -> float:
        value = self.get(obj, key, path, optional=optional)
        if value is None and optional:
            return math.nan
        return self.check_number(value, _join(path, key), positive=positive, non_negative=non_negative)

    def check_number(
        self, value: Any, path: str, *, positive: bool = False, non_negative: bool = False
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"expected a number, got {_kind(value)}")
        try:
            value = float(value)
        except OverflowError:  # a JSON integer literal with hundreds of digits
            raise self.fail(path, "is too large for a number") from None
        if not math.isfinite(value):
            raise self.fail(path, f"must be finite, got {value}")
        if positive and value <= 0:
            raise self.fail(path, f"must be > 0, got {value}")
        if non_negative and value < 0:
            raise self.fail(path, f"must be >= 0, got {value}")
        return value

    def list_(self, obj: Mapping[str, Any], key: str, path: str = "") -> list[Any]:
        value = self.get(obj, key, path)
        if not isinstance(value, list):
            raise self.fail(_join(path, key), f"expected a list, got {_kind(value)}")
        return value

    def object_(self, obj: Mapping[str, Any], key: str, path: str = "") -> Mapping[str, Any]:
        value = self.get(obj, key, path)
        if not isinstance(value, Mapping):
            raise self.fail(_join(path, key), f"expected an object, got {_kind(value)}")
        return value

    def format_(self, doc: Any, expected: str) -> None:
        if not isinstance(doc, Mapping):
            raise self.fail("", f"expected a JSON object at the top level, got {_kind(doc)}")
        found = self.str_(doc, "format")
        if found != expected:
            raise self.fail("format", f"unknown format {found!r}, expected {expected!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})" if len(value) < 40 else "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------- I/O


def _load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(str(path), "", "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(str(path), "", f"cannot read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(
            str(path), "", f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except (ValueError, RecursionError) as e:
        # json raises plain ValueError for integer literals past Python's digit limit and
        # RecursionError for absurdly nested arrays: still a bad file, not a crash
        raise FormatError(str(path), "", f"not valid JSON: {e}") from None


def _dump_json(doc: Mapping[str, Any], path: str | Path) -> None:
    try:
        Path(path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    except OSError as e:  # e.g. `helix plan --out` into a missing folder: the user's to fix
        raise FormatError(str(path), "", f"cannot write: {e.strerror or e}") from None


def read_cluster(path: str | Path) -> Cluster:
    return parse_cluster(_load_json(path), where=str(path))


def read_plan(path: str | Path) -> Plan:
    return parse_plan(_load_json(path), where=str(path))


def read_placement(path: str | Path) -> PlacementRecord:
    return parse_placement(_load_json(path), where=str(path))


def write_cluster(cluster: Cluster, path: str | Path) -> None:
    _dump_json(cluster_to_dict(cluster), path)


def write_plan(plan: Plan, path: str | Path) -> None:
    _dump_json(plan_to_dict(plan), path)


def write_placement(record: PlacementRecord, path: str | Path) -> None:
    _dump_json(placement_to_dict(record), path)


# ------------------------------------------------------------------------------------ helix-cluster/1


def parse_cluster(doc: Any, where: str = "<cluster>") -> Cluster:
    r = _Reader(where)
    r.format_(doc, CLUSTER_FORMAT)
    model_doc = r.object_(doc, "model")
    model = ModelShape(
        name=r.str_(model_doc, "name", "model"),
        num_layers=r.int_(model_doc, "num_layers", "model", minimum=1),
        hidden_size=r.int_(model_doc, "hidden_size", "model", minimum=1),
        activation_bytes=r.int_(model_doc, "activation_bytes", "model", minimum=1),
        token_bytes=r.int_(model_doc, "token_bytes", "model", minimum=1),
    )
    nodes = [_parse_node(r, item, f"nodes[{i}]") for i, item in enumerate(r.list_(doc, "nodes"))]
    if not nodes:
        raise r.fail("nodes", "the cluster has no nodes")
    seen: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.id in (SOURCE, SINK):
            raise r.fail(f"nodes[{i}].id", f"{node.id!r} is reserved for the clients' side")
        if node.id in seen:
            raise r.fail(f"nodes[{i}].id", f"duplicate node id {node.id!r} (first at nodes[{seen[node.id]}])")
        seen[node.id] = i

    links = []
    pairs: set[tuple[str, str]] = set()
    for i, item in enumerate(r.list_(doc, "links")):
        path = f"links[{i}]"
        src = _known_node(r, item, "src", path, seen)
        dst = _known_node(r, item, "dst", path, seen)
        if src == dst:
            raise r.fail(path, f"a link from {src!r} to itself")
        if (src, dst) in pairs:
            raise r.fail(path, f"duplicate link {src!r} -> {dst!r}")
        pairs.add((src, dst))
        links.append(
            Link(
                src=NodeId(src),
                dst=NodeId(dst),
                bytes_per_s=r.number(item, "bytes_per_s", path, positive=True),
                latency_s=r.number(item, "latency_s", path, non_negative=True),
            )
        )

    coordinator = []
    covered: set[str] = set()
    for i, item in enumerate(r.list_(doc, "coordinator")):
        path = f"coordinator[{i}]"
        node_id = _known_node(r, item, "node", path, seen)
        if node_id in covered:
            raise r.fail(path, f"duplicate coordinator entry for {node_id!r}")
        covered.add(node_id)
        # 0 bytes/s is allowed here: pruned clusters mark a missing source or sink link that way.
        out_bps = r.number(item, "out_bytes_per_s", path, non_negative=True)
        in_bps = r.number(item, "in_bytes_per_s", path, non_negative=True)
        latency = r.number(item, "latency_s", path, non_negative=True, optional=True)
        coordinator.append(
            CoordinatorLink(
                node=NodeId(node_id),
                out_bytes_per_s=out_bps,
                in_bytes_per_s=in_bps,
                latency_s=0.0 if math.isnan(latency) else latency,
            )
        )

    published = doc.get("published", {})
    if not isinstance(published, Mapping):
        raise r.fail("published", f"expected an object, got {_kind(published)}")
    return Cluster(
        name=r.str_(doc, "name"),
        model=model,
        nodes=tuple(nodes),
        links=tuple(links),
        coordinator=tuple(coordinator),
        source=r.str_(doc, "source", optional=True),
        published=dict(published),
    )


def _known_node(r: _Reader, item: Any, key: str, path: str, known: Mapping[str, int]) -> str:
    node_id = r.str_(item, key, path)
    if node_id not in known:
        raise r.fail(_join(path, key), f"unknown node {node_id!r}")
    return node_id


def _parse_node(r: _Reader, item: Any, path: str) -> NodeSpec:
    max_layers = r.int_(item, "max_layers", path, minimum=1)
    table = r.list_(item, "tokens_per_s", path)
    if len(table) < max_layers:
        raise r.fail(
            f"{path}.max_layers",
            f"max_layers={max_layers} is longer than tokens_per_s ({len(table)} entries); "
            "tokens_per_s[k-1] must give the throughput for every k up to max_layers",
        )
    tokens_per_s = tuple(
        r.check_number(v, f"{path}.tokens_per_s[{k}]", positive=True)
        for k, v in enumerate(table[:max_layers])
    )
    return NodeSpec(
        id=NodeId(r.str_(item, "id", path)),
        gpu=r.str_(item, "gpu", path),
        region=r.str_(item, "region", path, optional=True) or "default",
        max_layers=max_layers,
        tokens_per_s=tokens_per_s,
        nic_in_bytes_per_s=r.number(item, "nic_in_bytes_per_s", path, positive=True),
        nic_out_bytes_per_s=r.number(item, "nic_out_bytes_per_s", path, positive=True),
    )


def cluster_to_dict(cluster: Cluster) -> dict[str, Any]:
    m = cluster.model
    return {
        "format": CLUSTER_FORMAT,
        "name": cluster.name,
        "source": cluster.source,
        "model": {
            "name": m.name,
            "num_layers": m.num_layers,
            "hidden_size": m.hidden_size,
            "activation_bytes": m.activation_bytes,
            "token_bytes": m.token_bytes,
        },
        "nodes": [
            {
                "id": n.id,
                "gpu": n.gpu,
                "region": n.region,
                "max_layers": n.max_layers,
                "tokens_per_s": list(n.tokens_per_s),
                "nic_in_bytes_per_s": n.nic_in_bytes_per_s,
                "nic_out_bytes_per_s": n.nic_out_bytes_per_s,
            }
            for n in cluster.nodes
        ],
        "links": [
            {"src": lk.src, "dst": lk.dst, "bytes_per_s": lk.bytes_per_s, "latency_s": lk.latency_s}
            for lk in cluster.links
        ],
        "coordinator": [
            {
                "node": c.node,
                "out_bytes_per_s": c.out_bytes_per_s,
                "in_bytes_per_s": c.in_bytes_per_s,
                "latency_s": c.latency_s,
            }
            for c in cluster.coordinator
        ],
        "published": dict(cluster.published),
    }


# --------------------------------------------------------------------------------------- helix-plan/1


def _parse_placement_map(
    r: _Reader, doc: Mapping[str, Any], key: str = "placement"
) -> dict[NodeId, tuple[int, int]]:
    raw = r.object_(doc, key)
    placement: dict[NodeId, tuple[int, int]] = {}
    for node_id, rng in raw.items():
        path = f"{key}.{node_id}"
        if node_id in (SOURCE, SINK):
            raise r.fail(path, f"{node_id!r} is reserved for the clients' side")
        if (
            not isinstance(rng, list)
            or len(rng) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in rng)
        ):
            raise r.fail(path, f"expected [start, end] as two integers, got {_kind(rng)}")
        start, end = rng
        if not 0 <= start < end:
            raise r.fail(path, f"expected 0 <= start < end, got [{start}, {end}]")
        placement[NodeId(node_id)] = (start, end)
    return placement


def parse_plan(doc: Any, where: str = "<plan>") -> Plan:
    r = _Reader(where)
    r.format_(doc, PLAN_FORMAT)
    placement = _parse_placement_map(r, doc)
    flows = []
    for i, item in enumerate(r.list_(doc, "flows")):
        path = f"flows[{i}]"
        flows.append(
            EdgeFlow(
                src=r.str_(item, "src", path),
                dst=r.str_(item, "dst", path),
                tokens_per_s=r.number(item, "tokens_per_s", path, non_negative=True),
            )
        )
    bound = r.get(doc, "upper_bound_tokens_per_s", "")
    partial = r.get(doc, "partial_inference", "", optional=True)
    if partial is not None and not isinstance(partial, bool):
        raise r.fail("partial_inference", f"expected a boolean, got {_kind(partial)}")
    return Plan(
        cluster=r.str_(doc, "cluster"),
        method=r.str_(doc, "method"),
        placement=placement,
        flows=tuple(flows),
        objective_tokens_per_s=r.number(doc, "objective_tokens_per_s", non_negative=True),
        upper_bound_tokens_per_s=None if bound is None else r.check_number(bound, "upper_bound_tokens_per_s"),
        solve_seconds=r.number(doc, "solve_seconds", non_negative=True),
        partial_inference=bool(partial),
    )


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "format": PLAN_FORMAT,
        "cluster": plan.cluster,
        "method": plan.method,
        "placement": {node: [start, end] for node, (start, end) in plan.placement.items()},
        "flows": [{"src": f.src, "dst": f.dst, "tokens_per_s": f.tokens_per_s} for f in plan.flows],
        "objective_tokens_per_s": plan.objective_tokens_per_s,
        "upper_bound_tokens_per_s": plan.upper_bound_tokens_per_s,
        "solve_seconds": plan.solve_seconds,
        "partial_inference": plan.partial_inference,
    }


# ---------------------------------------------------------------------------------- helix-placement/1


def parse_placement(doc: Any, where: str = "<placement>") -> PlacementRecord:
    r = _Reader(where)
    r.format_(doc, PLACEMENT_FORMAT)

    def optional_number(key: str) -> float | None:
        value = doc.get(key)
        return None if value is None else r.check_number(value, key, non_negative=True)

    return PlacementRecord(
        cluster=r.str_(doc, "cluster"),
        placement=_parse_placement_map(r, doc),
        max_flow=optional_number("max_flow"),
        reported=optional_number("reported"),
    )


def placement_to_dict(record: PlacementRecord) -> dict[str, Any]:
    return {
        "format": PLACEMENT_FORMAT,
        "cluster": record.cluster,
        "placement": {node: [start, end] for node, (start, end) in record.placement.items()},
        "max_flow": record.max_flow,
        "reported": record.reported,
    }


def check_placement(placement: Placement, cluster: Cluster, where: str = "placement") -> None:
    """Raise FormatError unless every entry names a node of `cluster` and fits its model and limits."""
    r = _Reader(where)
    for node_id, (start, end) in placement.items():
        node = cluster.node_by_id.get(node_id)
        if node is None:
            raise r.fail(
                f"placement.{node_id}", f"unknown node {node_id!r} (not in cluster {cluster.name!r})"
            )
        if not 0 <= start < end <= cluster.model.num_layers:
            raise r.fail(
                f"placement.{node_id}",
                f"[{start}, {end}) is outside the model's {cluster.model.num_layers} layers",
            )
        if end - start > node.max_layers:
            raise r.fail(
                f"placement.{node_id}", f"holds {end - start} layers but max_layers is {node.max_layers}"
            )
