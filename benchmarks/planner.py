"""Planner benchmark: every method on the Helix paper's clusters and on seeded synthetic clusters.

    python benchmarks/planner.py [--time-limit 60] [--backend highs] [--backends] [--only NAME ...]

For each cluster: each method's flow (tokens/s, exact max flow of its placement), the proven bound
(MILP only), the gap, the seconds taken, and the MILP's flow over the paper's published figure
and over the best baseline in the same run. `--backends` adds a table comparing the MILP backends
(SCIP, HiGHS, CP-SAT) on the clusters where the choice matters."""

from __future__ import annotations

import argparse
import sys
import time

from helix_p2p.cluster import Cluster
from helix_p2p.data import CLUSTERS_DIR, bundled_cluster_names
from helix_p2p.formats import read_cluster
from helix_p2p.planner import BACKEND_NAMES as BACKENDS
from helix_p2p.planner import PlanOptions, plan
from helix_p2p.synthetic import SyntheticSpec, synthetic_cluster

BASELINES = ("petals", "swarm", "sp")
SYNTHETIC = {"synthetic-100": SyntheticSpec(100, 4, seed=1), "synthetic-500": SyntheticSpec(500, 8, seed=1)}


def load(name: str) -> Cluster:
    if name in SYNTHETIC:
        return synthetic_cluster(SYNTHETIC[name])
    return read_cluster(CLUSTERS_DIR / f"{name}.json")


def published_flow(cluster: Cluster) -> float | None:
    value = cluster.published.get("helix_milp_max_flow")
    if isinstance(value, (int, float)):
        return float(value)
    union = cluster.published.get("validation", {}).get("union_placement_max_flow_ours")
    return float(union) if isinstance(union, (int, float)) else None


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def run_cluster(name: str, time_limit_s: float, backend: str) -> list[str]:
    cluster = load(name)
    rows = []
    baseline_best = 0.0
    for method in BASELINES:
        started = time.monotonic()
        result = plan(cluster, PlanOptions(method=method, seed=0))
        baseline_best = max(baseline_best, result.objective_tokens_per_s)
        rows.append((method, result.objective_tokens_per_s, None, None, time.monotonic() - started))
    started = time.monotonic()
    # servable=False: this table compares max-flow searches (Helix published its max flow)
    milp = plan(cluster, PlanOptions(method="milp", time_limit_s=time_limit_s, backend=backend, servable=False))
    seconds = time.monotonic() - started
    rows.append(("milp", milp.objective_tokens_per_s, milp.upper_bound_tokens_per_s, milp.gap, seconds))
    paper = published_flow(cluster)
    lines = []
    for method, flow, bound, gap, secs in rows:
        vs_paper = f"x{flow / paper:.3f}" if paper else "-"
        vs_base = f"x{flow / baseline_best:.3f}" if baseline_best else "-"
        lines.append(
            f"| {name} ({len(cluster.nodes)}) | {method} | {flow:.2f} | {fmt(bound)} | "
            f"{fmt(None if gap is None else 100 * gap, '.3f')} | {secs:.1f} | {fmt(paper)} | {vs_paper} | {vs_base} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--time-limit", type=float, default=60.0, help="MILP time limit per cluster (s)")
    parser.add_argument("--backend", choices=list(BACKENDS), default=BACKENDS[0])
    parser.add_argument("--backends", action="store_true", help="also compare the MILP backends")
    parser.add_argument("--only", nargs="*", help="cluster names to run (default: all)")
    args = parser.parse_args()
    names = args.only or [*bundled_cluster_names(), *SYNTHETIC]
    print(
        f"MILP time limit {args.time_limit:.0f} s, backend {args.backend}; flows in tokens/s (max flow of the placement)"
    )
    print(
        "| cluster (nodes) | method | flow | bound | gap % | seconds | paper | flow/paper | flow/best baseline |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for line in run_cluster(name, args.time_limit, args.backend):
            print(line, flush=True)
    if args.backends:
        print("\nMILP backends (same model, same time limit)")
        print("| cluster | backend | flow | bound | gap % | seconds | flow/first backend flow |")
        print("|---|---|---|---|---|---|---|")
        for name in ["cluster10-llama30b", "single24-llama70b", "single24-llama30b", "synthetic-100"]:
            if args.only and name not in args.only:
                continue
            cluster = load(name)
            reference = None
            for backend in BACKENDS:
                started = time.monotonic()
                result = plan(
                    cluster, PlanOptions(method="milp", time_limit_s=args.time_limit, backend=backend, servable=False)
                )
                reference = reference or result.objective_tokens_per_s
                print(
                    f"| {name} | {backend} | {result.objective_tokens_per_s:.2f} | {fmt(result.upper_bound_tokens_per_s)} | "
                    f"{fmt(None if result.gap is None else 100 * result.gap, '.3f')} | {time.monotonic() - started:.1f} | "
                    f"x{result.objective_tokens_per_s / reference:.3f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
