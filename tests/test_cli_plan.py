"""`helix plan`: the installed `helix` executable in a subprocess for the cases where the process
boundary matters (exit code, the one stderr line, the file written), and `helix_p2p.cli.main` in
this process (same parser, same error handling, same exit codes) for the many small variations,
because every `helix` process currently spends seconds importing torch for other subcommands.

Spec: `helix plan CLUSTER.json [--method milp|petals|swarm|sp] [--time-limit SECONDS]
[--partial-inference] [--out PLAN.json] [--seed N]`; CLUSTER may also be a bundled cluster's name.
It prints a readable table (flow in tokens/s, bound, gap, seconds, each node's layers), writes
`helix-plan/1` with --out, and exits non-zero with a one-line reason on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from builders import (
    A100,
    L4,
    T4,
    assert_plan_consistent,
    bundled_cluster,
    make_cluster,
    node,
    nodes_of,
    write_json,
)

from helix_p2p.cli import main as helix_main
from helix_p2p.flow import max_flow
from helix_p2p.formats import cluster_to_dict, read_cluster, read_plan, write_cluster
from helix_p2p.planner import PlanOptions, plan

pytestmark = pytest.mark.timeout(180)

#: the `helix` next to the Python running the tests (the project's venv), else the one on PATH
HELIX = shutil.which("helix", path=str(Path(sys.executable).parent)) or shutil.which("helix")


#: each `helix` process imports torch and transformers for other subcommands (5-10 s on 2 cores)
SLOW_START = pytest.mark.slow


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def helix_plan(*args: str | Path) -> Run:
    """The real executable, as a user runs it."""
    assert HELIX, "the helix executable is not installed (pip install -e .)"
    done = subprocess.run(
        [HELIX, "plan", "--quiet", *map(str, args)], capture_output=True, text=True, timeout=170, check=False
    )
    return Run(done.returncode, done.stdout, done.stderr)


def helix_plan_here(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Run:
    """`helix plan ...` through the CLI's own entry function; argparse's exits become return codes."""
    capsys.readouterr()
    try:
        code = helix_main(["plan", "--quiet", *map(str, args)])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return Run(code, out, err)


def small_cluster_file(tmp_path: Path) -> Path:
    """Two A100s, an L4 and two T4s on a 4-layer model, fully linked."""
    cluster = make_cluster(
        [*nodes_of(A100, 2, max_layers=2), node("l4-0", L4), *nodes_of(T4, 2)], num_layers=4, name="cli-small"
    )
    path = tmp_path / "small.json"
    write_cluster(cluster, path)
    return path


def assert_one_line_error(result: Run, *words: str) -> str:
    """Non-zero exit, no traceback, and a last stderr line that gives the reason with `words` in it."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "no reason given on stderr"
    reason = lines[-1]
    for word in words:
        assert word in reason, (word, reason)
    return reason


# --------------------------------------------------------------------------- the real executable


