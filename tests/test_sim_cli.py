"""`helix sim`: once as a user runs it (the installed `helix` executable in a subprocess), the rest
in-process through `helix_p2p.cli.main` (same parser, same error handling, without paying the
interpreter start-up for every case).

Spec: `helix sim CLUSTER.json --plan PLAN.json [--scheduler iwrr|random|shortest-queue|swarm]
[--mode offline|online] [--rate TOKENS_PER_S] [--duration SECONDS] [--seed N] [--churn FILE] [--json]`;
prints a summary table, or with --json one object with at least decode_tokens_per_s,
prompt_latency_s and decode_latency_s (mean, p50, p95), completed, rejected (by reason) and
max_flow_tokens_per_s; bad input exits non-zero with one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from builders import A100, make_cluster, node, write_json

from helix_p2p.cli import main
from helix_p2p.cluster import NodeId
from helix_p2p.formats import write_cluster, write_plan
from helix_p2p.planner import plan_from_placement

pytestmark = pytest.mark.timeout(120)

HELIX = shutil.which("helix", path=str(Path(sys.executable).parent)) or shutil.which("helix")


def helix_sim(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert HELIX, "the helix executable is not installed (pip install -e .)"
    return subprocess.run(
        [HELIX, "sim", *map(str, args)], capture_output=True, text=True, timeout=110, check=False
    )


def helix_sim_here(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["sim", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    cluster = make_cluster(
        [node("a1", A100), node("a2", A100)],
        num_layers=4,
        model_name="llama-2-70b",
        activation_bytes=16384,
        name="cli-sim",
    )
    plan = plan_from_placement(
        cluster, {NodeId("a1"): (0, 4), NodeId("a2"): (0, 4)}, method="sp", solve_seconds=0
    )
    write_cluster(cluster, tmp_path / "cluster.json")
    write_plan(plan, tmp_path / "plan.json")
    return tmp_path / "cluster.json", tmp_path / "plan.json"


@pytest.mark.slow  # the `helix` executable imports every subcommand (torch included) at start-up
def test_json_output_has_the_promised_fields(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, plan = files
    result = helix_sim(cluster, "--plan", plan, "--duration", "30", "--seed", "3", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["decode_tokens_per_s"] > 0
    for key in ("prompt_latency_s", "decode_latency_s"):
        assert set(doc[key]) >= {"mean", "p50", "p95"}
        assert doc[key]["p50"] <= doc[key]["p95"]
    assert doc["completed"] >= 0 and isinstance(doc["rejected"], dict)
    assert doc["max_flow_tokens_per_s"] == pytest.approx(600.0)
    assert doc["scheduler"] == "iwrr" and doc["mode"] == "offline"
    # the same seed prints the same numbers
    code, out, _ = helix_sim_here(
        capsys, cluster, "--plan", plan, "--duration", "30", "--seed", "3", "--json"
    )
    assert code == 0 and json.loads(out)["decode_tokens_per_s"] == doc["decode_tokens_per_s"]


def test_table_output_online_with_churn(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, plan = files
    churn = write_json(
        tmp_path / "churn.json",
        {
            "format": "helix-churn/1",
            "events": [{"time_s": 10, "leave": ["a2"]}],
            "replan": {"method": "sp"},
            "load_s_per_layer": 0.5,
        },
    )
    code, out, err = helix_sim_here(
        capsys, cluster, "--plan", plan, "--mode", "online", "--rate", "2000", "--duration", "30",
        "--scheduler", "swarm", "--churn", churn,
    )  # fmt: skip
    assert code == 0, err
    assert "decode throughput" in out and "prompt latency" in out and "decode latency/token" in out
    assert "a2 left: re-planned (sp)" in out
    assert "source -> a1" in out  # the edge table


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--mode", "online"], ["online", "rate"]),
        (["--duration", "-5"], ["duration"]),
        (["--churn", "missing.json"], ["missing.json"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    files: tuple[Path, Path], extra: list[str], words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, plan = files
    code, _, err = helix_sim_here(capsys, cluster, "--plan", plan, *extra)
    assert code == 2
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    for word in words:
        assert word in last


def test_a_plan_for_other_nodes_is_refused(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, _ = files
    other = make_cluster([node("zz", A100)], num_layers=4, model_name="llama-2-70b", activation_bytes=16384)
    write_plan(
        plan_from_placement(other, {NodeId("zz"): (0, 4)}, method="sp", solve_seconds=0), tmp_path / "o.json"
    )
    code, _, err = helix_sim_here(capsys, cluster, "--plan", tmp_path / "o.json")
    assert code == 2 and "zz" in err and "Traceback" not in err
