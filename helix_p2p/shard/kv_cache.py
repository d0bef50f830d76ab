"""Keys and values of a shard's held layers, per session, and the view of several sessions that one
batched forward sees.

Each session owns preallocated tensors of `max_length` positions (the node reserves them when the
session opens, so admission control is a sum of max lengths). A batched forward wraps the sessions
of its rows in a `BatchKV`; the decoder layers of `transformers` call `update(key_states,
value_states, layer_idx)` on it (the only cache method they call), which writes each row's new
positions into its own session and returns the keys and values the attention reads: a view for a
single session, a padded copy for several. Positions a row has not written are zeros, and the
shard's mask hides them; zeros rather than `empty` because a masked NaN would still poison softmax."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SessionKV:
    """One session's KV cache for `num_layers` consecutive layers starting at global layer `first_layer`."""

    def __init__(
        self,
        *,
        first_layer: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_kv_heads, max_length, head_dim)
        self.first_layer = first_layer
        self.max_length = max_length
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        #: positions [0, length) hold valid keys and values
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def write(self, layer_idx: int, position: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store `keys`/`values` ([kv_heads, n, head_dim]) of layer `layer_idx` at positions
        [position, position + n)."""
        n = keys.shape[1]
        layer = layer_idx - self.first_layer
        self.keys[layer, :, position : position + n] = keys
        self.values[layer, :, position : position + n] = values

    def read(self, layer_idx: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) of one layer, as views."""
        layer = layer_idx - self.first_layer
        return self.keys[layer, :, :length], self.values[layer, :, :length]


@dataclass
class BatchRow:
    """One row of a batched forward: a session, where its new tokens start, and how many there are."""

    kv: SessionKV
    position: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.position + self.num_tokens


class BatchKV:
    """The cache object handed to the decoder layers for one forward over several sessions."""

    def __init__(self, rows: list[BatchRow]) -> None:
        self.rows = rows
        #: keys are gathered up to the longest row; shorter rows' extra positions are masked
        self.kv_length = max(row.end for row in rows)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by each attention layer with the new keys/values [batch, kv_heads, tokens, head_dim];
        returns the keys/values to attend over [batch, kv_heads, kv_length, head_dim]."""
        for b, row in enumerate(self.rows):
            n = row.num_tokens
            row.kv.write(layer_idx, row.position, key_states[b, :, :n], value_states[b, :, :n])
        if len(self.rows) == 1:
            keys, values = self.rows[0].kv.read(layer_idx, self.kv_length)
            return keys.unsqueeze(0), values.unsqueeze(0)
        batch, heads, _, dim = key_states.shape
        keys = key_states.new_zeros(batch, heads, self.kv_length, dim)
        values = value_states.new_zeros(batch, heads, self.kv_length, dim)
        for b, row in enumerate(self.rows):
            keys[b, :, : row.end], values[b, :, : row.end] = row.kv.read(layer_idx, row.end)
        return keys, values
