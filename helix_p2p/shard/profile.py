"""Measuring what this machine sustains: the `tokens_per_s` table a node announces.

`tokens_per_s[k-1]` is the throughput (prompt and decode tokens together) of the node holding k
layers under the Helix workload mix (DESIGN.md, "The flow model"; the data README, "How
tokens_per_s is obtained"). Like Helix, we measure per-layer times and derive the table from a
"typical batch" model; unlike Helix we measure them here, with the shard runner itself.

Measured (on a shard of `m = min(2, L-1)` real layers of the model, divided by m):
- `P`: seconds per layer to prefill one prompt of `prompt_tokens` (750) tokens, chunked as the
  runner chunks it;
- `D(b)`: seconds per layer of one decode step of b sessions whose contexts hold
  `prompt_tokens + decode_tokens / 2` positions (the mean context of a session mid-generation),
  for b = 1, 2, 4, ... up to the largest typical batch; linear in between.

The typical batch (our simplification of Helix's, which also weighs the whole cluster's
composition): with k layers held, the memory not taken by weights holds the KV cache; the typical
batch keeps `kv_high_water` (Helix: 0.3) of it in use, i.e. `c(k)` sessions of `prompt_tokens +
decode_tokens` positions each (clamped to 1 .. `max_batch_sessions`). In steady state each session
decodes `decode_tokens` times and is replaced by a new prompt, so one cycle is c prompts plus
`decode_tokens` decode steps of c sessions:

    T(k) = c(prompt_tokens + decode_tokens) / (k (c P + decode_tokens D(c)))

`max_layers` is the most layers whose weights, with the embedding and head (a node may be placed
first or last), fit in `(1 - kv_fraction)` of the memory (Helix: weights <= half the memory).

Profiles are cached as JSON, keyed by the model's config, dtype, device, memory budget, options
and software versions, so a node re-measures only when one of them changes."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import transformers

from helix_p2p.cluster import NodeId, NodeSpec
from helix_p2p.shard.api import ShardSpec, StepRequest
from helix_p2p.shard.build import load_shard, resolve_device
from helix_p2p.shard.errors import ShardError
from helix_p2p.shard.loading import open_checkpoint
from helix_p2p.shard.memory import (
    bytes_per_layer,
    embedding_bytes,
    head_bytes,
    kv_bytes_per_token_per_layer,
    max_layers_for_budget,
    parse_dtype,
)
from helix_p2p.shard.runner import Shard

logger = logging.getLogger(__name__)

PROFILE_FORMAT = "helix-profile/1"
#: NIC figures are not measured by the profile (the node measures links when it joins)
DEFAULT_NIC_BYTES_PER_S = 1.25e9  # 10 Gbit/s Ethernet


class ProfileError(ShardError):
    """The device cannot be profiled for this model (e.g. not even one layer fits the budget)."""


@dataclass(frozen=True)
class WorkloadMix:
    """Helix's capacity-model workload: the average request and the KV high-water mark."""

    prompt_tokens: int = 750
    decode_tokens: int = 240
    kv_high_water: float = 0.3

    @property
    def tokens_per_session(self) -> int:
        return self.prompt_tokens + self.decode_tokens


@dataclass(frozen=True)
class ProfileOptions:
    #: None: bfloat16 on CUDA, float32 on CPU
    dtype: str | None = None
    #: None: the device's total memory (CUDA) or the machine's RAM (CPU)
    max_memory_bytes: float | None = None
    #: share of the memory kept for the KV cache when choosing max_layers
    kv_fraction: float = 0.5
    #: None: 256 on CUDA, 64 on CPU (a scheduler's max concurrent sessions, as vLLM's max_num_seqs)
    max_batch_sessions: int | None = None
    #: timed runs per measurement (the median is kept), after one warm-up run
    repeats: int = 3
    mix: WorkloadMix = field(default_factory=WorkloadMix)


