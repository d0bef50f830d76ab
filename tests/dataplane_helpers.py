"""Shared by the data-plane tests and `benchmarks/swarm.py`: standalone servers (`serve_cmd`) as real
processes on 127.0.0.1, and a hivemind P2P client driven from synchronous code through an event loop
in a background thread."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from procs import MADDR_LINE, Proc, Processes, wait_for

T = TypeVar("T")


@dataclass
class Server:
    proc: Proc
    maddr: str
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.maddr.rsplit("/p2p/", 1)[1]


def serve_argv(model: Path | str, start: int, end: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "helix_p2p.node.serve_cmd", "--model", str(model),
            "--start", str(start), "--end", str(end), "--host", "127.0.0.1", *extra]  # fmt: skip


def start_servers(
    procs: Processes,
    model: Path | str,
    ranges: Sequence[tuple[int, int]],
    extra: Sequence[Sequence[str]] | None = None,
    timeout_s: float = 120,
) -> list[Server]:
    """One server per range; the first starts alone and is every other's initial peer."""
    extra = extra or [()] * len(ranges)
    first = procs.start("serve-0", serve_argv(model, *ranges[0], *extra[0]))
    maddr0 = _maddr(procs, first, timeout_s)
    rest = [
        procs.start(f"serve-{i}", serve_argv(model, *r, "--initial-peers", maddr0, *x))
        for i, (r, x) in enumerate(zip(ranges[1:], extra[1:]), start=1)
    ]
    maddrs = [maddr0] + [_maddr(procs, p, timeout_s) for p in rest]
    return [Server(p, m, *r) for p, m, r in zip([first, *rest], maddrs, ranges)]


def _maddr(procs: Processes, proc: Proc, timeout_s: float) -> str:
    def printed() -> str | None:
        if not proc.alive():
            raise AssertionError(
                f"{proc.name} exited early ({proc.popen.returncode}):\n{proc.stderr()[-3000:]}"
            )
        lines = [line for line in proc.stdout().splitlines() if MADDR_LINE.match(line)]
        return lines[0] if lines else None

    return wait_for(printed, timeout_s, f"{proc.name} to print its address", describe=procs.report)


class LoopThread:
    """An asyncio loop in a daemon thread, with a hivemind P2P instance created on it."""

    def __init__(self, initial_peers: Sequence[str]) -> None:
        from hivemind.p2p import P2P

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="p2p-client", daemon=True)
        self._thread.start()
        self.p2p: P2P = self.run(P2P.create(initial_peers=list(initial_peers)), timeout_s=60)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout_s)

    def close(self) -> None:
        try:
            self.run(self.p2p.shutdown(), timeout_s=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
