"""Small builders for test clusters, shared by every test file.

Tests reason in tokens/s, so every capacity here is given in tokens/s and converted to the bytes/s a
`helix-cluster/1` file holds with the model's `activation_bytes` (links, NICs) or `token_bytes`
(coordinator). The defaults keep that conversion exact: a link of 300 tokens/s has exactly 300 tokens/s
of capacity in the flow graph, so expected flows can be written as plain numbers.

    a, b = node("a", A100), node("b", L4)
    cluster = make_cluster([a, b], num_layers=4, links="chain")
    max_flow(cluster, {a.id: (0, 2), b.id: (2, 4)}).value_tokens_per_s  # == 300.0 (L4 holding 2 layers)
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from helix_p2p.cluster import Cluster, CoordinatorLink, Link, ModelShape, NodeId, NodeSpec
from helix_p2p.data import CLUSTERS_DIR, bundled_cluster_names
from helix_p2p.flow import check_flows, max_flow
from helix_p2p.formats import check_placement, read_cluster
from helix_p2p.plan import Placement, Plan

#: so fast that it never binds in a hand-checked case (far above every node's tokens/s below)
UNLIMITED_TOKENS_PER_S = 1e6

#: model defaults: round byte sizes so that tokens/s * bytes / bytes comes back exactly
ACTIVATION_BYTES = 1000
TOKEN_BYTES = 2


@dataclass(frozen=True)
class Hardware:
    """A GPU type as the planner sees it: `tokens_per_s[k - 1]` is what it sustains holding k layers
    (so `max_layers == len(tokens_per_s)`), and a NIC speed in tokens/s of activations."""

    gpu: str
    tokens_per_s: tuple[float, ...]
    nic_tokens_per_s: float = UNLIMITED_TOKENS_PER_S * 100

    @property
    def max_layers(self) -> int:
        return len(self.tokens_per_s)

    def capacity(self, num_layers: int) -> float:
        """tokens/s holding `num_layers` layers (NIC ignored: it never binds by default)."""
        return self.tokens_per_s[num_layers - 1]


def per_layer_hardware(gpu: str, one_layer_tokens_per_s: float, max_layers: int) -> Hardware:
    """Hardware whose throughput is inversely proportional to the layers it holds:
    `tokens_per_s[k - 1] = one_layer_tokens_per_s / k`, so its layer-throughput `k * tokens_per_s[k-1]`
    is the same for every k (the simplest table to reason about by hand)."""
    return Hardware(gpu, tuple(one_layer_tokens_per_s / k for k in range(1, max_layers + 1)))


# Named hardware with round, exactly representable numbers, ordered as in real life (A100 > L4 > T4).
#: A100: 1200, 600, 400, 300, 240, 200 tokens/s holding 1..6 layers
A100 = per_layer_hardware("A100", 1200.0, 6)
#: L4: 600, 300, 200, 150 tokens/s holding 1..4 layers
L4 = per_layer_hardware("L4", 600.0, 4)
#: T4: 240, 120 tokens/s holding 1..2 layers
T4 = per_layer_hardware("T4", 240.0, 2)
#: a GPU whose KV cache runs out as it holds more layers, so throughput falls faster than 1/k and
#: holding fewer layers is worth more than the layers it gives up (as in Helix's real tables)
KV_BOUND = Hardware("V100", (1000.0, 400.0, 200.0))


def node(
    node_id: str,
    hardware: Hardware,
    *,
    region: str = "r1",
    max_layers: int | None = None,
    nic_tokens_per_s: float | None = None,
    nic_in_tokens_per_s: float | None = None,
    nic_out_tokens_per_s: float | None = None,
    activation_bytes: int = ACTIVATION_BYTES,
) -> NodeSpec:
    """One node of `hardware`. `max_layers` may only shorten the hardware's table. NIC speeds are in
    tokens/s of activations (converted with `activation_bytes`, which must match the cluster's)."""
    layers = hardware.max_layers if max_layers is None else max_layers
    if not 1 <= layers <= hardware.max_layers:
        raise ValueError(f"{hardware.gpu} has a table for 1..{hardware.max_layers} layers, not {layers}")
    nic = hardware.nic_tokens_per_s if nic_tokens_per_s is None else nic_tokens_per_s
    nic_in = nic if nic_in_tokens_per_s is None else nic_in_tokens_per_s
    nic_out = nic if nic_out_tokens_per_s is None else nic_out_tokens_per_s
    return NodeSpec(
        id=NodeId(node_id),
        gpu=hardware.gpu,
        region=region,
        max_layers=layers,
        tokens_per_s=hardware.tokens_per_s[:layers],
        nic_in_bytes_per_s=nic_in * activation_bytes,
        nic_out_bytes_per_s=nic_out * activation_bytes,
    )


def nodes_of(
    hardware: Hardware, count: int, *, prefix: str | None = None, first: int = 0, **node_options: Any
) -> list[NodeSpec]:
    """`count` nodes of one hardware, ids `<prefix>-<i>` (prefix defaults to the GPU name, lowercase):
    `nodes_of(A100, 2) + nodes_of(T4, 3)`. Extra options go to `node()`."""
    name = prefix or hardware.gpu.lower()
    return [node(f"{name}-{i}", hardware, **node_options) for i in range(first, first + count)]


#: how `make_cluster` links nodes:
#: - "complete": every ordered pair of distinct nodes
#: - "chain": each node to the next one in the listed order (forward only)
#: - "none": no links at all
#: - explicit pairs `(src, dst)` at the default speed, or triples `(src, dst, tokens_per_s)`
LinkSpec = Literal["complete", "chain", "none"] | Iterable[tuple[str, str] | tuple[str, str, float]]

#: the default speed of a link between two nodes: a number, or a function of the two nodes that
#: returns tokens/s (0 or None: no link), e.g. `region_links(intra=1e4, inter=50)`
LinkSpeed = float | Callable[[NodeSpec, NodeSpec], float | None]

#: which nodes reach the clients' side: "all", a list of node ids (both directions at the default
#: speed), or {node_id: (out_tokens_per_s, in_tokens_per_s)} where out is source -> node and in is
#: node -> sink, 0 meaning no link that way
CoordinatorSpec = Literal["all"] | Iterable[str] | Mapping[str, tuple[float, float]]


def region_links(intra_tokens_per_s: float, inter_tokens_per_s: float | None) -> LinkSpeed:
    """Link speed by region: fast inside a region, slow (or, with None, absent) between regions."""

    def speed(src: NodeSpec, dst: NodeSpec) -> float | None:
        return intra_tokens_per_s if src.region == dst.region else inter_tokens_per_s

    return speed


def make_cluster(
    nodes: Sequence[NodeSpec],
    *,
    num_layers: int = 4,
    links: LinkSpec = "complete",
    link_tokens_per_s: LinkSpeed = UNLIMITED_TOKENS_PER_S,
    coordinator: CoordinatorSpec = "all",
    coordinator_tokens_per_s: float = UNLIMITED_TOKENS_PER_S,
    activation_bytes: int = ACTIVATION_BYTES,
    token_bytes: int = TOKEN_BYTES,
    name: str = "test-cluster",
    model_name: str = "test-model",
    latency_s: float = 0.001,
    published: Mapping[str, Any] | None = None,
) -> Cluster:
    """A cluster of `nodes` serving a model of `num_layers` layers; see LinkSpec, LinkSpeed and
    CoordinatorSpec. Nodes must have been built with the same `activation_bytes`."""
    by_id = {n.id: n for n in nodes}
    if len(by_id) != len(nodes):
        raise ValueError("duplicate node ids")

    def speed(src: NodeSpec, dst: NodeSpec) -> float | None:
        return link_tokens_per_s(src, dst) if callable(link_tokens_per_s) else link_tokens_per_s

    pairs: list[tuple[NodeSpec, NodeSpec, float | None]]
    if links == "complete":
        pairs = [(s, d, speed(s, d)) for s in nodes for d in nodes if s.id != d.id]
    elif links == "chain":
        pairs = [(s, d, speed(s, d)) for s, d in itertools.pairwise(nodes)]
    elif links == "none":
        pairs = []
    elif isinstance(links, str):
        raise ValueError(f"unknown link pattern {links!r}")
    else:
        pairs = []
        for spec in links:
            src, dst = by_id[NodeId(spec[0])], by_id[NodeId(spec[1])]
            pairs.append((src, dst, spec[2] if len(spec) == 3 else speed(src, dst)))  # type: ignore[misc]
    built_links = tuple(
        Link(src.id, dst.id, tokens_per_s * activation_bytes, latency_s)
        for src, dst, tokens_per_s in pairs
        if tokens_per_s
    )

    if coordinator == "all":
        ends = {n.id: (coordinator_tokens_per_s, coordinator_tokens_per_s) for n in nodes}
    elif isinstance(coordinator, Mapping):
        ends = {NodeId(k): v for k, v in coordinator.items()}
    else:
        ends = {NodeId(k): (coordinator_tokens_per_s, coordinator_tokens_per_s) for k in coordinator}
    built_coordinator = tuple(
        CoordinatorLink(by_id[node_id].id, out_tps * token_bytes, in_tps * token_bytes, latency_s)
        for node_id, (out_tps, in_tps) in ends.items()
    )

    return Cluster(
        name=name,
        model=ModelShape(
            name=model_name,
            num_layers=num_layers,
            hidden_size=activation_bytes // 2,
            activation_bytes=activation_bytes,
            token_bytes=token_bytes,
        ),
        nodes=tuple(nodes),
        links=built_links,
        coordinator=built_coordinator,
        source="tests/builders.py",
        published=dict(published or {}),
    )


def with_nodes(cluster: Cluster, nodes: Sequence[NodeSpec]) -> Cluster:
    """The same cluster with its node list replaced (links and coordinator kept as they are), e.g. to
    give one node a smaller `max_layers` with `dataclasses.replace`."""
    return replace(cluster, nodes=tuple(nodes))


# ------------------------------------------------------------------------------- bundled and on disk

#: the bundled Helix clusters (`helix_p2p/data/helix/clusters/*.json`), by name
BUNDLED_CLUSTERS: list[str] = bundled_cluster_names()


def bundled_cluster(name: str) -> Cluster:
    return read_cluster(CLUSTERS_DIR / f"{name}.json")


def bundled_hardware(cluster_name: str, gpu: str) -> Hardware:
    """The table a bundled Helix cluster gives one GPU type (real, non-monotone numbers)."""
    cluster = bundled_cluster(cluster_name)
    spec = next(n for n in cluster.nodes if n.gpu == gpu)
    nic_tokens_per_s = min(spec.nic_in_bytes_per_s, spec.nic_out_bytes_per_s) / ACTIVATION_BYTES
    return Hardware(gpu, spec.tokens_per_s, nic_tokens_per_s)


def write_json(path: Path, doc: Any) -> Path:
    """Write any JSON document (NaN and Infinity allowed, as Python's json writes them)."""
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- reference answers


def node_choices(spec: NodeSpec, num_layers: int) -> list[tuple[int, int] | None]:
    """Every range a node may hold, and None (holds nothing)."""
    choices: list[tuple[int, int] | None] = [None]
    for k in range(1, min(spec.max_layers, num_layers) + 1):
        choices += [(start, start + k) for start in range(num_layers - k + 1)]
    return choices


def all_placements(cluster: Cluster) -> Iterator[dict[NodeId, tuple[int, int]]]:
    """Every placement of `cluster` (exponential: for a few nodes and a few layers only)."""
    per_node = [node_choices(spec, cluster.model.num_layers) for spec in cluster.nodes]
    for combo in itertools.product(*per_node):
        yield {spec.id: rng for spec, rng in zip(cluster.nodes, combo) if rng is not None}


def brute_force_best(cluster: Cluster, partial_inference: bool = False) -> tuple[float, Placement]:
    """The best placement's max flow by trying them all; the reference a planner is checked against."""
    best_value, best_placement = -math.inf, {}
    for placement in all_placements(cluster):
        value = max_flow(cluster, placement, partial_inference).value_tokens_per_s
        if value > best_value:
            best_value, best_placement = value, placement
    return best_value, best_placement


def assert_plan_consistent(cluster: Cluster, plan: Plan, rel_tol: float = 1e-9) -> None:
    """A plan's placement fits the cluster, its flows are feasible for that placement (capacities and
    conservation) and carry exactly its objective, and its bound (if any) is not below it."""
    check_placement(plan.placement, cluster)
    value = check_flows(cluster, plan.placement, plan.flows, plan.partial_inference)
    assert math.isclose(value, plan.objective_tokens_per_s, rel_tol=rel_tol, abs_tol=1e-9), (
        value,
        plan.objective_tokens_per_s,
    )
    into_sink = sum(f.tokens_per_s for f in plan.flows if f.dst == "sink")
    assert math.isclose(into_sink, value, rel_tol=rel_tol, abs_tol=1e-9), (into_sink, value)
    if plan.upper_bound_tokens_per_s is not None:
        assert plan.upper_bound_tokens_per_s >= plan.objective_tokens_per_s * (1 - rel_tol)