@dataclass(frozen=True)
class DeviceProfile:
    """A measured `tokens_per_s` table and the measurements it was derived from."""

    model: str
    device: str
    device_name: str
    dtype: str
    memory_bytes: float
    max_layers: int
    tokens_per_s: tuple[float, ...]
    #: typical concurrent sessions c(k) for k = 1 .. max_layers
    sessions: tuple[int, ...]
    prompt_s_per_layer: float
    #: decode batch size -> seconds per step per layer
    decode_s_per_layer: dict[int, float]
    options: dict[str, Any]
    software: dict[str, str]
    key: str
    measured_at: str
    measure_s: float

    def node_spec(
        self,
        node_id: str,
        region: str = "default",
        nic_in_bytes_per_s: float = DEFAULT_NIC_BYTES_PER_S,
        nic_out_bytes_per_s: float = DEFAULT_NIC_BYTES_PER_S,
    ) -> NodeSpec:
        return NodeSpec(
            id=NodeId(node_id),
            gpu=self.device_name,
            region=region,
            max_layers=self.max_layers,
            tokens_per_s=self.tokens_per_s,
            nic_in_bytes_per_s=nic_in_bytes_per_s,
            nic_out_bytes_per_s=nic_out_bytes_per_s,
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["format"] = PROFILE_FORMAT
        doc["tokens_per_s"] = list(self.tokens_per_s)
        doc["sessions"] = list(self.sessions)
        doc["decode_s_per_layer"] = {str(b): s for b, s in self.decode_s_per_layer.items()}
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DeviceProfile:
        if doc.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"not a {PROFILE_FORMAT} document")
        fields = dict(doc)
        del fields["format"]
        fields["tokens_per_s"] = tuple(fields["tokens_per_s"])
        fields["sessions"] = tuple(fields["sessions"])
        fields["decode_s_per_layer"] = {int(b): s for b, s in fields["decode_s_per_layer"].items()}
        return cls(**fields)


def node_form(profile: DeviceProfile, node: NodeSpec) -> dict[str, Any]:
    """The node as it appears in `helix-cluster/1` "nodes"."""
    return {
        "id": node.id,
        "gpu": node.gpu,
        "region": node.region,
        "max_layers": node.max_layers,
        "tokens_per_s": list(node.tokens_per_s),
        "nic_in_bytes_per_s": node.nic_in_bytes_per_s,
        "nic_out_bytes_per_s": node.nic_out_bytes_per_s,
    }


# --- the device ----------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def device_name(device: torch.device) -> str:
    """What the node calls its hardware ("gpu" in the cluster file)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # no /proc (not Linux): the platform's name above is the best we have
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def device_memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def software_versions() -> dict[str, str]:
    try:
        helix = version("helix-p2p")
    except PackageNotFoundError:
        helix = "unknown"
    return {"helix_p2p": helix, "torch": torch.__version__, "transformers": transformers.__version__}


# --- the capacity model --------------------------------------------------------------------------


def typical_sessions(
    config: Any, dtype: torch.dtype, memory_bytes: float, num_layers: int, mix: WorkloadMix, max_sessions: int
) -> int:
    """c(k): sessions in the typical batch of a node holding `num_layers` layers."""
    weights = (
        num_layers * bytes_per_layer(config, dtype)
        + embedding_bytes(config, dtype)
        + head_bytes(config, dtype)
    )
    kv_tokens_per_layer = max(0.0, memory_bytes - weights) / (
        num_layers * kv_bytes_per_token_per_layer(config, dtype)
    )
    return int(min(max_sessions, max(1, mix.kv_high_water * kv_tokens_per_layer // mix.tokens_per_session)))


def interpolate(points: dict[int, float], x: int) -> float:
    """Linear interpolation in (batch, seconds) points; flat below the first, proportional beyond
    the last (not needed in practice: the largest typical batch is always measured)."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    for lo, hi in itertools.pairwise(xs):
        if x <= hi:
            return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)
    return points[xs[-1]] * x / xs[-1]


