"""Keep hivemind's p2p daemon alive through a terminal's Ctrl-C, so the peer can still say goodbye.

A terminal sends SIGINT to its whole foreground process group, and the p2p daemon (a child process
hivemind starts) is in that group. Left to itself the daemon dies at once, before the node can
announce `leaving` through it. A disposition of SIG_IGN is the one signal setting a child inherits
across exec, and Go programs keep an inherited SIG_IGN for SIGINT, so while the daemon is being
started SIGINT is ignored; the peer stops the daemon itself (SIGTERM) once it has left. The caller
must therefore handle SIGINT (install its handler before) and always shut its DHT down.

During that window (starting the DHT: seconds) SIGINT is also blocked in this thread, so a Ctrl-C
then stays pending and reaches the caller's handler when the window closes, instead of being lost.
(Another thread of this process could still take and drop it; a second Ctrl-C then works.)"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def daemon_survives_ctrl_c() -> Iterator[None]:
    """Child processes started inside this block ignore SIGINT; on the way out the previous
    handler is back and a Ctrl-C that came meanwhile is delivered to it. Only in the main thread
    (the only one that may set signal handlers); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    if previous is None:  # a handler set outside Python: the default is the closest we can restore
        previous = signal.SIG_DFL
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
