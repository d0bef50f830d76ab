"""Workloads: request lengths and arrival times from the Azure conversation trace, sampled the way
Helix samples them (data/helix/traces/azure_conv_summary.json, "how_helix_uses_them"):

- lengths: (input, output) pairs drawn i.i.d. and uniformly from the 16,657 pairs;
- online arrivals at a target rate: the target tokens/s becomes requests/s by dividing by the
  mean input + output length; each 3-second interval draws one of the trace's per-3-s request
  counts (i.i.d.), scaled so the counts average that rate; the fractional part carries over to
  the next interval, and the arrivals are spread uniformly inside their interval."""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from helix_p2p.data import TRACES_DIR
from helix_p2p.errors import HelixError

LENGTHS_CSV = "azure_conv_lengths.csv"
ARRIVALS_CSV = "azure_conv_arrivals_3s.csv"
BUCKET_S = 3.0


class TraceError(HelixError):
    pass


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def _read_csv(path: Path, columns: Sequence[str]) -> list[tuple[int, ...]]:
    try:
        with path.open(newline="") as f:
            return [tuple(int(row[c]) for c in columns) for row in csv.DictReader(f)]
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise TraceError(f"{path}: cannot read columns {', '.join(columns)}: {e}") from e


@lru_cache(maxsize=4)
def load_lengths(path: Path = TRACES_DIR / LENGTHS_CSV) -> tuple[tuple[int, int], ...]:
    """(input_tokens, output_tokens) pairs."""
    pairs = tuple((a, b) for a, b in _read_csv(path, ("input_tokens", "output_tokens")))
    if not pairs or any(a < 1 or b < 1 for a, b in pairs):
        raise TraceError(f"{path}: lengths must be positive and there must be at least one pair")
    return pairs


@lru_cache(maxsize=4)
def load_arrival_counts(path: Path = TRACES_DIR / ARRIVALS_CSV) -> tuple[int, ...]:
    """Requests per 3-s bucket."""
    counts = tuple(c for (c,) in _read_csv(path, ("requests",)))
    if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
        raise TraceError(f"{path}: counts must be >= 0 and not all zero")
    return counts


class LengthSampler:
    """I.i.d. uniform draws of (input, output) pairs, seeded."""

    def __init__(self, pairs: Sequence[tuple[int, int]], seed: int = 0) -> None:
        if not pairs:
            raise TraceError("no request lengths to sample from")
        self.pairs = tuple(pairs)
        self._rng = random.Random(seed)

    def draw(self) -> tuple[int, int]:
        return self.pairs[self._rng.randrange(len(self.pairs))]

    @property
    def mean_tokens(self) -> float:
        return sum(a + b for a, b in self.pairs) / len(self.pairs)


def online_arrivals(
    rate_tokens_per_s: float,
    duration_s: float,
    seed: int = 0,
    pairs: Sequence[tuple[int, int]] | None = None,
    counts: Sequence[int] | None = None,
) -> list[RequestSpec]:
    """Requests arriving in [0, duration_s) at a mean of `rate_tokens_per_s` (input + output)."""
    if not rate_tokens_per_s > 0 or not math.isfinite(rate_tokens_per_s):
        raise TraceError(f"the online rate must be a positive number of tokens/s, got {rate_tokens_per_s}")
    pairs = load_lengths() if pairs is None else pairs
    counts = load_arrival_counts() if counts is None else counts
    lengths = LengthSampler(pairs, seed)
    rng = random.Random(seed + 1)
    requests_per_s = rate_tokens_per_s / lengths.mean_tokens
    scale = BUCKET_S * requests_per_s / (sum(counts) / len(counts))
    out: list[RequestSpec] = []
    carry = 0.0
    start = 0.0
    while start < duration_s:
        expected = counts[rng.randrange(len(counts))] * scale + carry
        n = int(expected)
        carry = expected - n
        times = sorted(start + rng.random() * BUCKET_S for _ in range(n))
        for t in times:
            if t < duration_s:
                prompt, output = lengths.draw()
                out.append(RequestSpec(t, prompt, output))
        start += BUCKET_S
    return out
