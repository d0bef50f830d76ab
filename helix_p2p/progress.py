"""Progress for long work (loading weights, profiling, planning, the demo's waits): a tqdm bar on
stderr when stderr is a terminal, nothing at all otherwise, so logs, pipes and captured test output
stay clean. Work that ends within `SHOW_AFTER_S` shows no bar either (a tiny model loads in
milliseconds; a bar flashing by is noise).

Callers hold a `tqdm` (disabled bars accept every call and do nothing), and pass the profiler-style
callback `step_callback(bar)` where a library reports `(what, done, total)`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

#: a bar appears only once the work has taken this long
SHOW_AFTER_S = 0.5


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream: not a terminal
        return False


def progress_bar(
    desc: str,
    total: float | None = None,
    *,
    unit: str = "it",
    stream: TextIO | None = None,
    show_after_s: float = SHOW_AFTER_S,
    **options: Any,
) -> tqdm:
    """A bar on `stream` (stderr) if it is a terminal, else a disabled one. `total=None` gives a
    spinner-like counter; `leave=False` by default so that finished bars do not pile up."""
    stream = sys.stderr if stream is None else stream
    options.setdefault("leave", False)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        disable=not on_terminal(stream),
        delay=show_after_s,
        dynamic_ncols=True,
        **options,
    )


def track(items: Iterable[T], desc: str, total: int | None = None, *, unit: str = "it") -> Iterator[T]:
    """Iterate over `items` with a bar (on a terminal, for work longer than `SHOW_AFTER_S`)."""
    with progress_bar(desc, total, unit=unit) as bar:
        for item in items:
            yield item
            bar.update()


def step_callback(bar: tqdm) -> Callable[[str, int, int], None]:
    """A `(what, done, total)` callback (the profiler's) that moves `bar` to `done` of `total`."""

    def advance(what: str, done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.set_postfix_str(what, refresh=False)
        bar.update(done - bar.n)

    return advance


def advance_to(bar: tqdm, done: float, note: str | None = None) -> None:
    """Move `bar` to `done` (it may only go forward) and show `note` after it."""
    if note is not None:
        bar.set_postfix_str(note, refresh=False)
    if done > bar.n:
        bar.update(done - bar.n)
    else:
        bar.refresh()
