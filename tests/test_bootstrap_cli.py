"""`helix-bootstrap` as a real process: it prints its addresses and the join line, keeps its address
across restarts with the same identity, exits 0 on SIGTERM, and refuses bad flags in one line."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from procs import Processes, bootstrap_argv, free_port, start_bootstrap

pytestmark = pytest.mark.timeout(180)


@pytest.mark.slow
def test_restart_with_the_same_identity_keeps_the_address(tmp_path):
    identity = tmp_path / "bootstrap.key"
    port = free_port()
    with Processes(tmp_path) as procs:
        first = start_bootstrap(procs, name="first", port=port, identity=identity, swarm="lab-7")
        assert first.maddrs == [first.maddrs[0]]
        assert first.maddrs[0].startswith(f"/ip4/127.0.0.1/tcp/{port}/p2p/Qm")
        assert (
            first.join_line
            == f"helix-node join --initial-peers {first.maddrs[0]} --model PATH_OR_ID --swarm lab-7"
        )
        assert identity.exists()
        printed = subprocess.run(
            bootstrap_argv("--print-address", "--identity", str(identity), "--port", str(port), "--host", "127.0.0.1"),
            check=True, capture_output=True, text=True, timeout=120,
        )
        assert printed.stdout.split() == first.maddrs  # what the README exports as $HELIX_INITIAL_PEERS
        procs.signal(first.proc, signal.SIGTERM)
        assert procs.wait(first.proc, 30) == 0

        again = start_bootstrap(procs, name="again", port=port, identity=identity, swarm="lab-7")
        assert again.maddrs == first.maddrs
        os.killpg(again.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the p2p daemon gets it too
        assert procs.wait(again.proc, 60) == 0
        assert "Traceback" not in again.proc.stderr()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--swarm", "no/slashes"], "bad swarm prefix"),
        (
            ["--identity", "/nonexistent-dir/x.key", "--port", "0"],
            "directory /nonexistent-dir does not exist",
        ),
    ],
)
def test_bad_flags_give_one_line_errors(tmp_path, args, message):
    done = subprocess.run(
        bootstrap_argv(*args), check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("helix-bootstrap: error: ") and message in lines[0]
