"""What `--verify-rate` costs: decode tokens/s and time per generation with verification off, at
a sampling rate and on every step, on a real honest swarm on 127.0.0.1 (a bootstrap, one
`helix-node join` that can hold a whole tiny Llama and two that hold halves, so every range has a
second holder to compare with).

Prints one table; ratios are against verification off, measured in the same run. A verified step
recomputes the whole prefix on two holders per hop, so the cost grows with the sequence length.

    python benchmarks/verify.py [--tokens 32] [--rounds 3] [--rates 0 0.1 1]"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the process helpers the swarm tests use

from procs import Processes, SwarmObserver, start_bootstrap, start_node, wait_for

MODEL_ID = "bench-verify"
PROMPT = "the quick brown fox jumps over the lazy dog"
TABLES = {"whole": [900.0, 500.0, 300.0, 200.0], "front": [800.0, 450.0], "back": [700.0, 400.0]}


def start_swarm(procs: Processes, model: Path) -> list[str]:
    boot = start_bootstrap(procs)
    for name, table in TABLES.items():
        start_node(procs, name, boot.maddrs, model, table, "--planner-method", "petals")
    with SwarmObserver(boot.maddrs) as observer:

        def ready():
            plan = observer.followed_plan(MODEL_ID)
            if plan is None or len(plan.placement) < len(TABLES):
                return None
            records, _ = observer.read()
            return all(
                (r := records.get(p)) is not None and r.layers == span and r.state.value == "serving"
                for p, span in plan.placement.items()
            )

        wait_for(ready, 240, "a loaded plan over the three nodes", describe=procs.report)
    return boot.maddrs


def measure(maddrs: list[str], model: Path, rate: float, tokens: int, rounds: int) -> dict[str, float]:
    from helix_p2p.client import ClientOptions, HelixClient

    options = ClientOptions(step_timeout_s=60, seed=1)
    with HelixClient(maddrs, model=str(model), options=options, verify_rate=rate) as client:
        client.generate(PROMPT, max_new_tokens=2)  # warm the connections
        walls, decode = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            result = client.generate(PROMPT, max_new_tokens=tokens)
            walls.append(time.perf_counter() - started)
            decode.append(result.timings.decode_tokens_per_s)
        compared = client.verifier.comparisons if client.verifier else 0
    return {
        "wall_s": statistics.median(walls),
        "tokens_per_s": statistics.median(decode),
        "compared": compared,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    args = parser.parse_args()
    from helix_p2p.shard import TinyModelSpec, make_tiny_model

    with tempfile.TemporaryDirectory() as tmp, Processes(Path(tmp)) as procs:
        model = make_tiny_model(Path(tmp) / MODEL_ID, TinyModelSpec(num_layers=4))
        maddrs = start_swarm(procs, model)
        rows = {rate: measure(maddrs, model, rate, args.tokens, args.rounds) for rate in args.rates}
    base = rows[args.rates[0]]
    print(
        f"{args.tokens} new tokens, median of {args.rounds}; ratios against --verify-rate {args.rates[0]:g}"
    )
    print(
        f"{'verify rate':>11} {'s/generation':>13} {'ratio':>6} {'decode tok/s':>13} {'ratio':>6} {'comparisons':>12}"
    )
    for rate, row in rows.items():
        print(
            f"{rate:>11g} {row['wall_s']:>13.2f} {row['wall_s'] / base['wall_s']:>6.2f} "
            f"{row['tokens_per_s']:>13.1f} {row['tokens_per_s'] / base['tokens_per_s']:>6.2f} "
            f"{int(row['compared']):>12d}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
