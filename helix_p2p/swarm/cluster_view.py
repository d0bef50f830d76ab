"""From the live registry to the planner's input, a `helix_p2p.cluster.Cluster`.

Node ids are peer ids. Links come from what nodes measured: the directed link a -> b takes the most
recent of a's outbound and b's inbound measurement of that pair. Probing is bounded (a node
measures a few peers, not all n), so most pairs are unmeasured; those get an estimate from the two
ends' NIC figures, cut by RELAYED_LINK_FACTOR when either end is reachable only through a relay
(its traffic crosses the relay twice). Measured links already carry a relay's real cost, because
the probes ran over the same libp2p path that activations will take."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping

from helix_p2p.cluster import Cluster, CoordinatorLink, Link, ModelShape, NodeId, NodeSpec
from helix_p2p.swarm.records import ModelInfo, NodeRecord, NodeState, Reachability

#: bytes of one token id between the clients' side and the first or last stage (int32 ids)
TOKEN_BYTES = 4
#: share of the NIC estimate left to an unmeasured pair when one end is reachable only via a relay
RELAYED_LINK_FACTOR = 0.25
#: one-way latency assumed for an unmeasured pair (a typical wide-area hop)
UNMEASURED_LATENCY_S = 0.05


def planning_members(
    records: Mapping[str, NodeRecord], now: float, model_id: str, banned: Collection[str] = ()
) -> dict[str, NodeRecord]:
    """The nodes a planner plans over: live, serving `model_id`, sharing its shape, and not
    banned for lying (`helix_p2p.swarm.reports.banned_peers`)."""
    pool = {
        peer: r
        for peer, r in records.items()
        if r.is_live(now) and r.model.id == model_id and r.state != NodeState.LEAVING and peer not in banned
    }
    if not pool:
        return {}
    shape = model_info_of(pool.values())
    return {peer: r for peer, r in pool.items() if r.model == shape}


def model_info_of(records) -> ModelInfo:
    """The model shape most nodes report (a node with another shape for the same id is misconfigured)."""
    counts = Counter(r.model for r in records)
    return max(counts, key=lambda m: (counts[m], m.num_layers, m.hidden_size, m.dtype_bytes))


def registry_to_cluster(members: Mapping[str, NodeRecord], name: str = "swarm") -> Cluster:
    """Build the planner's Cluster from `planning_members(...)`."""
    if not members:
        raise ValueError("no members to plan over")
    info = model_info_of(members.values())
    model = ModelShape(
        name=info.id,
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        activation_bytes=info.hidden_size * info.dtype_bytes,
        token_bytes=TOKEN_BYTES,
    )
    peers = sorted(members)
    nodes = []
    for peer in peers:
        r = members[peer]
        max_layers = min(r.max_layers, len(r.tokens_per_s), info.num_layers)
        nodes.append(
            NodeSpec(
                id=NodeId(peer),
                gpu=r.gpu,
                region=r.reachability.value,
                max_layers=max_layers,
                tokens_per_s=tuple(r.tokens_per_s[:max_layers]),
                nic_in_bytes_per_s=r.nic_in_bytes_per_s,
                nic_out_bytes_per_s=r.nic_out_bytes_per_s,
            )
        )
    links = [link_between(members[a], members[b]) for a in peers for b in peers if a != b]
    coordinator = [
        CoordinatorLink(
            node=NodeId(peer),
            out_bytes_per_s=members[peer].nic_in_bytes_per_s,
            in_bytes_per_s=members[peer].nic_out_bytes_per_s,
            latency_s=0.0,
        )
        for peer in peers
    ]
    return Cluster(
        name=name,
        model=model,
        nodes=tuple(nodes),
        links=tuple(links),
        coordinator=tuple(coordinator),
        source="live swarm registry",
    )


def link_between(a: NodeRecord, b: NodeRecord) -> Link:
    """The directed link a -> b: the freshest measurement of it, else an estimate."""
    measured: list[tuple[float, float, float]] = []  # (measured_at, bytes_per_s, rtt_s)
    for link in a.links:
        if link.peer == b.peer_id and link.out_bytes_per_s > 0:
            measured.append((link.measured_at, link.out_bytes_per_s, link.rtt_s))
    for link in b.links:
        if link.peer == a.peer_id and link.in_bytes_per_s > 0:
            measured.append((link.measured_at, link.in_bytes_per_s, link.rtt_s))
    if measured:
        _, bytes_per_s, rtt_s = max(measured)
        return Link(NodeId(a.peer_id), NodeId(b.peer_id), bytes_per_s=bytes_per_s, latency_s=rtt_s / 2)
    estimate = min(a.nic_out_bytes_per_s, b.nic_in_bytes_per_s)
    if Reachability.RELAY in (a.reachability, b.reachability):
        estimate *= RELAYED_LINK_FACTOR
    return Link(NodeId(a.peer_id), NodeId(b.peer_id), bytes_per_s=estimate, latency_s=UNMEASURED_LATENCY_S)
