"""What splitting a model into shards costs, and what batching buys.

    python benchmarks/shard.py                      # CPU: 8 layers x 1024 hidden, fp32 (~2 minutes)
    python benchmarks/shard.py --preset llama3-8b --device cuda:0   # GPU: Llama-3-8B shape, bf16

Two tables, with ratios against a baseline measured in the same run:
1. the split: decode and prefill tokens/s of a 4-shard chain in one process (hidden states handed
   from shard to shard as a node hands them to the next hop) against the same runner holding the
   whole model in one shard, at batch 1 and 16 (target: the split costs under 5%); and the whole
   `transformers` model on the same work, stepped as `generate` steps it (its own forward and
   DynamicCache, logits of the last position only), as the reference for the runner itself;
2. batching: decode tokens/s of the 4-shard chain at batch 1, 4, 16, 64, against batch 1.

The random checkpoint is written once (default: a temp folder) with the code path of
`helix make-model`. Each figure is the best of --repeats timed runs after a warm-up, and in
table 1 the three sides take turns run by run: on a shared machine the fastest run is the one
least disturbed by other processes, and taking turns spreads what disturbance there is over all
sides alike. Decode runs rewind their sessions to the end of the prompt (the runner's replay; a
copy of the prefilled cache for `transformers`), so prompts are prefilled once, untimed."""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from helix_p2p.shard import LocalChain, Shard, ShardSpec, TinyModelSpec, load_shard, make_tiny_model

