"""`helix make-model` and `helix profile`, and the capacity model behind the profile.

The commands are driven through their own `register`/`run` (as `helix` plugs them in), so these
tests do not depend on which other subcommands are installed."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helix_p2p.cli import make_model_cmd, profile_cmd
from helix_p2p.errors import HelixError
from helix_p2p.formats import parse_cluster
from helix_p2p.shard import DeviceError, LocalChain, ShardSpec, load_shard, open_checkpoint
from helix_p2p.shard.profile import (
    ProfileError,
    ProfileOptions,
    WorkloadMix,
    cached_profile,
    decode_batch_sizes,
    interpolate,
    throughput_tokens_per_s,
    typical_sessions,
)

pytestmark = pytest.mark.timeout(120)
#: 10 MB: a tiny model gets all its layers and typical batches of a few sessions; with batches
#: capped at 4 sessions, a profile takes about a second
SMALL_GB = 0.01
FAST = ProfileOptions(max_memory_bytes=SMALL_GB * 1e9, repeats=1, max_batch_sessions=4)


def helix(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="helix")
    subparsers = parser.add_subparsers(dest="command")
    make_model_cmd.register(subparsers)
    profile_cmd.register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("make-model") / "qwen"
    assert helix("make-model", "--family", "qwen2", "--layers", "3", "--hidden", "32", "--heads", "4",
                 "--kv-heads", "2", "--vocab", "300", "--tie-embeddings", "--max-shard-size", "40KB",
                 str(out)) == 0  # fmt: skip
    return out


def test_make_model_writes_a_checkpoint_everything_loads_offline(model_dir: Path) -> None:
    assert (model_dir / "model.safetensors.index.json").is_file()
    config = open_checkpoint(model_dir).config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "qwen2",
        3,
        32,
        300,
    )
    assert config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("the swarm serves the model").input_ids
    assert ids[0] == tokenizer.bos_token_id == 0 and max(ids) < 300
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the swarm serves the model"
    whole = AutoModelForCausalLM.from_pretrained(model_dir)
    chain = LocalChain(
        [load_shard(ShardSpec(str(model_dir), 0, 2)), load_shard(ShardSpec(str(model_dir), 2, 3))]
    )
    expected = whole.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert chain.generate(ids, 5) == expected[0, len(ids) :].tolist()


def test_cli_choices_match_the_library_and_registering_imports_no_torch() -> None:
    import subprocess
    import sys

    from helix_p2p.shard.families import FAMILIES
    from helix_p2p.shard.memory import DTYPES
    from helix_p2p.shard.profile import DEFAULT_NIC_BYTES_PER_S

    assert make_model_cmd.FAMILY_CHOICES == tuple(sorted(FAMILIES))
    assert set(make_model_cmd.DTYPE_CHOICES) == set(DTYPES)
    assert profile_cmd.DEFAULT_NIC_BYTES_PER_S == DEFAULT_NIC_BYTES_PER_S
    code = (
        "import argparse, sys; from helix_p2p.cli import make_model_cmd, profile_cmd;"
        "s = argparse.ArgumentParser().add_subparsers(); make_model_cmd.register(s); profile_cmd.register(s);"
        "print('torch' in sys.modules)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "False\n"
    )


def test_make_model_refuses_bad_shapes(tmp_path: Path) -> None:
    for argv, words in [
        (("--hidden", "30"), "must divide"),
        (("--vocab", "100"), "vocab size must be >= 259"),
        (("--layers", "0"), ">= 1"),
    ]:
        with pytest.raises(HelixError, match=words):
            helix("make-model", *argv, str(tmp_path / "x"))


def test_profile_prints_a_cluster_node_and_caches_it(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ("profile", "--model", str(model_dir), "--device", "cpu", "--max-memory", str(SMALL_GB),
            "--max-batch-sessions", "4", "--cache-dir", str(tmp_path), "--id", "node-7", "--region", "eu")  # fmt: skip
    assert helix(*argv) == 0
    out, err = capsys.readouterr()
    node = json.loads(out)
    assert "measured" in err
    cluster = parse_cluster(
        {
            "format": "helix-cluster/1",
            "name": "one",
            "model": {
                "name": "tiny",
                "num_layers": 3,
                "hidden_size": 32,
                "activation_bytes": 128,
                "token_bytes": 2,
            },
            "nodes": [node],
            "links": [],
            "coordinator": [],
        }
    )
    spec = cluster.nodes[0]
    assert (spec.id, spec.region, spec.max_layers) == ("node-7", "eu", 3)
    assert spec.gpu.startswith("CPU") and all(t > 0 for t in spec.tokens_per_s)
    (cache_file,) = (tmp_path / "profiles").glob("qwen-*.json")
    assert helix(*argv) == 0  # the second run reads the cache
    out2, err2 = capsys.readouterr()
    assert "cached" in err2 and json.loads(out2) == node
    assert helix(*argv, "--refresh") == 0
    assert "measured" in capsys.readouterr().err
    stored = json.loads(cache_file.read_text())
    assert stored["format"] == "helix-profile/1" and stored["software"]["transformers"]


def test_profile_cache_key_follows_model_device_memory_and_version(model_dir: Path, tmp_path: Path) -> None:
    options = FAST
    first, cached = cached_profile(str(model_dir), "cpu", options, directory=tmp_path)
    assert not cached
    again, cached = cached_profile(str(model_dir), "cpu", options, directory=tmp_path)
    assert cached and again == first
    other_memory = dataclasses.replace(FAST, max_memory_bytes=2 * SMALL_GB * 1e9)
    _, cached = cached_profile(str(model_dir), "cpu", other_memory, directory=tmp_path)
    assert not cached
    # a different software version makes a different key: stored profiles are not reused
    path = next((tmp_path / "profiles").glob(f"*{first.key[:16]}.json"))
    doc = json.loads(path.read_text())
    doc["key"] = "0" * 64
    path.write_text(json.dumps(doc))
    refreshed, cached = cached_profile(str(model_dir), "cpu", options, directory=tmp_path)
    assert not cached and refreshed.key == first.key


def test_profile_errors_are_named(model_dir: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            helix("profile", "--model", str(model_dir), "--device", "cuda:0", "--cache-dir", str(tmp_path))
    with pytest.raises(ProfileError, match="not even one layer"):
        helix("profile", "--model", str(model_dir), "--max-memory", "0.00001", "--cache-dir", str(tmp_path))
    with pytest.raises(ProfileError, match="must be > 0"):
        helix("profile", "--model", str(model_dir), "--max-memory", "-1", "--cache-dir", str(tmp_path))
    with pytest.raises(ProfileError, match="max_batch_sessions"):
        cached_profile(str(model_dir), "cpu", ProfileOptions(max_batch_sessions=0), directory=tmp_path)
    with pytest.raises(ProfileError, match="kv_fraction"):
        cached_profile(str(model_dir), "cpu", ProfileOptions(kv_fraction=1.0), directory=tmp_path)
    with pytest.raises(HelixError, match="no such checkpoint"):
        helix("profile", "--model", str(tmp_path / "missing"), "--cache-dir", str(tmp_path))


def test_capacity_model_arithmetic(model_dir: Path) -> None:
    """T(k) = c(750 + 240) / (k (c P + 240 D(c))), worked by hand."""
    mix = WorkloadMix()
    assert throughput_tokens_per_s(2, 4, 0.5, {1: 0.01, 8: 0.08}, mix) == pytest.approx(
        4 * 990 / (2 * (4 * 0.5 + 240 * 0.04))
    )
    assert interpolate({1: 1.0, 4: 4.0}, 2) == pytest.approx(2.0)
    assert interpolate({2: 3.0}, 1) == 3.0
    assert decode_batch_sizes(1) == [1]
    assert decode_batch_sizes(11) == [1, 2, 4, 8, 11]
    assert decode_batch_sizes(8) == [1, 2, 4, 8]
    config = open_checkpoint(model_dir).config
    # more layers leave less memory for KV: fewer typical sessions, never fewer than one
    sessions = [typical_sessions(config, torch.float32, 1e7, k, mix, 64) for k in (1, 2, 3)]
    assert sessions == sorted(sessions, reverse=True) and sessions[-1] >= 1
    assert typical_sessions(config, torch.float32, 1e12, 1, mix, 64) == 64
