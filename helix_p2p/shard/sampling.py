"""Choosing the next token on the shard that holds the LM head.

The logits pass through `transformers`' own processors in the order `generate` applies them
(repetition penalty, then temperature, top-k, top-p), so a session samples what `generate` would
sample from the same logits. Each session draws from its own `torch.Generator` seeded from its
`seed`: its tokens depend on nothing but its seed and its logits, never on which other sessions
shared the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from helix_p2p.shard.errors import SamplingError


@dataclass(frozen=True)
class SamplingParams:
    """How a session picks its tokens. `temperature == 0` is greedy (argmax)."""

    temperature: float = 0.0
    #: keep the k most likely tokens; 0 keeps all
    top_k: int = 0
    #: keep the smallest set of tokens whose probability reaches top_p; 1.0 keeps all
    top_p: float = 1.0
    #: > 1 discourages tokens already in the session (prompt and output), as in `generate`
    repetition_penalty: float = 1.0
    #: seed of the session's generator; None draws one from the OS (not reproducible)
    seed: int | None = None
    #: sampling one of these ends the session's generation (the step reports `finished`)
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise SamplingError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"
            )
        if any(t < 0 for t in self.stop_token_ids):
            raise SamplingError(f"stop token ids must be >= 0, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the session's previous token ids."""
        return self.repetition_penalty != 1.0

    def check_vocab(self, vocab_size: int) -> None:
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise SamplingError(f"stop token ids {bad} are outside the vocabulary (size {vocab_size})")


GREEDY = SamplingParams()


class Sampler:
    """One session's sampling state: its parameters, processors and random generator."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.processors: list[LogitsProcessor] = []
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not params.greedy:
            if params.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                self.processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(params.top_p))
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def sample(self, logits: torch.Tensor, history: torch.Tensor | None) -> int:
        """The next token from one position's logits [vocab]; `history` is the session's token ids
        so far (needed only with a repetition penalty)."""
        scores = logits.to(torch.float32).unsqueeze(0)
        input_ids = (
            history.unsqueeze(0)
            if history is not None
            else torch.zeros((1, 0), dtype=torch.long, device=scores.device)
        )
        for processor in self.processors:
            scores = processor(input_ids, scores)
        if self.generator is None:
            return int(torch.argmax(scores, dim=-1).item())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator).item())

    def is_stop(self, token_id: int) -> bool:
        return token_id in self.params.stop_token_ids