PRESETS: dict[str, TinyModelSpec] = {
    # about 156M parameters: 8 Llama layers of 1024 (GQA 16/4 heads), a 32k vocabulary
    "cpu-small": TinyModelSpec(
        family="llama", num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=4, intermediate_size=2816,
        vocab_size=32000, max_shard_size="2GB",
    ),
    # the shape of Llama-3-8B (random weights), for a GPU
    "llama3-8b": TinyModelSpec(
        family="llama", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, intermediate_size=14336,
        vocab_size=128256, max_position_embeddings=8192, dtype="bfloat16", max_shard_size="5GB",
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
}  # fmt: skip


class Side:
    """Work that can be timed again and again: `prepare` (untimed), then `run` (timed)."""

    def prepare(self) -> None:
        pass

    def run(self) -> None:
        raise NotImplementedError


def prompts(batch: int, length: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    return torch.randint(3, vocab, (batch, length), generator=g)


class RunnerDecode(Side):
    """`batch` sessions on a chain, prefilled once; each run rewinds them to the end of the prompt
    and decodes `steps` tokens for all of them together."""

    def __init__(self, chain: LocalChain, ids: torch.Tensor, steps: int) -> None:
        self.chain, self.steps = chain, steps
        self.batch, self.prompt_len = ids.shape
        self.sids = [f"decode-b{self.batch}-{i}" for i in range(self.batch)]
        for sid in self.sids:
            chain.open_session(sid, self.prompt_len + steps + 1)
        self.first = chain.step_batch(list(zip(self.sids, ids)))

    def run(self) -> None:
        results, positions = self.first, [self.prompt_len] * self.batch
        for _ in range(self.steps):
            inputs = [(sid, torch.tensor([r.token_id])) for sid, r in zip(self.sids, results)]
            results = self.chain.step_batch(inputs, positions=positions)
            positions = [None] * self.batch

    def close(self) -> None:
        for sid in self.sids:
            self.chain.close_session(sid)


class RunnerPrefill(RunnerDecode):
    def __init__(self, chain: LocalChain, ids: torch.Tensor) -> None:
        super().__init__(chain, ids, steps=0)
        self.ids = ids

    def run(self) -> None:
        self.chain.step_batch(list(zip(self.sids, self.ids)), positions=[0] * self.batch)


class TransformersDecode(Side):
    """The whole model stepped as `generate` steps it: forward with a DynamicCache, the last
    position's logits, argmax."""

    def __init__(self, model: PreTrainedModel, ids: torch.Tensor, steps: int) -> None:
        self.model, self.steps = model, steps
        device = next(model.parameters()).device
        with torch.inference_mode():
            self.prefilled = DynamicCache(config=model.config)
            logits = model(
                ids.to(device), past_key_values=self.prefilled, use_cache=True, logits_to_keep=1
            ).logits
        self.first = logits[:, -1].argmax(-1, keepdim=True)

    def prepare(self) -> None:
        self.cache = copy.deepcopy(self.prefilled)

    def run(self) -> None:
        tokens = self.first
        with torch.inference_mode():
            for _ in range(self.steps):
                logits = self.model(
                    tokens, past_key_values=self.cache, use_cache=True, logits_to_keep=1
                ).logits
                tokens = logits[:, -1].argmax(-1, keepdim=True)


class TransformersPrefill(Side):
    def __init__(self, model: PreTrainedModel, ids: torch.Tensor) -> None:
        self.model, self.ids = model, ids.to(next(model.parameters()).device)

    def run(self) -> None:
        with torch.inference_mode():
            self.model(
                self.ids,
                past_key_values=DynamicCache(config=self.model.config),
                use_cache=True,
                logits_to_keep=1,
            )


#: wall: seconds on the clock; cpu: CPU seconds of this process (all its threads), which other
#: processes on a shared machine disturb far less (CPU runs only; a GPU's time is not counted)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def best_times_s(
    sides: dict[str, Side], repeats: int, device: torch.device, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """The fastest of `repeats` runs of each side, after one warm-up each; sides take turns."""
    best = {name: float("inf") for name in sides}
    for round_ in range(repeats + 1):
        for name, side in sides.items():
            side.prepare()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = clock()
            side.run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                best[name] = min(best[name], clock() - start)
    return best


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", help="default: the preset's (float32 on cpu-small, bfloat16 for llama3-8b)"
    )
    parser.add_argument(
        "--model-dir", type=Path, help="where the random checkpoint is kept (reused if present)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the best is kept)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per session")
    parser.add_argument("--steps", type=int, default=4, help="decode steps timed per run")
    parser.add_argument("--batches", default="1,4,16,64", help="batch sizes of the batching table")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall (default) or cpu: tokens per CPU-second of this process, steadier on a shared CPU machine",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    spec = PRESETS[args.preset]
    dtype = args.dtype or spec.dtype
    root = args.model_dir or Path(tempfile.gettempdir()) / f"helix-bench-{args.preset}"
    if not (root / "config.json").is_file():
        print(f"writing a random {args.preset} checkpoint to {root} ...", file=sys.stderr)
        make_tiny_model(root, spec)
    device = torch.device(args.device)
    layers = spec.num_layers
    cut = [round(i * layers / 4) for i in range(5)]

    def shard(a: int, b: int) -> Shard:
        return load_shard(
            ShardSpec(str(root), a, b, dtype=dtype, device=args.device, max_batch_tokens=1 << 16)
        )

    whole = LocalChain([shard(0, layers)])
    split = LocalChain([shard(a, b) for a, b in itertools.pairwise(cut)])
    hf = AutoModelForCausalLM.from_pretrained(root, dtype=getattr(torch, dtype)).to(device).eval()
    print(
        f"# shard benchmark: {args.preset} ({layers} layers x {spec.hidden_size} hidden, vocab {spec.vocab_size}), "
        f"{dtype} on {args.device}, {torch.get_num_threads()} CPU threads; prompt {args.prompt} tokens, "
        f"{args.steps} decode steps per run, best of {args.repeats} by the {args.clock} clock; "
        f"load average {os.getloadavg()[0]:.1f} at the start; "
        f"split {', '.join(f'[{a}, {b})' for a, b in itertools.pairwise(cut))}"
    )

    rows = []
    for phase in ("decode", "prefill"):
        for batch in (1, 16):
            ids = prompts(batch, args.prompt, spec.vocab_size)
            if phase == "decode":
                sides: dict[str, Side] = {
                    "whole": RunnerDecode(whole, ids, args.steps),
                    "split": RunnerDecode(split, ids, args.steps),
                    "hf": TransformersDecode(hf, ids, args.steps),
                }
                tokens = batch * args.steps
            else:
                sides = {
                    "whole": RunnerPrefill(whole, ids),
                    "split": RunnerPrefill(split, ids),
                    "hf": TransformersPrefill(hf, ids),
                }
                tokens = batch * args.prompt
            tps = {
                name: tokens / s
                for name, s in best_times_s(sides, args.repeats, device, CLOCKS[args.clock]).items()
            }
            for side in sides.values():
                if isinstance(side, RunnerDecode):
                    side.close()
            rows.append(
                [phase, str(batch), f"{tps['hf']:.1f}", f"{tps['whole']:.1f}", f"{tps['split']:.1f}",
                 f"{tps['split'] / tps['whole']:.3f}", f"{tps['whole'] / tps['hf']:.3f}"]
            )  # fmt: skip
    table(
        "## 1. The split: tokens/s of 4 shards chained in one process vs the whole model in one shard",
        [
            "phase",
            "batch",
            "transformers",
            "runner, 1 shard",
            "runner, 4 shards",
            "4 / 1 shard",
            "1 shard / transformers",
        ],
        rows,
    )

    rows = []
    base = None
    for batch in (int(b) for b in args.batches.split(",")):
        side = RunnerDecode(split, prompts(batch, args.prompt, spec.vocab_size), args.steps)
        tps = (
            batch
            * args.steps
            / best_times_s({"split": side}, args.repeats, device, CLOCKS[args.clock])["split"]
        )
        side.close()
        base = base or tps
        rows.append([str(batch), f"{tps:.1f}", f"{tps / batch:.2f}", f"{tps / base:.2f}"])
    table(
        "## 2. Batching: decode tokens/s of the 4-shard chain",
        ["batch", "tokens/s", "tokens/s per session", "vs batch 1"],
        rows,
    )
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
