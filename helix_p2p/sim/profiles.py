"""GPU profiles: how long one layer takes for a batch, and the batch and KV limits of a GPU holding k
layers (Helix's measurements, `data/helix/profiles/<model>/<gpu>/`; units in data/helix/README.md).

- `prompt_bs2time.csv`: per-layer milliseconds for a batch with `tokens` prompt tokens;
- `decode_bs2time.csv`: per-layer milliseconds for `tokens` sequences decoding one token each;
- `constants.json`, per k (layers held): vLLM KV blocks of 16 tokens (so the node caches
  16 * blocks tokens of context over all its layers), and the batch limits.

Between profiled points the time is interpolated linearly, as Helix does. Two choices of ours:
a non-empty batch smaller than the first profiled point costs that point's time (reading the
weights costs the same for one sequence as for two; interpolating towards (0, 0) would make a
lone decode step nearly free, which Helix patches by doubling it), and beyond the last point
the last segment's slope is extended."""

from __future__ import annotations

import bisect
import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from helix_p2p.cluster import Cluster, NodeId
from helix_p2p.data import PROFILES_DIR
from helix_p2p.errors import HelixError

#: cluster files name models as `llama-2-70b`; the profile folders as `llama2_70b`
MODEL_PROFILE_DIRS = {"llama-2-70b": "llama2_70b", "llama-1-30b": "llama1_30b"}


class ProfileError(HelixError):
    """No usable GPU profile for a node (missing folder, malformed file)."""


@dataclass(frozen=True)
class BatchLimits:
    """What one batch on a GPU holding k layers may contain, and its KV cache (Helix's vLLM setup)."""

    prompt_max_requests: int
    prompt_max_tokens: int
    decode_max_sequences: int
    decode_max_context_tokens: int
    #: tokens of context the node can cache (each over all k layers it holds)
    kv_tokens: int


@dataclass(frozen=True)
class LatencyCurve:
    """Per-layer seconds as a piecewise-linear function of a batch size (tokens or sequences)."""

    sizes: tuple[float, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.seconds):
            raise ValueError("a latency curve needs as many sizes as times, at least one")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])) or self.sizes[0] <= 0:
            raise ValueError("latency curve sizes must be positive and strictly increasing")
        if any(s < 0 for s in self.seconds):
            raise ValueError("latency curve times must be >= 0")

    @classmethod
    def from_points(cls, points: list[tuple[float, float]], unit_s: float = 1.0) -> LatencyCurve:
        """From (size, time) points; a (0, 0) point is dropped (an empty batch costs nothing anyway)."""
        kept = sorted((size, t * unit_s) for size, t in points if size > 0)
        return cls(tuple(p[0] for p in kept), tuple(p[1] for p in kept))

    def __call__(self, size: float) -> float:
        if size <= 0:
            return 0.0
        xs, ys = self.sizes, self.seconds
        if size <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, size)
        if i == len(xs):
            if len(xs) == 1:
                return ys[0] * size / xs[0]
            i -= 1  # extend the last segment
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (size - x0) / (x1 - x0)


@dataclass(frozen=True)
class GpuProfile:
    model: str
    gpu: str
    prompt_layer_s: LatencyCurve
    decode_layer_s: LatencyCurve
    #: limits[k - 1] for a GPU holding k layers
    limits: tuple[BatchLimits, ...]
    #: seconds to load one layer's weights (from disk speed and layer size); for churn
    load_s_per_layer: float = 0.0

    @property
    def max_layers(self) -> int:
        return len(self.limits)

    def limits_for(self, num_layers: int) -> BatchLimits:
        if not 1 <= num_layers <= len(self.limits):
            raise ProfileError(
                f"profile {self.model}/{self.gpu} has limits for 1..{len(self.limits)} layers, not {num_layers}"
            )
        return self.limits[num_layers - 1]


def profile_dir(model_name: str, gpu: str, root: Path = PROFILES_DIR) -> Path:
    model_dir = MODEL_PROFILE_DIRS.get(model_name, model_name.replace("-", "_"))
    return root / model_dir / gpu.lower()


def _read_curve(path: Path) -> LatencyCurve:
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        points = [(float(row["tokens"]), float(row["ms"])) for row in rows]
        return LatencyCurve.from_points(points, unit_s=1e-3)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ProfileError(f"{path}: cannot read a tokens,ms latency table: {e}") from e


@lru_cache(maxsize=64)
def load_profile(model_name: str, gpu: str, root: Path = PROFILES_DIR) -> GpuProfile:
    """The bundled profile of `gpu` (e.g. "A100", "L4x2") running `model_name` ("llama-2-70b")."""
    folder = profile_dir(model_name, gpu, root)
    if not folder.is_dir():
        raise ProfileError(f"no GPU profile for model {model_name!r} on {gpu!r}: {folder} does not exist")
    path = folder / "constants.json"
    try:
        constants = json.loads(path.read_text())
        blocks = constants["vllm_num_blocks"]
        limits = tuple(
            BatchLimits(
                prompt_max_requests=int(constants["prompt_max_requests"][i]),
                prompt_max_tokens=int(constants["prompt_max_tokens"][i]),
                decode_max_sequences=int(constants["decode_max_tokens"][i]),
                decode_max_context_tokens=int(constants["decode_max_context"][i]),
                kv_tokens=16 * int(blocks[i]),
            )
            for i in range(int(constants["max_num_layers"]))
        )
        disk_bytes_per_s = float(constants.get("machine_profile", {}).get("disk_speed", 0.0))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ProfileError(f"{path}: malformed profile constants: {e}") from e
    return GpuProfile(
        model=model_name,
        gpu=gpu,
        prompt_layer_s=_read_curve(folder / "prompt_bs2time.csv"),
        decode_layer_s=_read_curve(folder / "decode_bs2time.csv"),
        limits=limits,
        load_s_per_layer=_layer_bytes(model_name, root) / disk_bytes_per_s if disk_bytes_per_s > 0 else 0.0,
    )


def _layer_bytes(model_name: str, root: Path) -> float:
    try:
        common = json.loads((root / "common.json").read_text())
        return float(common["models"][model_name]["param_bytes_per_layer"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def profiles_for(cluster: Cluster, root: Path = PROFILES_DIR) -> dict[NodeId, GpuProfile]:
    """Each node's bundled profile, by its GPU name and the cluster's model."""
    return {node.id: load_profile(cluster.model.name, node.gpu, root) for node in cluster.nodes}
