"""Ctrl-C in a terminal behaves like SIGTERM: a terminal sends SIGINT to the whole foreground
process group, hivemind's p2p daemon included; the node must still announce `leaving` through it,
exit 0, and leave no process of its group behind. Real processes on 127.0.0.1, each started in its
own process group as a shell starts a job."""

from __future__ import annotations

import os
import signal
import time

import pytest
from procs import FAST, Processes, SwarmObserver, start_bootstrap, start_node, wait_for

from helix_p2p.swarm.records import NodeState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: long enough that the `leaving` record is still in the DHT when the test reads it after the exit
TTL_S = 30.0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_announces_leaving_and_exits_0(tmp_path):
    from helix_p2p.shard import TinyModelSpec, make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", TinyModelSpec(num_layers=2))
    timings = dict(FAST, **{"--ttl-s": str(TTL_S), "--refresh-s": "1", "--grace-s": "10"})
    with Processes(tmp_path) as procs:
        boot = start_bootstrap(procs)
        node = start_node(procs, "volunteer", boot.maddrs, model, [400.0, 200.0], timings=timings)
        with SwarmObserver(boot.maddrs) as observer:

            def state() -> NodeState | None:
                records = observer.read()[0]
                mine = [r for r in records.values() if r.name == "volunteer"]
                return mine[0].state if mine else None

            wait_for(lambda: state() == NodeState.SERVING, 120, "the node to serve", describe=procs.report)
            os.killpg(node.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
            started = time.monotonic()
            assert procs.wait(node, 60) == 0, procs.report()
            assert time.monotonic() - started < 30, "Ctrl-C took too long with no session running"
            stderr = node.stderr()
            assert "Traceback" not in stderr
            assert "SIGINT: leaving the swarm" in stderr
            assert "could not announce leaving" not in stderr
            wait_for(lambda: state() == NodeState.LEAVING, 15, "the registry to show the node leaving")
            wait_for(lambda: not group_alive(node.pid), 10, "the node's process group to be gone")

        os.killpg(boot.proc.pid, signal.SIGINT)
        assert procs.wait(boot.proc, 60) == 0, procs.report()
        assert "Traceback" not in boot.proc.stderr()
        wait_for(lambda: not group_alive(boot.proc.pid), 10, "the bootstrap's process group to be gone")
