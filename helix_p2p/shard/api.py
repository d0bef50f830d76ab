"""The typed records that cross a shard's boundary: what to load (`ShardSpec`), a session's step
in (`StepRequest`) and out (`StepResult`), and what a session holds (`SessionInfo`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

import torch

SessionId = NewType("SessionId", str)


@dataclass(frozen=True)
class ShardSpec:
    """What to load: layers [start, end) of the checkpoint at `model_path`, and how to run them."""

    model_path: str
    start: int
    end: int
    #: float32, bfloat16 or float16 (also fp32, bf16, fp16)
    dtype: str = "float32"
    #: cpu, cuda or cuda:N
    device: str = "cpu"
    #: sdpa or eager (the attention functions of `transformers`)
    attn_implementation: str = "sdpa"
    #: the most session positions the shard reserves KV for, summed over open sessions; None: no cap
    max_kv_tokens: int | None = None
    #: prompts longer than this are prefilled in chunks of this many tokens
    max_chunk_tokens: int = 512
    #: rows are packed into one forward up to this many (padded) tokens
    max_batch_tokens: int = 4096
    #: a forward pads every row to its longest; rows join it while padded tokens stay within this
    #: factor of real ones (so one prompt does not drag fifteen 1-token decodes to its length)
    max_padding_ratio: float = 1.25
    #: a session untouched this long is closed and its KV freed
    idle_timeout_s: float = 300.0


@dataclass(frozen=True)
class StepRequest:
    """One session's step: `token_ids` [n] when the session's layers start at layer 0, else
    `hidden_states` [n, hidden] in the shard's dtype. The shard holding the head may also be given
    the `token_ids` of those positions (needed when the session samples with a repetition penalty)."""

    session_id: str
    token_ids: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    #: absolute position of the first token; None continues the session. Less than the session's
    #: length rewinds it (its later positions are dropped); more is a gap and is refused.
    position: int | None = None
    #: the layer range the caller expects this shard to run; None trusts the session's
    layers: tuple[int, int] | None = None
    #: also return fp32 logits for every position (only where the session ends at the last layer)
    return_logits: bool = False

    @property
    def num_tokens(self) -> int:
        x = self.token_ids if self.token_ids is not None else self.hidden_states
        return 0 if x is None or x.ndim == 0 else int(x.shape[0])


@dataclass(frozen=True)
class StepResult:
    """What a step produced: hidden states for the next shard, or the sampled next token."""

    session_id: str
    #: the absolute position of the step's first token
    position: int
    num_tokens: int
    #: [n, hidden] in the shard's dtype, for the next shard; None where the session ends here
    hidden_states: torch.Tensor | None = None
    #: the next token, sampled from the last position's logits, where the session ends here
    token_id: int | None = None
    #: [n, vocab] fp32, when asked for
    logits: torch.Tensor | None = None
    #: the token is a stop token, or the session has no room for another position
    finished: bool = False


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    layers: tuple[int, int]
    max_length: int
    #: positions [0, length) are in the KV cache
    length: int
    kv_bytes: int
    idle_s: float
