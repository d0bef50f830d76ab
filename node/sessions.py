"""Admission of inference sessions, so that leaving can stop new ones and let running ones finish.
The serving path takes a slot per session (`admit` / `finish`); `close` stops admissions and
`drain` waits, up to a grace period, for the running ones."""

from __future__ import annotations

import asyncio


class SessionGate:
    def __init__(self) -> None:
        self._running = 0
        self._open = True
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def running(self) -> int:
        return self._running

    @property
    def is_open(self) -> bool:
        return self._open

    def admit(self) -> bool:
        """Take a slot for a new session; False once the node is leaving."""
        if not self._open:
            return False
        self._running += 1
        self._idle.clear()
        return True

    def finish(self) -> None:
        if self._running <= 0:
            raise RuntimeError("SessionGate.finish without a matching admit")
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    def close(self) -> None:
        self._open = False

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for running sessions to finish; returns how many are still running."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        except asyncio.TimeoutError:
            pass
        return self._running
