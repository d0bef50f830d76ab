"""Reading a Hugging Face checkpoint range by range: the config, and only the tensors a shard holds.

Tensors are read one by one through `safetensors.safe_open` (memory-mapped), so a shard holding 4
layers of an 80-layer model reads 4 layers' bytes, never the whole model. A checkpoint is a single
`model.safetensors` or several files listed in `model.safetensors.index.json`. A hub id is resolved
only where a network exists, and then only the index and the files holding wanted tensors are fetched."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from helix_p2p.shard.errors import CheckpointError, MissingTensorError, UnsupportedModelError
from helix_p2p.shard.families import ATTENTION_IMPLEMENTATIONS, FAMILIES, check_supported

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's config and where each tensor lives. Opening one reads no tensor."""

    source: str
    config: PretrainedConfig
    #: tensor name -> file name (relative to `directory` or to the hub repo)
    weight_map: dict[str, str]
    #: local directory, or None for a hub repo whose files are fetched on demand
    directory: Path | None

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def load(
        self, names: Iterable[str], *, device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The named tensors, converted to `dtype` on `device`; every name must exist."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            file = self.weight_map.get(name)
            if file is None:
                raise MissingTensorError(f"{self.source}: the checkpoint has no tensor {name!r}")
            by_file[file].append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            path = self._local_file(file)
            with safe_open(str(path), framework="pt", device="cpu") as reader:
                present = set(reader.keys())
                for name in file_names:
                    if name not in present:
                        raise MissingTensorError(
                            f"{path}: no tensor {name!r} (the index lists it in this file)"
                        )
                    tensors[name] = reader.get_tensor(name).to(device=device, dtype=dtype)
        return tensors

    def _local_file(self, file: str) -> Path:
        if self.directory is not None:
            path = self.directory / file
            if not path.is_file():
                raise CheckpointError(f"{self.source}: weight file {file!r} is missing")
            return path
        return Path(_hub_download(self.source, file))


def open_checkpoint(source: str | Path, *, attn_implementation: str = "sdpa") -> Checkpoint:
    """Read the config and the tensor index of a local checkpoint directory or a hub id."""
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"attention implementation {attn_implementation!r} is not supported "
            f"(use one of: {', '.join(ATTENTION_IMPLEMENTATIONS)})"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        config = _read_config(str(path), attn_implementation)
        return Checkpoint(str(path), config, _local_weight_map(path), path)
    if path.exists():
        raise CheckpointError(f"{source}: not a checkpoint directory")
    if _looks_like_hub_id(str(source)):
        config = _read_config(str(source), attn_implementation)
        return Checkpoint(str(source), config, _hub_weight_map(str(source)), None)
    raise CheckpointError(f"{source}: no such checkpoint directory")


def _read_config(source: str, attn_implementation: str) -> PretrainedConfig:
    # The family is checked on the raw file first: for a family transformers does not know,
    # its own error would blame the transformers version.
    model_type = _raw_model_type(source)
    if model_type is not None and model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{source}: model family {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    try:
        config = AutoConfig.from_pretrained(source, attn_implementation=attn_implementation)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: cannot read config.json: {e}") from e
    check_supported(config)
    return config


def _raw_model_type(source: str) -> str | None:
    path = Path(source) / "config.json"
    try:
        return str(json.loads(path.read_text())["model_type"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _local_weight_map(directory: Path) -> dict[str, str]:
    index = directory / INDEX_FILE
    if index.is_file():
        return _parse_index(index.read_text(), str(index))
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as reader:
            return {name: SINGLE_FILE for name in reader.keys()}  # noqa: SIM118 (not a dict)
    raise CheckpointError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)"
    )


def _parse_index(text: str, where: str) -> dict[str, str]:
    try:
        weight_map = json.loads(text)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: not a safetensors index (no 'weight_map'): {e}") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{where}: 'weight_map' must map tensor names to file names")
    return dict(weight_map)


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def _hub_download(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except Exception as e:  # the hub client raises many types (network, auth, not found)
        raise CheckpointError(f"{repo_id}: cannot fetch {filename} from the hub: {e}") from e


def _hub_weight_map(repo_id: str) -> dict[str, str]:
    try:
        index = _hub_download(repo_id, INDEX_FILE)
    except CheckpointError:
        single = _hub_download(repo_id, SINGLE_FILE)
        with safe_open(single, framework="pt", device="cpu") as reader:
            return {name: SINGLE_FILE for name in reader.keys()}  # noqa: SIM118 (not a dict)
    return _parse_index(Path(index).read_text(), f"{repo_id}/{INDEX_FILE}")
