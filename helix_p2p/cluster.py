"""The typed model of a cluster: the model's shape, the nodes, their links and their links to the
clients' side. Pure data; reading and writing files is `formats.py`, capacities are `flow.py`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NewType

NodeId = NewType("NodeId", str)

#: The two ends of every flow graph: the clients' side that sends prompts (source) and receives
#: sampled tokens (sink). They are reserved names: no node may use them.
SOURCE = "source"
SINK = "sink"


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model: how many layers and how big a token is on a link."""

    name: str
    num_layers: int
    hidden_size: int
    #: bytes of one token's hidden state passed between two pipeline stages
    activation_bytes: int
    #: bytes of one token id passed between the clients' side and the first or last stage
    token_bytes: int


@dataclass(frozen=True)
class NodeSpec:
    """One GPU (or one multi-GPU machine treated as one) and what it sustains."""

    id: NodeId
    gpu: str
    region: str
    max_layers: int
    #: tokens_per_s[k - 1]: tokens/s sustained while holding k layers (prompt and decode mixed)
    tokens_per_s: tuple[float, ...]
    nic_in_bytes_per_s: float
    nic_out_bytes_per_s: float

    def compute_tokens_per_s(self, num_layers: int) -> float:
        """Throughput holding `num_layers` layers, before the NIC limit."""
        if not 1 <= num_layers <= self.max_layers:
            raise ValueError(f"node {self.id} cannot hold {num_layers} layers (max_layers={self.max_layers})")
        return self.tokens_per_s[num_layers - 1]

    def capacity_tokens_per_s(self, num_layers: int, activation_bytes: int) -> float:
        """DESIGN.md: min(tokens_per_s[k-1], min(nic_in, nic_out) / activation_bytes)."""
        nic_tokens_per_s = min(self.nic_in_bytes_per_s, self.nic_out_bytes_per_s) / activation_bytes
        return min(self.compute_tokens_per_s(num_layers), nic_tokens_per_s)


@dataclass(frozen=True)
class Link:
    """A directed network link between two nodes."""

    src: NodeId
    dst: NodeId
    bytes_per_s: float
    latency_s: float


@dataclass(frozen=True)
class CoordinatorLink:
    """A node's link to the clients' side. 0 bytes/s in one direction means no link that way."""

    node: NodeId
    out_bytes_per_s: float  # clients -> node (the source edge)
    in_bytes_per_s: float  # node -> clients (the sink edge)
    latency_s: float


@dataclass(frozen=True)
class Cluster:
    """A planner's whole input (`helix-cluster/1`)."""

    name: str
    model: ModelShape
    nodes: tuple[NodeSpec, ...]
    links: tuple[Link, ...]
    coordinator: tuple[CoordinatorLink, ...]
    source: str = ""
    published: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def node_by_id(self) -> dict[NodeId, NodeSpec]:
        return {node.id: node for node in self.nodes}

    @cached_property
    def link_by_pair(self) -> dict[tuple[NodeId, NodeId], Link]:
        return {(link.src, link.dst): link for link in self.links}

    @cached_property
    def coordinator_by_node(self) -> dict[NodeId, CoordinatorLink]:
        return {c.node: c for c in self.coordinator}

    def node_capacity_tokens_per_s(self, node_id: NodeId, num_layers: int) -> float:
        return self.node_by_id[node_id].capacity_tokens_per_s(num_layers, self.model.activation_bytes)

    def link_tokens_per_s(self, src: NodeId, dst: NodeId) -> float:
        """Capacity of the edge src -> dst in tokens/s; 0 where there is no link."""
        link = self.link_by_pair.get((src, dst))
        return 0.0 if link is None else link.bytes_per_s / self.model.activation_bytes

    def source_tokens_per_s(self, node_id: NodeId) -> float:
        c = self.coordinator_by_node.get(node_id)
        return 0.0 if c is None else c.out_bytes_per_s / self.model.token_bytes

    def sink_tokens_per_s(self, node_id: NodeId) -> float:
        c = self.coordinator_by_node.get(node_id)
        return 0.0 if c is None else c.in_bytes_per_s / self.model.token_bytes

    def compute_upper_bound_tokens_per_s(self) -> float:
        """A bound no placement beats: every token passes every layer once, so the flow is at most
        the cluster's total layer-throughput divided by the number of layers. Each node contributes
        its best k * capacity(k) over the k it can hold of this model (k <= num_layers)."""
        total = 0.0
        for node in self.nodes:
            total += max(
                k * node.capacity_tokens_per_s(k, self.model.activation_bytes)
                for k in range(1, min(node.max_layers, self.model.num_layers) + 1)
            )
        return total / self.model.num_layers

    def total_max_layers(self) -> int:
        return sum(min(node.max_layers, self.model.num_layers) for node in self.nodes)


def is_finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0
