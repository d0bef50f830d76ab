"""Ctrl-C in a real terminal: a node started from an interactive shell (job control on, the node the
terminal's foreground group) announces `leaving`, finishes a running session within its grace period
and exits 0, as it does on SIGTERM.

The terminal is a pseudo-terminal running `bash -i`, and Ctrl-C is the byte 0x03 typed into it, so
the kernel's line discipline delivers SIGINT to the whole foreground group exactly as it does for a
volunteer at a keyboard, the p2p daemon included (it must keep the node's connections up while the
node drains; hivemind's p2pd ignores SIGINT and exits with its parent)."""

from __future__ import annotations

import os
import pty
import re
import select
import shlex
import signal
import time

import pytest
from dataplane_helpers import LoopThread
from procs import Processes, SwarmObserver, node_argv, start_bootstrap, wait_for

from helix_p2p.protocol.driver import RemoteSession
from helix_p2p.protocol.messages import RouteHop
from helix_p2p.shard import TinyModelSpec, make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class Terminal:
    """An interactive bash on a pseudo-terminal."""

    def __init__(self, env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the session leader with the pty as its terminal
            os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"], env)
        self.output = ""

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def read_until(self, pattern: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while not re.search(pattern, self.output) and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.output += os.read(self.fd, 65536).decode(errors="replace")
                except OSError:
                    break
        return self.output

    def close(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_ctrl_c_in_a_terminal_announces_leaving_and_exits_0(tmp_path):
    tiny_model_dir = make_tiny_model(tmp_path / "tiny", TinyModelSpec(num_layers=4))
    with Processes(tmp_path) as procs:
        boot = start_bootstrap(procs)
        table = tmp_path / "t.json"
        table.write_text("[100, 90, 80, 70]")
        log = tmp_path / "node.log"
        # quick registry reads and no debounce: a lone node plans for itself within a read or two
        # (the defaults wait 15-22 s for a first plan, which is not what this test is about)
        argv = node_argv(
            "join", "--initial-peers", *boot.maddrs, "--model", str(tiny_model_dir), "--throughput", str(table),
            "--host", "127.0.0.1", "--public-name", "at-keyboard", "--ttl-s", "60", "--device", "cpu", "--grace-s", "60",
            "--refresh-s", "2", "--debounce-s", "0",
        )  # fmt: skip
        env = dict(os.environ, PS1="$ ", TERM="dumb")
        terminal = Terminal(env)
        try:
            terminal.type(f"{shlex.join(argv)} > {shlex.quote(str(log))} 2>&1; echo NODE-EXIT=$?\n")
            with SwarmObserver(boot.maddrs) as observer:

                def state() -> str | None:
                    records, _ = observer.read()
                    ours = [r for r in records.values() if r.name == "at-keyboard"]
                    return ours[0].state.value if ours else None

                wait_for(lambda: state() == "serving", 180, "the node to serve", describe=log.read_text)
                records, _ = observer.read()
                node = next(r for r in records.values() if r.name == "at-keyboard")
                client = LoopThread(boot.maddrs)
                try:
                    route = (RouteHop(node.peer_id, 0, 4),)
                    session = client.run(RemoteSession.open(client.p2p, route, max_length=32))
                    first = client.run(session.step([1, 2, 3]))
                    terminal.read_until("^never printed$", 1)  # drain what the terminal echoed so far
                    terminal.type("\x03")  # Ctrl-C: SIGINT to the terminal's foreground group
                    wait_for(lambda: state() == "leaving", 20, "the registry to show the node leaving")
                    # A running session finishes within the grace period: the node's network is alive.
                    second = client.run(session.step([first.token_id]), timeout_s=30)
                    assert second.position == first.position + first.num_tokens
                    client.run(session.close())
                finally:
                    client.close()
                out = terminal.read_until(r"NODE-EXIT=\d", 90)  # the echoed command line shows "NODE-EXIT=$?"
                assert "NODE-EXIT=0" in out, f"{out[-2000:]}\n{log.read_text()[-3000:]}"
        finally:
            terminal.close()
        text = log.read_text()
        assert "SIGINT: leaving the swarm" in text and "left swarm" in text
        assert "could not announce leaving" not in text and "Traceback" not in text, text[-3000:]