def throughput_tokens_per_s(
    num_layers: int, sessions: int, prompt_s: float, decode_s: dict[int, float], mix: WorkloadMix
) -> float:
    """T(k) for one typical-batch cycle (module docstring)."""
    cycle_s = num_layers * (sessions * prompt_s + mix.decode_tokens * interpolate(decode_s, sessions))
    return sessions * mix.tokens_per_session / cycle_s


def decode_batch_sizes(largest: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 < largest:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != largest:
        sizes.append(largest)
    return sizes


# --- measuring -----------------------------------------------------------------------------------


def profile_device(
    model_path: str,
    device: str | None = None,
    options: ProfileOptions = ProfileOptions(),
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> DeviceProfile:
    """Measure this device for the model at `model_path` (always measures; see `cached_profile`)."""
    started = time.perf_counter()
    plan = _plan(model_path, device, options)
    dev, dtype, config = plan["device"], plan["dtype"], plan["config"]
    mix = options.mix
    measured_layers = 1 if config.num_hidden_layers == 1 else min(2, config.num_hidden_layers - 1)
    sessions = plan["sessions"]
    batches = decode_batch_sizes(max(sessions))
    context = mix.prompt_tokens + mix.decode_tokens // 2
    total = 1 + len(batches)
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(what, done, total)

    shard = load_shard(ShardSpec(model_path, 0, measured_layers, dtype=_dtype_name(dtype), device=str(dev)))
    prompt_s = _time_prompt(shard, mix.prompt_tokens, options.repeats) / measured_layers
    tick("prompt")
    decode_s = {}
    _open_decode_sessions(shard, max(batches), context)
    for b in batches:
        decode_s[b] = _time_decode(shard, b, context, options.repeats) / measured_layers
        tick(f"decode x{b}")
    table = tuple(
        throughput_tokens_per_s(k, sessions[k - 1], prompt_s, decode_s, mix)
        for k in range(1, plan["max_layers"] + 1)
    )
    return DeviceProfile(
        model=str(model_path),
        device=str(dev),
        device_name=plan["device_name"],
        dtype=_dtype_name(dtype),
        memory_bytes=plan["memory_bytes"],
        max_layers=plan["max_layers"],
        tokens_per_s=table,
        sessions=tuple(sessions),
        prompt_s_per_layer=prompt_s,
        decode_s_per_layer=decode_s,
        options=_options_doc(options),
        software=software_versions(),
        key=plan["key"],
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        measure_s=time.perf_counter() - started,
    )


def _plan(model_path: str, device: str | None, options: ProfileOptions) -> dict[str, Any]:
    """Everything decided before measuring: device, dtype, memory, max_layers, c(k), cache key."""
    dev = resolve_device(device or default_device())
    dtype = parse_dtype(options.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    config = open_checkpoint(model_path).config
    memory = float(options.max_memory_bytes or device_memory_bytes(dev))
    if not 0 <= options.kv_fraction < 1:
        raise ProfileError(f"kv_fraction must be in [0, 1), got {options.kv_fraction}")
    if options.repeats < 1:
        raise ProfileError(f"repeats must be >= 1, got {options.repeats}")
    if options.max_batch_sessions is not None and options.max_batch_sessions < 1:
        raise ProfileError(f"max_batch_sessions must be >= 1, got {options.max_batch_sessions}")
    max_layers = max_layers_for_budget(
        config, dtype, (1 - options.kv_fraction) * memory, include_embedding=True, include_head=True
    )
    if max_layers < 1:
        raise ProfileError(
            f"{model_path}: not even one layer with the embedding and head fits in "
            f"{(1 - options.kv_fraction) * memory / 1e9:.3g} GB ({1 - options.kv_fraction:.0%} of {memory / 1e9:.3g} GB)"
        )
    max_sessions = options.max_batch_sessions or (256 if dev.type == "cuda" else 64)
    sessions = [
        typical_sessions(config, dtype, memory, k, options.mix, max_sessions)
        for k in range(1, max_layers + 1)
    ]
    name = device_name(dev)
    key_doc = {
        "config": _config_identity(config),
        "dtype": str(dtype),
        "device": str(dev),
        "device_name": name,
        "memory_bytes": memory,
        "options": _options_doc(options),
        "software": software_versions(),
    }
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "device": dev,
        "dtype": dtype,
        "config": config,
        "memory_bytes": memory,
        "max_layers": max_layers,
        "sessions": sessions,
        "device_name": name,
        "key": key,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_identity(config: Any) -> dict[str, Any]:
    doc = config.to_dict()
    for volatile in (
        "_name_or_path",
        "transformers_version",
        "_attn_implementation_autoset",
        "dtype",
        "torch_dtype",
    ):
        doc.pop(volatile, None)
    return doc


def _options_doc(options: ProfileOptions) -> dict[str, Any]:
    doc = asdict(options)
    doc.pop("max_memory_bytes")  # part of the key as the resolved memory_bytes
    return doc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(shard: Shard, run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        _sync(shard.device)
        start = time.perf_counter()
        run()
        _sync(shard.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _time_prompt(shard: Shard, prompt_tokens: int, repeats: int) -> float:
    shard.open_session("profile-prompt", prompt_tokens)
    ids = _ids(prompt_tokens, shard.vocab_size, 0)
    try:
        return _timed(
            shard, lambda: shard.step(StepRequest("profile-prompt", token_ids=ids, position=0)), repeats
        )
    finally:
        shard.close_session("profile-prompt")


def _open_decode_sessions(shard: Shard, count: int, context: int) -> None:
    """`count` sessions holding `context` positions each, prefilled for real in batches."""
    for i in range(count):
        shard.open_session(f"profile-decode-{i}", context + 1)
    per_batch = max(1, shard.spec.max_batch_tokens // context)
    for first in range(0, count, per_batch):
        shard.step_batch(
            [
                StepRequest(f"profile-decode-{i}", token_ids=_ids(context, shard.vocab_size, i))
                for i in range(first, min(count, first + per_batch))
            ]
        )


def _time_decode(shard: Shard, batch: int, context: int, repeats: int) -> float:
    # Every run rewinds each session to `context` and decodes one token, so all runs see the same lengths.
    requests = [
        StepRequest(f"profile-decode-{i}", token_ids=_ids(1, shard.vocab_size, i), position=context)
        for i in range(batch)
    ]
    return _timed(shard, lambda: shard.step_batch(requests), repeats)


# --- the cache -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """`$HELIX_P2P_CACHE_DIR`, else `$XDG_CACHE_HOME/helix-p2p`, else `~/.cache/helix-p2p`."""
    explicit = os.environ.get("HELIX_P2P_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "helix-p2p"


def cached_profile(
    model_path: str,
    device: str | None = None,
    options: ProfileOptions = ProfileOptions(),
    *,
    directory: Path | None = None,
    refresh: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[DeviceProfile, bool]:
    """The profile for this model and device from the cache, else measured and stored.
    Returns (profile, whether it came from the cache)."""
    plan = _plan(model_path, device, options)
    folder = (directory or cache_dir()) / "profiles"
    model_name = Path(str(model_path)).name or "model"
    path = folder / f"{_safe(model_name)}-{plan['key'][:16]}.json"
    if not refresh and path.is_file():
        try:
            profile = DeviceProfile.from_json(json.loads(path.read_text()))
            if profile.key == plan["key"]:
                return profile, True
        except (ValueError, KeyError, TypeError, ProfileError) as e:
            logger.warning("ignoring unreadable profile cache %s: %s", path, e)
    profile = profile_device(model_path, device, options, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=1))
    tmp.replace(path)  # atomic: a node starting beside another never reads half a file
    return profile, False


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]
