"""`helix demo` as a user runs it: a subprocess with nothing but a cache folder. End to end, it
prints the plan and tokens/s and exits 0; Ctrl-C while it waits for the swarm stops it promptly.
Either way no process it started is left: every child it reports ("started NAME (pid N)") leads
its own process group (its p2p daemon inside), and the demo's own group holds the client's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import wait_for

from helix_p2p.demo_gpus import demo_gpus, real_layers_per_layer, scale_table

HELIX = str(Path(sys.executable).parent / "helix")  # the installed command, as a user runs it
STARTED = re.compile(r"^started (\S+) \(pid (\d+)\)$", re.MULTILINE)
#: the swarm's start-up on two busy cores is mostly four interpreters importing torch and hivemind
DEMO_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("helix-cache")


def start_demo(workdir: Path, cache: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, HELIX_P2P_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    with open(workdir / "demo.out", "wb") as out, open(workdir / "demo.err", "wb") as err:
        return subprocess.Popen(
            [HELIX, "demo", "--port", "0", *args],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # like a shell's job: Ctrl-C goes to this whole group
        )


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_nothing_left(demo: subprocess.Popen, output: str) -> dict[str, int]:
    started = {name: int(pid) for name, pid in STARTED.findall(output)}
    assert {"bootstrap", "a100", "l4", "t4-a", "t4-b"} <= set(started), output
    for pgid in [demo.pid, *started.values()]:
        wait_for(lambda pgid=pgid: not group_alive(pgid), 10, f"process group {pgid} to be gone")
    return started


@pytest.mark.slow
@pytest.mark.timeout(DEMO_TIMEOUT_S + 120)
def test_demo_runs_end_to_end_and_leaves_nothing(tmp_path, cache_dir):
    demo = start_demo(tmp_path, cache_dir, "--timeout-s", str(DEMO_TIMEOUT_S), "--max-new-tokens", "8")
    try:
        code = demo.wait(timeout=DEMO_TIMEOUT_S + 60)
    finally:
        if demo.poll() is None:  # the test failed midway: leave nothing running
            os.killpg(demo.pid, signal.SIGKILL)
    out, err = (tmp_path / "demo.out").read_text(), (tmp_path / "demo.err").read_text()
    assert code == 0, f"exit {code}\n{out}\n{err[-3000:]}"
    assert "making a tiny random 8-layer llama" in out  # a fresh cache
    plan = re.search(r"max flow ([\d.]+) tokens/s, bound ([\d.]+)", out)
    assert plan, out
    assert float(plan.group(1)) > 0 and float(plan.group(1)) <= float(plan.group(2)) + 1e-6
    table = out[out.index("plan: epoch") : out.index("flows (tokens/s)")]
    assert all(name in table for name in ("a100", "l4", "t4-a", "t4-b")), table  # held or said unused
    layers = sorted((int(a), int(b)) for a, b in re.findall(r"\[(\d+), (\d+)\)", table))
    assert layers[0][0] == 0 and layers[-1][1] == 8, out  # the plan covers the whole model
    rate = re.search(r"^tokens/s: ([\d.]+) \((\d+) tokens in 3 generations", out, re.MULTILINE)
    assert rate and float(rate.group(1)) > 0 and int(rate.group(2)) > 0, out
    assert "stopped 5 processes in" in out
    assert "Traceback" not in err
    assert "swarm:" not in err  # stderr is not a terminal: no progress bar
    assert_nothing_left(demo, out)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ctrl_c_while_waiting_stops_everything(tmp_path, cache_dir):
    demo = start_demo(tmp_path, cache_dir)
    try:
        wait_for(
            lambda: "started t4-b" in (tmp_path / "demo.out").read_text() or demo.poll() is not None,
            120,
            "the demo to start its last node",
        )
        assert demo.poll() is None, (tmp_path / "demo.err").read_text()
        os.killpg(demo.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
        pressed = time.monotonic()
        code = demo.wait(timeout=60)
        stopped_s = time.monotonic() - pressed
    finally:
        if demo.poll() is None:  # the test failed midway: leave nothing running
            os.killpg(demo.pid, signal.SIGKILL)
    out, err = (tmp_path / "demo.out").read_text(), (tmp_path / "demo.err").read_text()
    assert code == 130, f"exit {code}\n{out}\n{err[-3000:]}"
    assert stopped_s < 30, f"took {stopped_s:.1f} s to stop"
    assert "Traceback" not in err
    assert "stopped 5 processes in" in out
    assert_nothing_left(demo, out)


def test_port_in_use_is_a_one_line_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        base = busy - 2  # the busy port is the demo's second node's
        done = subprocess.run(
            [HELIX, "demo", "--port", str(base)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, HELIX_P2P_CACHE_DIR=str(tmp_path)),
        )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    # (the busy port, or by chance another of the six that is taken)
    assert len(lines) == 1 and re.search(r"port \d+ on 127.0.0.1 is in use", lines[0]), done.stderr
    assert "started" not in done.stdout


def test_gpu_tables_keep_the_papers_ratios():
    """Each tiny layer stands for the same number of real layers for every GPU, so the tables are
    the paper's own figures at k*s layers: the ratios between GPUs are the paper's."""
    from helix_p2p.demo_gpus import SOURCE_CLUSTER
    from helix_p2p.formats import read_cluster

    real = {}
    for node in read_cluster(SOURCE_CLUSTER).nodes:
        real.setdefault(node.gpu, node)
    per_layer = real_layers_per_layer([real[g].max_layers for g in ("A100", "L4", "T4", "T4")], 8)
    assert per_layer == (18 + 11 + 7 + 7) // 12 == 3
    gpus = {g.name: g for g in demo_gpus(8)}
    assert gpus["a100"].tokens_per_s[1] == real["A100"].tokens_per_s[5]  # 2 tiny layers = 6 real
    assert gpus["l4"].tokens_per_s[0] / gpus["t4-a"].tokens_per_s[0] == pytest.approx(
        real["L4"].tokens_per_s[2] / real["T4"].tokens_per_s[2]
    )
    assert [len(gpus[n].tokens_per_s) for n in ("a100", "l4", "t4-a", "t4-b")] == [6, 3, 2, 2]
    assert sum(len(g.tokens_per_s) for g in gpus.values()) >= 8  # together they hold the model
    assert scale_table((10.0, 9.0, 8.0, 7.0, 6.0), 2) == (9.0, 7.0)
