"""The layers a node holds: loading what the plan assigns, make before break.

Loading is one call behind `LayerLoader` (the shard library's `load_shard` in production), run in
a worker thread so the node keeps announcing and answering the DHT meanwhile. When a new plan moves
the node, the old layers keep serving until the new ones are loaded; only then does the node
switch and drop the old ones (sessions still holding the old shard finish on it; it is freed when
the last reference goes)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from helix_p2p.errors import HelixError

logger = logging.getLogger(__name__)

Span = tuple[int, int]


class LayerLoader(Protocol):
    def load(self, start: int, end: int) -> Any:
        """Load layers [start, end); blocking; returns a handle to them."""

    def release(self, handle: Any) -> None:
        """Drop a handle returned by `load`."""

    def free_kv_tokens(self, handle: Any) -> int:
        """KV positions the loaded layers can still give to new sessions."""


@dataclass
class ShardLoader:
    """Loads a range with `helix_p2p.shard.load_shard`, its KV cache sized to what memory is left
    after the weights."""

    model_path: str
    device: str
    dtype: str
    memory_bytes: int

    def __post_init__(self) -> None:
        from helix_p2p.shard import open_checkpoint

        self._config = open_checkpoint(self.model_path).config

    def kv_tokens_for(self, start: int, end: int) -> int:
        from helix_p2p.shard import kv_bytes_per_token_per_layer, shard_weight_bytes

        weights = shard_weight_bytes(self._config, self.dtype, start, end)
        per_token = (end - start) * kv_bytes_per_token_per_layer(self._config, self.dtype)
        return max(0, int((self.memory_bytes - weights) // per_token))

    def load(self, start: int, end: int) -> Any:
        from helix_p2p.shard import ShardSpec, load_shard

        spec = ShardSpec(
            model_path=self.model_path,
            start=start,
            end=end,
            dtype=self.dtype,
            device=self.device,
            max_kv_tokens=self.kv_tokens_for(start, end),
        )
        return load_shard(spec)

    def release(self, handle: Any) -> None:
        del handle
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def free_kv_tokens(self, handle: Any) -> int:
        free = handle.free_kv_tokens
        return 0 if free is None else max(0, int(free))


class LayerHost:
    """Holds at most one loaded range (plus, while switching, the next one being loaded)."""

    def __init__(self, loader: LayerLoader, on_change: Callable[[], None]) -> None:
        self.loader = loader
        self.on_change = on_change
        self.served: Span | None = None
        self.loading: Span | None = None
        self.handle: Any = None
        self.target: Span | None = None
        #: the last range that failed to load, and why
        self.failed: tuple[Span, str] | None = None
        self._changed = asyncio.Event()

    def set_target(self, target: Span | None) -> None:
        if target != self.target:
            self.target = target
            self._changed.set()

    def free_kv_tokens(self) -> int:
        return 0 if self.handle is None else self.loader.free_kv_tokens(self.handle)

    async def run(self) -> None:
        """Follow `target` forever (cancel to stop)."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            target = self.target
            if target == self.served:
                continue
            if target is None:
                old, self.handle, self.served = self.handle, None, None
                logger.info("released layers: the plan gives this node none")
                self.on_change()
                await asyncio.to_thread(self.loader.release, old)
                continue
            await self._switch_to(target)

    async def _switch_to(self, target: Span) -> None:
        self.loading = target
        self.on_change()
        logger.info(
            "loading layers [%d, %d)%s",
            *target,
            f" while serving [{self.served[0]}, {self.served[1]})" if self.served else "",
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            handle = await asyncio.to_thread(self.loader.load, *target)
        except (HelixError, OSError, RuntimeError, ValueError) as e:
            # RuntimeError covers torch's out-of-memory; the node keeps what it had.
            self.loading = None
            self.failed = (target, str(e))
            logger.error("could not load layers [%d, %d): %s", *target, e)
            self.on_change()
            return
        old = self.handle
        self.handle, self.served, self.loading, self.failed = handle, target, None, None
        logger.info("serving layers [%d, %d) (loaded in %.1f s)", *target, loop.time() - started)
        self.on_change()
        if old is not None:
            await asyncio.to_thread(self.loader.release, old)

    async def close(self) -> None:
        old, self.handle, self.served = self.handle, None, None
        if old is not None:
            await asyncio.to_thread(self.loader.release, old)
