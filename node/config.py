"""What `helix-node join` is told: the typed configuration, and the two inputs read from files (the
throughput table and the model's config). Everything a user can get wrong raises `NodeConfigError`
with the flag or file named."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from helix_p2p.errors import HelixError
from helix_p2p.planner import METHODS
from helix_p2p.swarm.keys import DEFAULT_PREFIX, check_prefix

if TYPE_CHECKING:
    from helix_p2p.swarm.swarm_key import SwarmKey
from helix_p2p.swarm.reports import DEFAULT_MIN_REPORTERS

#: KV positions per held layer that sizing by memory keeps free (so a full node can still serve)
KV_RESERVE_TOKENS = 2048
#: share of physical memory a CPU node uses when not told --max-memory
CPU_MEMORY_SHARE = 0.5
#: share of GPU memory a GPU node uses when not told --max-memory
GPU_MEMORY_SHARE = 0.9


#: cheap shape checks, run before the slow imports; the full parse happens when joining
_MADDR_SHAPE = re.compile(
    r"^/(ip4|ip6|dns|dns4|dns6)/[^/]+/(tcp|udp)/\d+(/[^/]+)*/p2p/[1-9A-HJ-NP-Za-km-z]+$"
)
_DEVICE_SHAPE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class NodeConfigError(HelixError, ValueError):
    """A bad flag or input file for `helix-node`."""


@dataclass(frozen=True)
class Throughput:
    """tokens_per_s[k-1]: what the node sustains holding k layers; `gpu` names the device."""

    tokens_per_s: tuple[float, ...]
    gpu: str | None = None


@dataclass(frozen=True)
class PlannerOptions:
    method: str = "milp"
    time_limit_s: float = 30.0
    #: periodic re-plans adopt a plan that moves layers only if it gains this share of flow
    min_gain: float = 0.1
    replan_period_s: float = 600.0
    #: membership must hold this long before a re-plan (absorbs flapping records); the CLI's default
    #: is one registry read period, half the refresh period (7.5 s with the default 60 s TTL)
    debounce_s: float = 7.5
    #: peers reported lying by this many distinct reporters are left out of plans (`swarm.reports`)
    ban_min_reporters: int = DEFAULT_MIN_REPORTERS


@dataclass(frozen=True)
class NodeConfig:
    initial_peers: tuple[str, ...]
    model: str
    model_id: str
    device: str = "cpu"
    dtype: str = "float32"
    max_memory_bytes: int | None = None
    max_layers: int | None = None
    #: "auto" (profile the device) or a JSON file
    throughput: str = "auto"
    host: str = "0.0.0.0"
    port: int = 0
    announce_addrs: tuple[str, ...] = ()
    identity: Path | None = None
    swarm: str = DEFAULT_PREFIX
    #: a private swarm's key file (`--swarm-key`); None: an open swarm
    swarm_key: Path | None = None
    public_name: str = ""
    client_mode: bool = False
    use_relay: bool = True
    use_auto_relay: bool = True
    no_listen: bool = False
    force_reachability: str | None = None
    planner_eligible: bool = True
    planner: PlannerOptions = field(default_factory=PlannerOptions)
    #: tests only (hidden flag --test-perturb-outputs): noise on this node's outputs, a lying peer
    test_perturb_scale: float = 0.0
    #: the registry forgets a record this long after its last refresh
    ttl_s: float = 60.0
    #: re-announce period; None: ttl_s / 4 (a record missing two refreshes is treated as gone)
    refresh_s: float | None = None
    probe_peers: int = 8
    probe_bytes: int = 1 << 20
    probe_period_s: float = 60.0
    #: a link measurement older than this is measured again / dropped from the record
    probe_max_age_s: float = 600.0
    #: both NIC directions, when known; otherwise estimated from probes
    nic_bytes_per_s: float | None = None
    grace_s: float = 30.0
    connect_timeout_s: float = 30.0
    rpc_timeout_s: float = 3.0
    #: serve Prometheus metrics at http://metrics_host:metrics_port/metrics; None: not at all
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    @property
    def refresh_period_s(self) -> float:
        return self.refresh_s if self.refresh_s is not None else self.ttl_s / 4

    @property
    def poll_s(self) -> float:
        """How often the node reads the registry and plans."""
        return self.refresh_period_s / 2

    def load_swarm_key(self) -> SwarmKey | None:
        from helix_p2p.swarm.swarm_key import SwarmKeyError, load_swarm_key

        if self.swarm_key is None:
            return None
        try:
            return load_swarm_key(self.swarm_key)
        except SwarmKeyError as e:
            raise NodeConfigError(f"--swarm-key: {e}") from None

    def check(self) -> NodeConfig:
        if not self.initial_peers:
            raise NodeConfigError("--initial-peers: give at least one multiaddr of a swarm peer")
        for peer in self.initial_peers:
            if not _MADDR_SHAPE.match(peer):
                raise NodeConfigError(
                    f"bad initial peer {peer!r}: expected a multiaddr such as /ip4/1.2.3.4/tcp/31337/p2p/Qm..."
                )
        if not _DEVICE_SHAPE.match(self.device):
            raise NodeConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise NodeConfigError(f"--dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.model.startswith(("/", "./", "../", "~")) and not Path(self.model).expanduser().exists():
            raise NodeConfigError(f"--model {self.model}: no such folder")
        try:
            check_prefix(self.swarm)
        except HelixError as e:
            raise NodeConfigError(f"--swarm: {e}") from None
        if self.swarm_key is not None:
            self.load_swarm_key()
        positive = {
            "--ttl-s": self.ttl_s,
            "--probe-period-s": self.probe_period_s,
            "--probe-max-age-s": self.probe_max_age_s,
            "--connect-timeout-s": self.connect_timeout_s,
            "--rpc-timeout-s": self.rpc_timeout_s,
            "--planner-time-limit-s": self.planner.time_limit_s,
            "--replan-period-s": self.planner.replan_period_s,
        }
        for flag, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise NodeConfigError(f"{flag} must be a positive number, got {value}")
        if self.refresh_period_s <= 0 or self.refresh_period_s > self.ttl_s / 2:
            raise NodeConfigError(
                f"--refresh-s must be in (0, ttl/2 = {self.ttl_s / 2:g}], got {self.refresh_s}"
            )
        for flag, value in {"--grace-s": self.grace_s, "--debounce-s": self.planner.debounce_s}.items():
            if not (math.isfinite(value) and value >= 0):
                raise NodeConfigError(f"{flag} must be >= 0, got {value}")
        if self.planner.method not in METHODS:
            raise NodeConfigError(
                f"--planner-method {self.planner.method!r}: choose one of {', '.join(METHODS)}"
            )
        if not 0 <= self.planner.min_gain < 10:
            raise NodeConfigError(f"--replan-min-gain must be in [0, 10), got {self.planner.min_gain}")
        if self.planner.ban_min_reporters < 1:
            raise NodeConfigError(f"--ban-min-reporters must be >= 1, got {self.planner.ban_min_reporters}")
        if not (math.isfinite(self.test_perturb_scale) and self.test_perturb_scale >= 0):
            raise NodeConfigError(f"--test-perturb-outputs must be >= 0, got {self.test_perturb_scale}")
        if self.max_layers is not None and self.max_layers < 1:
            raise NodeConfigError(f"--max-layers must be >= 1, got {self.max_layers}")
        if self.max_memory_bytes is not None and self.max_memory_bytes <= 0:
            raise NodeConfigError("--max-memory must be a positive number of GB")
        if self.no_listen and not self.use_auto_relay:
            raise NodeConfigError(
                "--no-listen leaves a relay slot as the only way in: drop --no-relay / --no-auto-relay"
            )
        if not 0 <= self.port <= 65535:
            raise NodeConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 < self.metrics_port <= 65535:
            raise NodeConfigError(f"--metrics-port must be in 1..65535, got {self.metrics_port}")
        if not 0 <= self.probe_peers <= 32:
            raise NodeConfigError(f"--probe-peers must be in 0..32, got {self.probe_peers}")
        if not 1024 <= self.probe_bytes <= 64 << 20:
            raise NodeConfigError(f"--probe-bytes must be in 1 KiB .. 64 MiB, got {self.probe_bytes}")
        if self.nic_bytes_per_s is not None and not self.nic_bytes_per_s > 0:
            raise NodeConfigError("--nic-bytes-per-s must be positive")
        if len(self.public_name) > 64 or not self.public_name.isprintable():
            raise NodeConfigError("--public-name: at most 64 printable characters")
        return self


def read_throughput(path: str | Path) -> Throughput:
    """A throughput file: a JSON list of tokens/s (entry k-1 for k layers held), or an object
    `{"tokens_per_s": [...], "gpu": "A100"}`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NodeConfigError(f"--throughput {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NodeConfigError(f"--throughput {path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise NodeConfigError(f"--throughput {path}: not valid JSON: {e.msg} at line {e.lineno}") from None
    gpu = None
    if isinstance(doc, dict):
        gpu = doc.get("gpu")
        if gpu is not None and (not isinstance(gpu, str) or not 0 < len(gpu) <= 64):
            raise NodeConfigError(f"--throughput {path}: 'gpu' must be a name of 1-64 characters")
        doc = doc.get("tokens_per_s")
    if not isinstance(doc, list) or not doc:
        raise NodeConfigError(
            f"--throughput {path}: expected a non-empty JSON list of tokens/s (entry k-1 for k layers held)"
        )
    table = []
    for i, value in enumerate(doc):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise NodeConfigError(f"--throughput {path}: entry {i} must be a positive number, got {value!r}")
        table.append(float(value))
    return Throughput(tokens_per_s=tuple(table), gpu=gpu)


def default_memory_bytes(device: str) -> int:
    """What a node uses when not told --max-memory: most of its GPU, or half the machine's RAM."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(index).total_memory * GPU_MEMORY_SHARE)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * CPU_MEMORY_SHARE)


def default_model_id(model: str) -> str:
    """A local checkpoint is named by its folder, a hub checkpoint by its id."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model
