"""`helix-node` as a real process: bad flags and inputs, and a dead initial peer, end in one clear
line and exit code 2, in bounded time (never a hang)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from procs import free_port, node_argv

pytestmark = pytest.mark.timeout(300)

DEAD_PEER_ID = "QmNhSRP5Q6XgHLUr48Rmns1FDLUhEeoRYLhSM5AwRUWBf7"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from helix_p2p.shard import TinyModelSpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", TinyModelSpec(num_layers=4))


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("tables") / "t.json"
    path.write_text(json.dumps([300.0, 160.0]))
    return path


def run_node(*args: str, timeout_s: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(node_argv(*args), check=False, capture_output=True, text=True, timeout=timeout_s)
    return done, time.monotonic() - started


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("helix-node: error: "), stderr
    return errors[0]


@pytest.mark.slow
def test_a_dead_initial_peer_fails_with_a_clear_message(tiny_model, table):
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{DEAD_PEER_ID}"
    done, _ = run_node(
        "join", "--initial-peers", dead, "--model", str(tiny_model), "--throughput", str(table),
        "--host", "127.0.0.1", "--connect-timeout-s", "5", "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "cannot connect to any initial peer" in line and dead in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--initial-peers", "/ip4/127.0.0.1/tcp/9"], "bad initial peer"),
        (["--throughput", "MISSING"], "--throughput MISSING: no such file"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--swarm", "a b"], "--swarm"),
        (["--ttl-s", "-3"], "--ttl-s"),
        (["--device", "tpu"], "tpu"),
        (["--max-memory", "0.000001"], "raise --max-memory"),
    ],
)
def test_bad_inputs_give_one_line_errors(tiny_model, table, args, message):
    base = {
        "--initial-peers": f"/ip4/127.0.0.1/tcp/9/p2p/{DEAD_PEER_ID}",
        "--model": str(tiny_model),
        "--throughput": str(table),
        "--connect-timeout-s": "5",
    }
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    argv = ["join", "--device", base.pop("--device", "cpu")]
    for flag, value in base.items():
        argv += [flag, value]
    done, _ = run_node(*argv)
    assert done.returncode == 2, done.stderr
    assert message in one_error_line(done.stderr)


def test_missing_required_flags_are_usage_errors():
    done, _ = run_node("join", "--model", "x")
    assert done.returncode == 2
    assert "--initial-peers" in done.stderr
