"""The GPUs `helix demo` pretends to have: an A100, an L4 and two T4s, with `tokens_per_s` tables
taken from the Helix paper's own cluster (`data/helix/clusters/single24-llama30b.json`, capacity
tables computed from its measured A100/L4/T4 profiles of LLaMA-1-30B) and scaled to a tiny model.

Scaling. The paper's tables say what each GPU sustains while holding k layers of a 60-layer model
(an A100 holds up to 18, an L4 11, a T4 7). A tiny model has a handful of layers, so each tiny layer
stands for `s` real layers, and a node holding k tiny layers gets the paper's figure for k*s real
layers: every ratio between GPUs, and the shape of each curve (fewer layers, more tokens/s), is the
paper's. `s` is chosen so that the four GPUs together hold the tiny model about 1.5 times over, as
the paper's 30B cluster does (its 24 nodes hold ~5x, our four would hold ~0.7x unscaled): then
there is a real placement question, the A100 can take a long range, and the T4s share the rest.
The absolute figures stay the paper's (tokens/s of a 30B model on real GPUs); the processes of the
demo run on this machine's CPU at its own speed. Pure: data in, data out."""

from __future__ import annotations

import math
from dataclasses import dataclass

from helix_p2p.data import CLUSTERS_DIR
from helix_p2p.errors import HelixError
from helix_p2p.formats import read_cluster

SOURCE_CLUSTER = CLUSTERS_DIR / "single24-llama30b.json"
#: (public name, GPU type in the source cluster)
DEMO_NODES = (("a100", "A100"), ("l4", "L4"), ("t4-a", "T4"), ("t4-b", "T4"))
#: how many times over the demo's GPUs together can hold the model
COVER_FACTOR = 1.5


@dataclass(frozen=True)
class DemoGpu:
    name: str
    gpu: str
    #: entry k-1: tokens/s while holding k layers of the tiny model
    tokens_per_s: tuple[float, ...]

    def throughput_file(self) -> dict[str, object]:
        """The `--throughput FILE` document of `helix-node join`."""
        return {"gpu": f"{self.gpu} (demo)", "tokens_per_s": list(self.tokens_per_s)}


def real_layers_per_layer(max_layers: list[int], num_layers: int, cover: float = COVER_FACTOR) -> int:
    """How many real layers one tiny layer stands for (at least 1)."""
    return max(1, math.floor(sum(max_layers) / (cover * num_layers)))


def scale_table(real: tuple[float, ...], per_layer: int) -> tuple[float, ...]:
    """Entry k-1: the real table's figure for k * per_layer layers, while that fits."""
    return tuple(real[k * per_layer - 1] for k in range(1, len(real) // per_layer + 1))


def demo_gpus(num_layers: int) -> list[DemoGpu]:
    """The demo's four GPUs, with tables for a model of `num_layers` layers."""
    if num_layers < 1:
        raise HelixError(f"the demo model needs at least one layer, got {num_layers}")
    cluster = read_cluster(SOURCE_CLUSTER)
    by_gpu = {}
    for node in cluster.nodes:
        by_gpu.setdefault(node.gpu, node)
    missing = sorted({gpu for _, gpu in DEMO_NODES} - set(by_gpu))
    if missing:
        raise HelixError(f"{SOURCE_CLUSTER}: no node of GPU type {', '.join(missing)}")
    per_layer = real_layers_per_layer([by_gpu[gpu].max_layers for _, gpu in DEMO_NODES], num_layers)
    gpus = []
    for name, gpu in DEMO_NODES:
        table = scale_table(tuple(by_gpu[gpu].tokens_per_s[: by_gpu[gpu].max_layers]), per_layer)
        gpus.append(DemoGpu(name, gpu, table[:num_layers]))
    return gpus
