"""Loading a shard reads only its own tensors (single-file and indexed checkpoints), handles tied
embeddings, names what is missing or unsupported, and memory accounting from the config matches
what a loaded shard actually holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from shard_fixtures import FAMILY_SPECS, load_chain, prompt, tiny_model_dirs_fixture, whole_model  # noqa: F401
from transformers import GPT2Config

from helix_p2p.shard import (
    BadStepError,
    CheckpointError,
    DeviceError,
    LayerRangeError,
    MissingTensorError,
    ShardSpec,
    ShardSpecError,
    StepRequest,
    UnsupportedModelError,
    bytes_per_layer,
    embedding_bytes,
    head_bytes,
    kv_bytes_per_token_per_layer,
    load_shard,
    max_layers_for_budget,
    model_shape,
    open_checkpoint,
    shard_weight_bytes,
)

pytestmark = pytest.mark.timeout(60)


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118 (not a dict)
                tensors[name] = reader.get_tensor(name)
    return tensors


def rewrite_checkpoint(src: Path, dst: Path, keep: dict[str, torch.Tensor]) -> Path:
    """A single-file copy of `src` holding only `keep`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(keep, str(dst / "model.safetensors"))
    return dst


def test_a_shard_reads_only_the_tensors_it_holds(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_model_dirs["llama"]
    tensors = all_tensors(src)
    without_layer0 = {k: v for k, v in tensors.items() if not k.startswith("model.layers.0.")}
    path = rewrite_checkpoint(src, tmp_path / "no-layer-0", without_layer0)
    middle = load_shard(ShardSpec(str(path), 1, 3))  # never asks for layer 0 or the embedding's neighbours
    assert middle.embed_tokens is None and middle.lm_head is None
    held = {name for name, _ in middle.layers.named_parameters()}
    assert held and all(name.split(".")[0] in ("0", "1") for name in held)  # ModuleList indices of 2 layers
    torch.testing.assert_close(
        middle.layers[0].mlp.up_proj.weight, tensors["model.layers.1.mlp.up_proj.weight"]
    )
    with pytest.raises(MissingTensorError, match=r"model\.layers\.0\."):
        load_shard(ShardSpec(str(path), 0, 1))


def test_an_indexed_checkpoint_opens_only_the_files_holding_wanted_tensors(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    src = tiny_model_dirs["qwen2"]
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2, "the fixture is a sharded checkpoint"
    path = tmp_path / "qwen2-partial"
    shutil.copytree(src, path)
    later = {f for name, f in index.items() if name.startswith(("model.layers.3.", "model.layers.4."))}
    early = {f for name, f in index.items() if not name.startswith(("model.layers.3.", "model.layers.4."))}
    for file in later - early:  # files with only layers 3 and 4 in them
        (path / file).unlink()
    assert later - early, "the fixture's shard size leaves some files holding only late layers"
    chain_head = load_shard(ShardSpec(str(path), 0, 3))
    assert chain_head.holds_embedding and not chain_head.holds_head
    with pytest.raises(CheckpointError, match="is missing"):
        load_shard(ShardSpec(str(path), 3, 4))


def test_tied_embeddings_give_the_last_shard_the_embedding_as_its_head(
    tiny_model_dirs: dict[str, Path],
) -> None:
    path = tiny_model_dirs["qwen2"]
    assert (
        "lm_head.weight" not in json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    )
    last = load_shard(ShardSpec(str(path), 3, FAMILY_SPECS["qwen2"].num_layers))
    assert last.holds_head and not last.holds_embedding
    torch.testing.assert_close(last.lm_head.weight, whole_model(path).model.embed_tokens.weight)


def test_untied_checkpoint_without_head_names_the_tensor(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    src = tiny_model_dirs["llama"]
    tensors = {k: v for k, v in all_tensors(src).items() if k != "lm_head.weight"}
    path = rewrite_checkpoint(src, tmp_path / "no-head", tensors)
    load_shard(ShardSpec(str(path), 0, 3))
    with pytest.raises(MissingTensorError, match="'lm_head.weight'"):
        load_shard(ShardSpec(str(path), 3, FAMILY_SPECS["llama"].num_layers))


def test_a_tensor_of_the_wrong_shape_is_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_model_dirs["llama"]
    tensors = all_tensors(src)
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    path = rewrite_checkpoint(src, tmp_path / "bad-shape", tensors)
    with pytest.raises(MissingTensorError, match=r"down_proj.weight' has shape \(3, 3\)"):
        load_shard(ShardSpec(str(path), 1, 2))


def test_unsupported_family_is_named(tmp_path: Path) -> None:
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        load_shard(ShardSpec(str(tmp_path / "gpt2"), 0, 1))
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text(json.dumps({"model_type": "alien-9000"}))
    with pytest.raises(UnsupportedModelError, match="alien-9000"):
        load_shard(ShardSpec(str(tmp_path / "alien"), 0, 1))


def test_missing_or_empty_checkpoints_are_named(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_shard(ShardSpec(str(tmp_path / "nowhere" / "model"), 0, 1))
    (tmp_path / "config-only").mkdir()
    shutil.copy(tiny_model_dirs["llama"] / "config.json", tmp_path / "config-only")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_shard(ShardSpec(str(tmp_path / "config-only"), 0, 1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_shard(ShardSpec(str(tmp_path / "empty"), 0, 1))


@pytest.mark.parametrize("layers", [(2, 2), (3, 1), (-1, 2), (0, 6)])
def test_bad_layer_ranges_are_refused(tiny_model_dirs: dict[str, Path], layers: tuple[int, int]) -> None:
    with pytest.raises(LayerRangeError, match="5 layers"):
        load_shard(ShardSpec(str(tiny_model_dirs["llama"]), *layers))


def test_bad_device_dtype_and_attention_are_refused(tiny_model_dirs: dict[str, Path]) -> None:
    path = str(tiny_model_dirs["llama"])
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            load_shard(ShardSpec(path, 0, 1, device="cuda:0"))
    with pytest.raises(DeviceError, match="not supported|not a device"):
        load_shard(ShardSpec(path, 0, 1, device="tpu"))
    with pytest.raises(DeviceError, match="int8"):
        load_shard(ShardSpec(path, 0, 1, dtype="int8"))
    with pytest.raises(UnsupportedModelError, match="flash_attention_2"):
        load_shard(ShardSpec(path, 0, 1, attn_implementation="flash_attention_2"))
    with pytest.raises(ShardSpecError, match="max_chunk_tokens"):
        load_shard(ShardSpec(path, 0, 1, max_chunk_tokens=0))
    with pytest.raises(ShardSpecError, match="idle_timeout_s"):
        load_shard(ShardSpec(path, 0, 1, idle_timeout_s=0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_shards_run_close_to_fp32(
    tiny_model_dirs: dict[str, Path], dtype: torch.dtype
) -> None:
    path = tiny_model_dirs["mistral"]
    fp32, half = load_chain(path), load_chain(path, dtype=str(dtype).removeprefix("torch."))
    ids = prompt(10, seed=3)
    for chain in (fp32, half):
        chain.open_session("s", 16)
    want = fp32.step("s", ids, return_logits=True).logits
    got = half.step("s", ids, return_logits=True).logits
    assert got.dtype == torch.float32  # logits are handed out in fp32 whatever the shard runs
    assert (got - want).abs().max() < 0.15 * want.abs().max()
    assert half.shards[0].layers[0].mlp.up_proj.weight.dtype == dtype
    half.shards[1].open_session("t", 4)
    with pytest.raises(BadStepError, match="float32"):
        half.shards[1].step(StepRequest("t", hidden_states=torch.zeros(1, 64)))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_memory_accounting_matches_loaded_shards(tiny_model_dirs: dict[str, Path], family: str) -> None:
    path = tiny_model_dirs[family]
    config = open_checkpoint(path).config
    num_layers = FAMILY_SPECS[family].num_layers

    def loaded_bytes(shard: object) -> int:
        seen, total = set(), 0
        for module in (shard.layers, shard.embed_tokens, shard.norm, shard.lm_head):
            for p in [] if module is None else module.parameters():
                if p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    total += p.numel() * p.element_size()
        return total

    for start, end in [(1, 2), (0, 2), (2, num_layers), (0, num_layers)]:
        for dtype in ("float32", "bfloat16"):
            shard = load_shard(ShardSpec(str(path), start, end, dtype=dtype))
            assert loaded_bytes(shard) == shard_weight_bytes(config, dtype, start, end), (start, end, dtype)
    shard = load_shard(ShardSpec(str(path), 1, 3))
    assert loaded_bytes(shard) == 2 * bytes_per_layer(config, "float32")
    info = shard.open_session("s", 50)
    assert info.kv_bytes == 50 * 2 * kv_bytes_per_token_per_layer(config, "float32")
    assert embedding_bytes(config, "bf16") == 320 * 64 * 2
    assert head_bytes(config, "fp32") == (320 * 64 + 64) * 4


def test_max_layers_for_budget(tiny_model_dirs: dict[str, Path]) -> None:
    config = open_checkpoint(tiny_model_dirs["llama"]).config
    layer, kv = bytes_per_layer(config, "fp32"), kv_bytes_per_token_per_layer(config, "fp32")
    assert max_layers_for_budget(config, "fp32", 3 * layer) == 3
    assert max_layers_for_budget(config, "fp32", 3 * layer - 1) == 2
    assert max_layers_for_budget(config, "fp32", 10**12) == 5  # never more than the model has
    assert max_layers_for_budget(config, "fp32", 2 * (layer + 100 * kv), kv_tokens_per_layer=100) == 2
    assert max_layers_for_budget(config, "fp32", 3 * layer + 5000, kv_reserve_bytes=5000) == 3
    assert max_layers_for_budget(config, "fp32", 3 * layer + 5000, kv_reserve_bytes=5001) == 2
    fixed = embedding_bytes(config, "fp32") + head_bytes(config, "fp32")
    assert (
        max_layers_for_budget(config, "fp32", fixed + layer, include_embedding=True, include_head=True) == 1
    )
    assert max_layers_for_budget(config, "fp32", fixed, include_embedding=True, include_head=True) == 0
    shape = model_shape(config, "bf16", "tiny-llama")
    assert (shape.num_layers, shape.hidden_size, shape.activation_bytes, shape.token_bytes) == (5, 64, 128, 2)
