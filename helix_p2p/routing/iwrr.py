"""Interleaved weighted round-robin (IWRR) over one vertex's out-edges, weighted by the plan's flows.

Plain weighted round-robin sends whole rounds to one candidate before moving on; IWRR interleaves,
so that over any window each candidate's share of the *tokens* tracks its weight, and a long prompt
counts for more than a short one. We do it the way fair queueing does:

- every candidate i has a weight w_i (tokens/s of planned flow) and a served load L_i (tokens);
- a pick of `workload` tokens would finish candidate i at virtual time
  F_i = max(L_i / w_i, V) + workload / w_i, and we pick the smallest F_i;
- V, the virtual clock, is the smallest start time among the candidates that were eligible at the
  last pick. Lifting a candidate to V when it comes back (after it was masked out, e.g. its KV cache
  was full) stops it from claiming all the traffic it "missed" in one burst.

With every candidate always eligible, after N picks each L_i / w_i is within one workload of the
others, so the long-run split equals the weights. Ties (equal F_i) go by a permutation drawn from
the seed, so two runs with one seed pick the same sequence.

`order` ranks candidates without changing state and `commit` records a pick: a router can look
ahead (its first choice may lead to a dead end) and charge only the hop it finally takes."""

from __future__ import annotations

import random
from collections.abc import Sequence


class IWRR:
    def __init__(self, weights: Sequence[float], seed: int = 0) -> None:
        if any(not w >= 0 for w in weights):  # also rejects NaN
            raise ValueError(f"IWRR weights must be >= 0, got {list(weights)}")
        self.weights: tuple[float, ...] = tuple(float(w) for w in weights)
        #: tokens sent to each candidate so far
        self.served_tokens: list[float] = [0.0] * len(self.weights)
        self._virtual_start: list[float] = [0.0] * len(self.weights)  # L_i / w_i
        self._clock = 0.0
        ranks = list(range(len(self.weights)))
        random.Random(seed).shuffle(ranks)
        self._tie_rank = ranks

    def __len__(self) -> int:
        return len(self.weights)

    def _finish(self, i: int, workload: float) -> float:
        return max(self._virtual_start[i], self._clock) + workload / self.weights[i]

    def order(self, workload: float, eligible: Sequence[bool] | None = None) -> list[int]:
        """Eligible candidates with a positive weight, best first. Changes nothing."""
        candidates = [i for i, w in enumerate(self.weights) if w > 0 and (eligible is None or eligible[i])]
        candidates.sort(key=lambda i: (self._finish(i, workload), self._tie_rank[i]))
        return candidates

    def choose(self, workload: float, eligible: Sequence[bool] | None = None) -> int | None:
        """Pick and commit the best eligible candidate; None when none is eligible."""
        ranked = self.order(workload, eligible)
        if not ranked:
            return None
        self.commit(ranked[0], workload, eligible)
        return ranked[0]

    def commit(self, index: int, workload: float, eligible: Sequence[bool] | None = None) -> None:
        """Charge `workload` tokens to candidate `index` (which must have a positive weight)."""
        if not self.weights[index] > 0:
            raise ValueError(f"IWRR candidate {index} has weight 0 and cannot be picked")
        # Advance the clock to the earliest start among the eligible candidates before the pick;
        # it never moves back, so a candidate that sat out never accumulates credit.
        starts = [
            self._virtual_start[i]
            for i, w in enumerate(self.weights)
            if w > 0 and (eligible is None or eligible[i])
        ]
        if starts:
            self._clock = max(self._clock, min(starts))
        self._virtual_start[index] = self._finish(index, workload)
        self.served_tokens[index] += workload

    def shares(self) -> list[float]:
        """Fraction of all tokens served that went to each candidate."""
        total = sum(self.served_tokens)
        return [s / total if total > 0 else 0.0 for s in self.served_tokens]
