"""Seeded synthetic clusters for planner and simulator benchmarks at scales no one owns: several
GPU types (the Helix paper's LLaMA-2-70B tables for A100, L4 and T4), spread over regions that are
fast inside and slow between."""

from __future__ import annotations

import random
from dataclasses import dataclass

from helix_p2p.cluster import Cluster, CoordinatorLink, Link, ModelShape, NodeId, NodeSpec

# tokens_per_s[k-1] for LLaMA-2-70B, from the bundled single24-llama70b cluster (Helix's capacity
# model); max_layers is Helix's own per-type limit.
LLAMA2_70B = ModelShape("llama-2-70b", num_layers=80, hidden_size=8192, activation_bytes=16384, token_bytes=2)
GPU_TABLES_70B: dict[str, tuple[float, ...]] = {
    "A100": (23833.9, 11384.3, 7201.4, 5264.6, 4096.7, 3124.1, 2595.7, 2045.6, 1754.4, 1392.6, 1212.2, 952.1),
    "L4": (7557.9, 3625.7, 2171.9, 1476.1, 1017.6, 747.8, 531.7),
    "T4": (5709.2, 2434.4, 1347.9, 757.9),
}
NIC_BYTES_PER_S = 1e10


@dataclass(frozen=True)
class SyntheticSpec:
    num_nodes: int
    num_regions: int
    seed: int = 0
    #: share of each GPU type, in GPU_TABLES_70B's order
    mix: tuple[float, float, float] = (0.15, 0.35, 0.5)
    intra_region_bytes_per_s: float = 1.25e9  # 10 Gbit/s
    #: 1 Gbit/s between regions, a tenth of the inside: too slow to carry an A100 stage alone
    inter_region_bytes_per_s: float = 1.25e8
    intra_region_latency_s: float = 0.001
    inter_region_latency_s: float = 0.03


def synthetic_cluster(spec: SyntheticSpec) -> Cluster:
    rng = random.Random(spec.seed)
    gpus = list(GPU_TABLES_70B)
    nodes = []
    for i in range(spec.num_nodes):
        gpu = rng.choices(gpus, weights=spec.mix)[0]
        table = GPU_TABLES_70B[gpu]
        nodes.append(
            NodeSpec(
                id=NodeId(f"{gpu.lower()}-{i}"),
                gpu=gpu,
                region=f"r{rng.randrange(spec.num_regions)}",
                max_layers=len(table),
                tokens_per_s=table,
                nic_in_bytes_per_s=NIC_BYTES_PER_S,
                nic_out_bytes_per_s=NIC_BYTES_PER_S,
            )
        )
    links = []
    for a in nodes:
        for b in nodes:
            if a.id == b.id:
                continue
            same = a.region == b.region
            links.append(
                Link(
                    a.id,
                    b.id,
                    spec.intra_region_bytes_per_s if same else spec.inter_region_bytes_per_s,
                    spec.intra_region_latency_s if same else spec.inter_region_latency_s,
                )
            )
    # Clients sit in every region (a gateway per region), so each node reaches them quickly.
    coordinator = [
        CoordinatorLink(
            n.id, spec.intra_region_bytes_per_s, spec.intra_region_bytes_per_s, spec.intra_region_latency_s
        )
        for n in nodes
    ]
    return Cluster(
        name=f"synthetic-{spec.num_nodes}n-{spec.num_regions}r-s{spec.seed}",
        model=LLAMA2_70B,
        nodes=tuple(nodes),
        links=tuple(links),
        coordinator=tuple(coordinator),
        source=f"helix_p2p.synthetic.synthetic_cluster({spec})",
        published={},
    )