@SLOW_START
def test_bundled_cluster_by_name_prints_a_table_and_writes_the_plan(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = helix_plan("single24-llama70b", "--method", "swarm", "--out", out)
    assert result.returncode == 0, result.stderr
    cluster = bundled_cluster("single24-llama70b")
    written = read_plan(out)
    expected = plan(cluster, PlanOptions(method="swarm"))
    assert written.placement == expected.placement
    assert written.objective_tokens_per_s == pytest.approx(expected.objective_tokens_per_s, rel=1e-12)
    assert written.method == "swarm" and written.cluster == cluster.name
    assert json.loads(out.read_text())["format"] == "helix-plan/1"
    assert_plan_consistent(cluster, written)
    table = result.stdout
    assert f"{expected.objective_tokens_per_s:.2f} tokens/s" in table
    assert "bound" in table  # a heuristic proves none, and says so
    for node_id, (start, end) in expected.placement.items():
        line = next((ln for ln in table.splitlines() if node_id in ln.split()), None)
        assert line is not None, f"node {node_id} is not in the table"
        assert f"[{start}, {end})" in line, line


@SLOW_START
def test_milp_with_a_time_limit(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    path = small_cluster_file(tmp_path)
    result = helix_plan(path, "--method", "milp", "--time-limit", "5", "--out", out)
    assert result.returncode == 0, result.stderr
    written = read_plan(out)
    assert written.method == "milp" and written.upper_bound_tokens_per_s is not None
    cluster = read_cluster(path)
    assert_plan_consistent(cluster, written)
    # never below the best baseline on the same cluster
    best_baseline = max(plan(cluster, PlanOptions(method=m)).objective_tokens_per_s for m in ("swarm", "sp"))
    assert written.objective_tokens_per_s >= best_baseline * (1 - 1e-9)
    # the table shows the flow, the bound and the gap
    assert f"{written.objective_tokens_per_s:.2f} tokens/s" in result.stdout
    assert f"{written.upper_bound_tokens_per_s:.2f} tokens/s" in result.stdout and "gap" in result.stdout
    # and how deep a token's path is, so a gap given up for depth does not read as a solver stopping short
    flows = max_flow(cluster, written.placement)
    hops = sum(flows.node_flow_tokens_per_s.values()) / flows.value_tokens_per_s
    assert f"depth      {hops:.1f} hops a token" in result.stdout


@SLOW_START
def test_malformed_cluster_exits_2_with_file_and_field(tmp_path: Path) -> None:
    doc = cluster_to_dict(make_cluster(nodes_of(A100, 2), num_layers=4))
    doc["links"][0]["bytes_per_s"] = -1.0
    path = write_json(tmp_path / "bad.json", doc)
    result = helix_plan(path)
    assert_one_line_error(result, str(path), "links[0].bytes_per_s", "must be > 0")
    assert result.returncode == 2  # the code `helix` uses for every HelixError
    assert result.stdout == ""


@SLOW_START
def test_missing_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    result = helix_plan(missing)
    assert_one_line_error(result, str(missing), "no such file")
    assert result.returncode == 2


@SLOW_START
def test_bad_time_limit_exits_2() -> None:
    result = helix_plan("single24-llama70b", "--time-limit", "0")
    assert_one_line_error(result, "--time-limit")
    assert result.returncode == 2 and result.stdout == ""


# ------------------------------------------------------------------ the same CLI, in this process


def test_cluster_file_path_and_partial_inference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    result = helix_plan_here(capsys, small_cluster_file(tmp_path), "--method", "sp", "--partial-inference",
                             "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = read_plan(out)
    assert written.cluster == "cli-small" and written.method == "sp" and written.partial_inference is True


def test_petals_seed_is_honoured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = bundled_cluster("single24-llama70b")
    out = tmp_path / "p.json"
    result = helix_plan_here(capsys, "single24-llama70b", "--method", "petals", "--seed", "3", "--out", out)
    assert result.returncode == 0, result.stderr
    seed_3 = plan(cluster, PlanOptions(method="petals", seed=3)).placement
    assert read_plan(out).placement == seed_3
    assert seed_3 != plan(cluster, PlanOptions(method="petals", seed=0)).placement  # so the seed mattered


def test_max_flow_publishes_the_bare_max_flow_placement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default may give up flow for fewer hops (planner/servable.py); --max-flow does not."""
    path = small_cluster_file(tmp_path)
    outs = {flag: tmp_path / f"{flag or 'default'}.json" for flag in ("", "--max-flow")}
    for flag, out in outs.items():
        done = helix_plan_here(capsys, path, "--time-limit", "10", "--out", out, *([flag] if flag else []))
        assert done.returncode == 0, done.stderr
    cluster = read_cluster(path)
    default, bare = (read_plan(out) for out in outs.values())
    assert bare.objective_tokens_per_s >= default.objective_tokens_per_s * (1 - 1e-9)
    assert bare.upper_bound_tokens_per_s is not None
    assert bare.objective_tokens_per_s >= bare.upper_bound_tokens_per_s * (1 - 1e-6)  # proven optimal here
    assert_plan_consistent(cluster, bare)


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    result = helix_plan_here(capsys, "--help")
    assert result.returncode == 0
    for option in ("--method", "--time-limit", "--partial-inference", "--out", "--seed", "--max-flow"):
        assert option in result.stdout, option
    for method in ("milp", "petals", "swarm", "sp"):
        assert method in result.stdout


def test_unknown_bundled_name(capsys: pytest.CaptureFixture[str]) -> None:
    result = helix_plan_here(capsys, "no-such-cluster")
    assert_one_line_error(result, "no-such-cluster", "no such file")
    assert result.returncode == 2


def test_invalid_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"format": "helix-cluster/1", ')
    result = helix_plan_here(capsys, path)
    assert_one_line_error(result, str(path), "not valid JSON")
    assert result.returncode == 2


@pytest.mark.parametrize("method", ["swarm", "sp", "petals", "milp"])
def test_cannot_hold_the_model_for_every_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    path = tmp_path / "tiny.json"
    write_cluster(make_cluster(nodes_of(T4, 2), num_layers=5, name="two-t4"), path)
    result = helix_plan_here(capsys, path, "--method", method)
    assert_one_line_error(result, "two-t4", "cannot hold the model", "at most 4 layers")
    assert result.returncode == 2


@pytest.mark.parametrize("value", ["0", "-5", "abc", "nan", ""])
def test_bad_time_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    result = helix_plan_here(capsys, small_cluster_file(tmp_path), "--time-limit", value)
    assert_one_line_error(result, "--time-limit")
    assert result.returncode == 2


def test_unknown_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = helix_plan_here(capsys, small_cluster_file(tmp_path), "--method", "gurobi")
    assert_one_line_error(result, "--method", "gurobi")
    assert result.returncode == 2


def test_bad_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = helix_plan_here(capsys, small_cluster_file(tmp_path), "--seed", "x")
    assert_one_line_error(result, "--seed")
    assert result.returncode == 2


def test_out_into_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "no-such-folder" / "plan.json"
    result = helix_plan_here(capsys, small_cluster_file(tmp_path), "--method", "sp", "--out", out)
    assert_one_line_error(result, str(out), "cannot write")
    assert result.returncode == 2
    assert not out.exists()


def test_no_cluster_argument(capsys: pytest.CaptureFixture[str]) -> None:
    result = helix_plan_here(capsys)
    assert_one_line_error(result, "CLUSTER")
    assert result.returncode == 2
