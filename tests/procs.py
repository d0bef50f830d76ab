"""Real processes on 127.0.0.1 for tests: a bootstrap and nodes as subprocesses, a DHT observer in
the test process, and waiting with timeouts.

- `Processes` starts each command in its own session (process group), so that killing it takes
  its children (hivemind's p2p daemon) along; `close()` always kills every group it started,
  also when a test fails (use it as a context manager or through a fixture).
- `start_bootstrap` parses the addresses the bootstrap prints; `start_node` writes the node's
  `--throughput` table to a file and starts `helix-node join` with short timings.
- `SwarmObserver` is a DHT peer (client mode, its own identity) running in a background thread: it
  reads the registry and the plans as any peer would, and can write (forgery tests).
- `wait_for(condition, timeout_s, what)` polls until `condition()` returns something truthy and
  raises `WaitTimeout` naming `what` and the last value seen otherwise.

Output of every process goes to files under the work folder; `Processes.report()` gives the tails
for failure messages."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from typing_extensions import Self

T = TypeVar("T")

MADDR_LINE = re.compile(r"^/ip[46]/\S+/tcp/\d+/p2p/\w+$")


class WaitTimeout(AssertionError):
    """A condition did not hold in time."""


def wait_for(
    condition: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.25,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll `condition` until it returns a truthy value (returned) or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() >= deadline:
            extra = f"\n{describe()}" if describe else ""
            raise WaitTimeout(
                f"timed out after {timeout_s:g} s waiting for {what}; last value: {last!r}{extra}"
            )
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    #: the exit code once reaped
    returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@dataclass
class Processes:
    """Every process a test starts; `close()` kills them all (their whole process groups)."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        out = self.workdir / f"{name}.out"
        err = self.workdir / f"{name}.err"
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            popen = subprocess.Popen(
                list(argv),
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=self.workdir,
                start_new_session=True,  # own process group: killing it takes the p2p daemon along
            )
        proc = Proc(name, list(argv), popen, out, err)
        self.procs.append(proc)
        return proc

    def signal(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        """Signal the process itself (a graceful stop: it shuts its own children down)."""
        if proc.alive():
            proc.popen.send_signal(sig)

    def kill(self, proc: Proc) -> None:
        """Crash the process and everything it started (SIGKILL to its process group)."""
        _kill_group(proc.pid, signal.SIGKILL)
        self.wait(proc, 10)

    def wait(self, proc: Proc, timeout_s: float) -> int:
        proc.returncode = proc.popen.wait(timeout=timeout_s)
        return proc.returncode

    def close(self) -> None:
        for proc in self.procs:
            _kill_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass  # SIGKILL below
            _kill_group(proc.pid, signal.SIGKILL)  # leftovers in the group (the p2p daemon)
            if proc.popen.poll() is None:
                proc.popen.wait(timeout=5)
            proc.returncode = proc.popen.returncode

    def report(self, tail_lines: int = 40) -> str:
        parts = []
        for proc in self.procs:
            lines = [line for line in proc.stderr().splitlines() if "DEBUG" not in line]
            state = "running" if proc.alive() else f"exited {proc.popen.returncode}"
            parts.append(f"--- {proc.name} ({state}) stderr, last {tail_lines} lines:")
            parts += lines[-tail_lines:]
        return "\n".join(parts)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group id is the leader's pid (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


# ------------------------------------------------------------------------------------------ commands


def bootstrap_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "helix_p2p.bootstrap", *extra]


def node_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "helix_p2p.node", *extra]


@dataclass
class Bootstrap:
    proc: Proc
    maddrs: list[str]
    join_line: str


def start_bootstrap(
    procs: Processes, *, name: str = "bootstrap", port: int = 0, identity: Path | None = None, swarm: str = "helix",
    timeout_s: float = 60, extra: Sequence[str] = (),
) -> Bootstrap:  # fmt: skip
    """Start `helix-bootstrap` on 127.0.0.1 and wait for the addresses it prints."""
    args = ["--host", "127.0.0.1", "--port", str(port), "--swarm", swarm]
    args += ["--identity", str(identity or procs.workdir / f"{name}.key"), *extra]
    proc = procs.start(name, bootstrap_argv(*args))

    def printed() -> Bootstrap | None:
        lines = proc.stdout().splitlines()
        maddrs = [line for line in lines if MADDR_LINE.match(line)]
        joins = [line for line in lines if line.startswith("helix-node join")]
        if not proc.alive():
            raise AssertionError(
                f"bootstrap exited early ({proc.popen.returncode}):\n{proc.stderr()[-3000:]}"
            )
        return Bootstrap(proc, maddrs, joins[0]) if maddrs and joins else None

    return wait_for(printed, timeout_s, "the bootstrap to print its addresses", describe=procs.report)


