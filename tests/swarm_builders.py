"""Small builders for swarm records in tests (node records, plan records) with sensible defaults."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from helix_p2p.plan import EdgeFlow
from helix_p2p.swarm.records import (
    LinkMeasurement,
    ModelInfo,
    NodeRecord,
    NodeState,
    PlanRecord,
    Reachability,
)

MODEL = ModelInfo(id="tiny-llama", num_layers=8, hidden_size=64, dtype_bytes=4)
NOW = 1_000_000.0


def node(peer: str, **overrides: Any) -> NodeRecord:
    record = NodeRecord(
        peer_id=peer,
        name=f"name-{peer}",
        version="0.1.0",
        model=MODEL,
        gpu="cpu",
        memory_bytes=2**30,
        max_layers=4,
        tokens_per_s=(400.0, 200.0, 130.0, 100.0),
        nic_in_bytes_per_s=1e9,
        nic_out_bytes_per_s=1e9,
        links=(),
        state=NodeState.SERVING,
        layers=None,
        loading_layers=None,
        free_kv_tokens=1000,
        load=0.0,
        joined_at=NOW - 100,
        updated_at=NOW - 1,
        refresh_s=5.0,
        reachability=Reachability.DIRECT,
        dht_client_mode=False,
        planner_eligible=True,
        addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{peer}",),
    )
    return replace(record, **overrides)


def link(peer: str, bytes_per_s: float = 1e8, rtt_s: float = 0.01, at: float = NOW - 2) -> LinkMeasurement:
    return LinkMeasurement(
        peer=peer, out_bytes_per_s=bytes_per_s, in_bytes_per_s=bytes_per_s, rtt_s=rtt_s, measured_at=at
    )


def plan(epoch: int, planner: str, placement: dict[str, tuple[int, int]], **overrides: Any) -> PlanRecord:
    members = tuple(sorted(set(placement) | set(overrides.pop("extra_members", ()))))
    chain = sorted(placement, key=lambda p: placement[p])
    flows = []
    if chain:
        flows.append(EdgeFlow("source", chain[0], 10.0))
        flows += [EdgeFlow(a, b, 10.0) for a, b in itertools.pairwise(chain)]
        flows.append(EdgeFlow(chain[-1], "sink", 10.0))
    record = PlanRecord(
        epoch=epoch,
        planner=planner,
        model=MODEL.id,
        num_layers=MODEL.num_layers,
        method="sp",
        members=members,
        placement=dict(placement),
        flows=tuple(flows),
        objective_tokens_per_s=10.0,
        upper_bound_tokens_per_s=None,
        solve_seconds=0.01,
        created_at=NOW - 5,
    )
    return replace(record, **overrides)
