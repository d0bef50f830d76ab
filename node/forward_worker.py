"""One long-lived thread that runs a shard's forwards for the event loop, handed each job through a
queue and answering through `loop.call_soon_threadsafe`.

`asyncio.to_thread` does the same through the loop's default executor, at a higher price per call:
a copied context, a work item, a `concurrent.futures` future chained to an asyncio one through
callbacks and locks, in a pool shared with everything else the process hands to threads. A decode
step pays the hand-off once per hop, so its cost is part of every token's latency; here it is a
queue put, one wake-up and one callback (on an idle 2-core machine about 30 us against 65 us; the
wake-ups, not the bookkeeping, are what a loaded machine makes expensive, and only running inline
avoids those: `node.serving`). Jobs run one at a time in submission order, as the shard's lock
would serialize them anyway."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class ForwardWorker:
    """`await worker.run(fn, *args)` runs `fn(*args)` on the worker thread and returns its result
    (or raises its exception). A caller that is cancelled stops waiting; the job still finishes on
    the thread, as with `asyncio.to_thread`. `close()` lets queued jobs finish, then ends the thread."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError(f"the forward worker {self._thread.name} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, args, loop, future))
        return await future

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._jobs.put(None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, loop, future = job
            try:
                result, error = fn(*args), None
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller, as to_thread does
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:
                pass  # the loop has closed: nobody is waiting for this answer any more


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