#: timings that keep multi-process tests fast (seconds): records live 8 s, refresh every 2 s
FAST = {"--ttl-s": "8", "--connect-timeout-s": "20", "--probe-period-s": "3", "--probe-bytes": "65536"}


def start_node(
    procs: Processes,
    name: str,
    initial_peers: Sequence[str],
    model: Path | str,
    tokens_per_s: Sequence[float],
    *extra: str,
    swarm: str = "helix",
    timings: dict[str, str] | None = None,
) -> Proc:
    """Start `helix-node join` on 127.0.0.1 with a throughput table written to a file."""
    table = procs.workdir / f"{name}.throughput.json"
    table.write_text(json.dumps(list(tokens_per_s)))
    args = ["join", "--initial-peers", *initial_peers, "--model", str(model), "--throughput", str(table)]
    args += ["--host", "127.0.0.1", "--swarm", swarm, "--public-name", name, "--device", "cpu"]
    for flag, value in (FAST if timings is None else timings).items():
        args += [flag, value]
    return procs.start(name, node_argv(*args, *extra))


# ---------------------------------------------------------------------------------------- observer


class SwarmObserver:
    """A DHT peer in the test process (client mode), run by its own event loop in a thread."""

    def __init__(
        self, initial_peers: Sequence[str], prefix: str = "helix", identity_path: Path | None = None,
        swarm_key: Path | None = None,
    ) -> None:  # fmt: skip
        from helix_p2p.swarm.dht import NetworkOptions, SwarmDHT
        from helix_p2p.swarm.identity import ephemeral_identity, load_identity
        from helix_p2p.swarm.swarm_key import load_swarm_key

        self.identity = load_identity(identity_path) if identity_path else ephemeral_identity()
        self._own_identity_file = identity_path is None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarm-observer", daemon=True)
        self._thread.start()
        options = NetworkOptions(
            host="127.0.0.1", client_mode=True, connect_timeout_s=20, check_identity_free=False,
            swarm_key=None if swarm_key is None else load_swarm_key(swarm_key),
        )  # fmt: skip
        self.dht = self.run(SwarmDHT.start(self.identity, prefix, list(initial_peers), options), timeout_s=60)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout_s)

    def read(self):
        """(registry {peer_id: NodeRecord}, [SignedPlan]) as the swarm has them now."""
        return self.run(self.dht.read())

    def followed_plan(self, model_id: str):
        """The plan a node with this view follows: the newest from the elected planner, or None."""
        return self._followed(model_id, *self.read())

    @staticmethod
    def _followed(model_id: str, records, plans):
        from helix_p2p.swarm.election import choose_plan, elect_planner

        elected = elect_planner(records, time.time(), model_id)
        return choose_plan([p.record for p in plans], elected, None, model_id)

    def served_plan(self, model_id: str, *, min_placed: int = 1, names: set[str] | None = None):
        """The followed plan once it places at least `min_placed` nodes (exactly the nodes named
        `names`, when given) and every one of them serves exactly its planned layers; else None."""
        records, plans = self.read()
        plan = self._followed(model_id, records, plans)
        if plan is None or len(plan.placement) < min_placed:
            return None
        if names is not None and {records[p].name for p in plan.placement if p in records} != names:
            return None
        for peer, span in plan.placement.items():
            r = records.get(peer)
            if r is None or r.layers != span or r.state.value != "serving":
                return None
        return plan

    def close(self) -> None:
        try:
            self.run(self.dht.shutdown(), timeout_s=15)
            self.run(_cancel_other_tasks(), timeout_s=15)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if self._own_identity_file and self.identity.path.exists():
                self.identity.path.chmod(0o600)
                self.identity.path.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _cancel_other_tasks() -> None:
    """hivemind leaves background tasks (cache refresh) behind on shutdown; end them quietly."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
