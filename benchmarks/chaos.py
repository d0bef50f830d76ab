"""Churn under load: a real swarm on 127.0.0.1 (a bootstrap and --nodes `helix-node join` processes,
each able to hold half of a tiny Llama, so every range has nodes/2 replicas) serving --concurrency
greedy generations in a closed loop, while a random node, the elected planner among them, is
SIGKILLed every --kill-every-s seconds and restarted with the same identity --down-s later.

One run has the baseline in it: the undisturbed output of every prompt (what each request must
reproduce), then --before-s of undisturbed load, --duration-s of chaos, and an after phase that
ends when throughput is back within --recovered-within of before (or after --after-s). Prints one
table: requests completed (identical to the undisturbed run or not), failed over, failed by
reason; tokens/s before, during (mean and the worst --window-s window) and after, as ratios of
before; the recovery time; and whether every node process exited cleanly.

    python benchmarks/chaos.py [--nodes 8] [--concurrency 32] [--duration-s 60] [--kill-every-s 5]
                               [--seed 0]"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the process helpers the swarm tests use

from chaos_run import ChaosResult, ChaosSettings, run_chaos


def table(result: ChaosResult) -> str:
    s = result.settings
    before = result.before_tokens_per_s()
    rows: list[tuple[str, str]] = []
    chaos = [o for o in result.outcomes if o.phase == "chaos"]
    rows.append(("requests", f"{len(result.outcomes)} ({len(chaos)} started during the chaos)"))
    completed = result.completed()
    identical = len(completed) - len(result.mismatched())
    rows.append(("completed", f"{len(completed)}, {identical} identical to the undisturbed run"))
    failed_over = result.failed_over()
    rows.append(
        ("failed over", f"{len(failed_over)} ({sum(o.failovers for o in failed_over)} failovers in all)")
    )
    reasons = ", ".join(f"{k} {v}" for k, v in result.failed_by_reason().most_common()) or "-"
    rows.append(("failed", f"{len(result.failed())} ({reasons})"))
    rows.append(("hung (no answer in time)", str(result.hung)))
    planner = sum(k.was_planner for k in result.kills)
    rows.append(
        ("kills", f"{len(result.kills)} ({planner} of the planner), {result.skipped_kills} rounds skipped")
    )

    def ratio(x: float) -> str:
        return f"{x:8.1f}  x{x / before:.2f}" if before else f"{x:8.1f}"

    rows.append(("tokens/s before", f"{before:8.1f}  x1.00"))
    rows.append(("tokens/s during (mean)", ratio(result.chaos_mean_tokens_per_s())))
    rows.append((f"tokens/s during (worst {s.window_s:g} s)", ratio(result.chaos_min_tokens_per_s())))
    rows.append(("tokens/s after (last 3 windows)", ratio(result.after_tokens_per_s())))
    recovery = result.recovery_s()
    rows.append(
        (
            f"recovery (within {s.recovered_within:.0%} of before)",
            "not within the after phase" if recovery is None else f"{recovery:.1f} s after the chaos",
        )
    )
    back = result.all_back_s
    rows.append(
        (
            "every node back in the plan",
            "no" if back is None else f"{back - result.chaos_end_s:.1f} s after the chaos",
        )
    )
    bad_exits = {n: c for n, c in result.node_exit_codes.items() if c != 0}
    rows.append(("node exits (not killed by us)", "all 0" if not bad_exits else str(bad_exits)))
    rows.append(("tracebacks in node logs", ", ".join(result.tracebacks) or "none"))
    width = max(len(k) for k, _ in rows)
    head = (
        f"chaos: {s.nodes} nodes, {s.num_layers} layers, {s.concurrency} concurrent x {s.max_new_tokens} tokens, "
        f"{s.duration_s:g} s of chaos, a kill every {s.kill_every_s:g} s (down {s.down_s:g} s), seed {s.seed}"
    )
    return "\n".join([head, "-" * len(head)] + [f"{k:<{width}}  {v}" for k, v in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = parser.add_argument
    a("--nodes", type=int, default=8)
    a("--layers", type=int, default=4, help="layers of the tiny model (each node holds half)")
    a("--concurrency", type=int, default=32)
    a("--tokens", type=int, default=16, help="new tokens per request")
    a("--before-s", type=float, default=15.0)
    a("--duration-s", type=float, default=60.0)
    a("--kill-every-s", type=float, default=5.0)
    a("--down-s", type=float, default=6.0, help="a killed node is restarted this long after")
    a("--max-down", type=int, default=2, help="most nodes down at once")
    a("--after-s", type=float, default=60.0)
    a("--recovered-within", type=float, default=0.2)
    a("--window-s", type=float, default=2.0)
    a("--planner-method", default="milp")
    a("--seed", type=int, default=0)
    a("--workdir", type=Path, help="keep the processes' logs here (default: a temporary folder)")
    args = parser.parse_args()
    if args.nodes < 4 or args.layers < 2 or args.layers % 2:
        parser.error("--nodes must be >= 4 and --layers even and >= 2 (each node holds half the layers)")
    settings = ChaosSettings(
        nodes=args.nodes,
        num_layers=args.layers,
        concurrency=args.concurrency,
        max_new_tokens=args.tokens,
        before_s=args.before_s,
        duration_s=args.duration_s,
        kill_every_s=args.kill_every_s,
        down_s=args.down_s,
        max_down=args.max_down,
        after_s=args.after_s,
        recovered_within=args.recovered_within,
        window_s=args.window_s,
        seed=args.seed,
        planner_method=args.planner_method,
    )
    started = time.monotonic()
    log = lambda line: print(line, file=sys.stderr, flush=True)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run_chaos(args.workdir, settings, log=log)
    else:
        with tempfile.TemporaryDirectory(prefix="helix-chaos-") as tmp:
            result = run_chaos(Path(tmp), settings, log=log)
    print(table(result))
    print(f"(wall time {time.monotonic() - started:.0f} s)")
    bad = result.failed() or result.mismatched() or result.hung or result.tracebacks
    sys.exit(1 if bad or any(c != 0 for c in result.node_exit_codes.values()) else 0)


if __name__ == "__main__":
    main()
