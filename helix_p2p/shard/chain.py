"""Shards run one after another in one process: the pipeline of a swarm without the network.

Tests use it to check a split model against the whole one, benchmarks to price the split, and the
demo to run a model on one machine. Each step passes the hidden states of shard i to shard i+1, as
a node passes them to the next hop."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from helix_p2p.shard.api import SessionInfo, StepRequest, StepResult
from helix_p2p.shard.errors import LayerRangeError
from helix_p2p.shard.runner import Shard
from helix_p2p.shard.sampling import SamplingParams


class LocalChain:
    """Shards whose ranges tile [0, num_layers) in order."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        if not shards:
            raise LayerRangeError("a chain needs at least one shard")
        expected = 0
        for shard in shards:
            if shard.start != expected:
                raise LayerRangeError(
                    f"shards must tile the layers in order: expected one starting at {expected}, got [{shard.start}, {shard.end})"
                )
            expected = shard.end
        if expected != shards[0].num_model_layers:
            raise LayerRangeError(
                f"the shards end at layer {expected}, the model has {shards[0].num_model_layers}"
            )
        self.shards = list(shards)

    def open_session(
        self, session_id: str, max_length: int, sampling: SamplingParams | None = None
    ) -> SessionInfo:
        info = None
        for shard in self.shards:
            info = shard.open_session(session_id, max_length, sampling if shard is self.shards[-1] else None)
        assert info is not None
        return info

    def close_session(self, session_id: str) -> None:
        for shard in self.shards:
            shard.close_session(session_id)

    def step_batch(
        self,
        inputs: Sequence[tuple[str, torch.Tensor]],
        *,
        positions: Sequence[int | None] | None = None,
        return_logits: bool = False,
    ) -> list[StepResult]:
        """Feed each session's token ids [n] through every shard; the last shard's results.
        `positions` (one per input, None continues) rewinds sessions, as a replay does."""
        where = list(positions) if positions is not None else [None] * len(inputs)
        single = len(self.shards) == 1
        results = self.shards[0].step_batch(
            [
                StepRequest(sid, token_ids=ids, position=pos, return_logits=return_logits and single)
                for (sid, ids), pos in zip(inputs, where)
            ]
        )
        for i, shard in enumerate(self.shards[1:], start=1):
            last = i == len(self.shards) - 1
            requests = [
                StepRequest(
                    r.session_id,
                    hidden_states=r.hidden_states,
                    # the head's shard is given the ids too, for the repetition penalty's history
                    token_ids=ids if last else None,
                    position=pos,
                    return_logits=return_logits and last,
                )
                for r, (_, ids), pos in zip(results, inputs, where)
            ]
            results = shard.step_batch(requests)
        return results

    def step(self, session_id: str, token_ids: torch.Tensor, *, return_logits: bool = False) -> StepResult:
        return self.step_batch([(session_id, token_ids)], return_logits=return_logits)[0]

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        session_id: str = "generate",
    ) -> list[int]:
        """The new tokens for one prompt (prefill, then one decode step per token), stopping after a
        stop token or `max_new_tokens`."""
        self.open_session(session_id, len(prompt_ids) + max_new_tokens, sampling)
        try:
            tokens: list[int] = []
            result = self.step(session_id, torch.tensor(list(prompt_ids), dtype=torch.long))
            while True:
                assert result.token_id is not None
                tokens.append(result.token_id)
                if result.finished or len(tokens) == max_new_tokens:
                    return tokens
                result = self.step(session_id, torch.tensor([result.token_id], dtype=torch.long))
        finally:
            self.close_session(session_id)
