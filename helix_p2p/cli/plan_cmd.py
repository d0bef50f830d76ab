"""`helix plan`: place a model on a cluster and print (and optionally save) the plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from helix_p2p.cluster import Cluster
from helix_p2p.data import bundled_cluster_names, resolve_cluster_path
from helix_p2p.flow import max_flow
from helix_p2p.formats import FormatError, read_cluster, write_plan
from helix_p2p.plan import Plan
from helix_p2p.planner import BACKEND_NAMES, METHODS, PlanOptions, Progress, plan
from helix_p2p.progress import advance_to, progress_bar


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="choose which layers every node holds (max-flow placement, as deep as it serves)",
        description=(
            "Place a model's layers on a cluster so that the tokens/s the cluster can carry (the max "
            "flow) is largest, among placements shallow enough to serve it (--max-flow: the bare max "
            "flow). CLUSTER is a helix-cluster/1 file or a bundled cluster's name: "
            + ", ".join(bundled_cluster_names())
        ),
    )
    p.add_argument("cluster", metavar="CLUSTER", help="helix-cluster/1 JSON file or bundled cluster name")
    p.add_argument("--method", choices=list(METHODS), default="milp", help="planner (default: milp)")
    p.add_argument(
        "--time-limit",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="stop the MILP after this long and return the best plan found (default: 60)",
    )
    p.add_argument(
        "--partial-inference",
        action="store_true",
        help="let a node take over in the middle of another's range (DESIGN.md)",
    )
    p.add_argument(
        "--max-flow",
        action="store_true",
        help="publish the max-flow placement even when a shallower one serves more "
        "(default: the placement of most flow per hop; planner/servable.py)",
    )
    p.add_argument("--out", metavar="PLAN.json", help="write the plan as helix-plan/1")
    p.add_argument("--seed", type=int, default=0, help="seed for randomized methods (default: 0)")
    p.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default=BACKEND_NAMES[0],
        help=f"MILP solver (default: {BACKEND_NAMES[0]}; see benchmarks/planner.py)",
    )
    p.add_argument("--threads", type=int, default=None, help="solver threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    path = resolve_cluster_path(args.cluster)
    if not path.exists():
        raise FormatError(
            str(path), "", "no such file (bundled clusters: " + ", ".join(bundled_cluster_names()) + ")"
        )
    cluster = read_cluster(path)
    if args.out and not Path(args.out).resolve().parent.is_dir():
        # say so before a solve that may take minutes, not after it
        raise FormatError(args.out, "", "cannot write: its folder does not exist")
    display = None if args.quiet else _ProgressDisplay(sys.stderr, args.time_limit)
    options = PlanOptions(
        method=args.method,
        time_limit_s=args.time_limit,
        partial_inference=args.partial_inference,
        servable=not args.max_flow,
        seed=args.seed,
        threads=args.threads,
        backend=args.backend,
        progress=display,
    )
    try:
        result = plan(cluster, options)
    finally:
        if display is not None:
            display.close()
    print_plan(cluster, result, sys.stdout)
    if args.out:
        write_plan(result, args.out)
        print(f"wrote {args.out}")
    return 0


class _ProgressDisplay:
    """The solver's progress: on a terminal a bar over the time limit with the best flow and the
    bound beside it; otherwise one line per report (logs and CI keep the history)."""

    def __init__(self, stream: TextIO, time_limit_s: float) -> None:
        self.stream = stream
        self.bar = progress_bar("planning", time_limit_s, unit="s", stream=stream, bar_format=_BAR_FORMAT)

    def __call__(self, progress: Progress) -> None:
        bound = "?" if progress.bound_tokens_per_s is None else f"{progress.bound_tokens_per_s:.2f}"
        gap = ""
        if progress.bound_tokens_per_s:
            gap = f" (gap {100 * (1 - progress.best_tokens_per_s / progress.bound_tokens_per_s):.2f}%)"
        if not self.bar.disable:
            note = f"best {progress.best_tokens_per_s:.2f} tokens/s, bound {bound}{gap}"
            advance_to(self.bar, min(progress.elapsed_s, self.bar.total), note)
            return
        activity = f"; {progress.activity}" if progress.activity else ""
        print(
            f"[{progress.elapsed_s:6.1f} s] best {progress.best_tokens_per_s:.2f} tokens/s, bound {bound}{gap}{activity}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        self.bar.close()


#: elapsed seconds against the time limit (the solve may end sooner, with a proof)
_BAR_FORMAT = "{desc}: {bar} {n:.0f}/{total:.0f} s{postfix}"


def print_plan(cluster: Cluster, result: Plan, out: TextIO) -> None:
    model = cluster.model
    w = out.write
    w(f"cluster    {cluster.name}: {len(cluster.nodes)} nodes, {model.name} ({model.num_layers} layers)\n")
    backend = result.details.get("backend")
    w(
        f"method     {result.method}{f' ({backend})' if backend else ''}, {result.solve_seconds:.1f} s"
        f"{', partial inference' if result.partial_inference else ''}\n"
    )
    w(f"flow       {result.objective_tokens_per_s:.2f} tokens/s\n")
    if result.upper_bound_tokens_per_s is None:
        w("bound      none proven by this method\n")
    else:
        w(f"bound      {result.upper_bound_tokens_per_s:.2f} tokens/s (gap {100 * (result.gap or 0):.4f}%)\n")
    servable = result.details.get("servable") or {}
    max_flow_hops = servable.get("max_flow_placement_mean_hops")
    chosen_hops = servable.get("chosen_mean_hops")
    if isinstance(max_flow_hops, (int, float)) and isinstance(chosen_hops, (int, float)):
        if chosen_hops < max_flow_hops:
            # Without this line the gap reads as a solver that stopped short.
            w(
                f"depth      {chosen_hops:.1f} hops a token; the max-flow placement "
                f"({servable['max_flow_placement_tokens_per_s']:.2f} tokens/s) needs {max_flow_hops:.1f}, "
                f"so this one serves more (planner/servable.py)\n"
            )
        else:
            w(f"depth      {chosen_hops:.1f} hops a token (the max-flow placement is also the shallowest)\n")
    w(
        f"compute    {cluster.compute_upper_bound_tokens_per_s():.2f} tokens/s (every node at its best layer count)\n"
    )
    published = cluster.published.get("helix_milp_max_flow")
    if isinstance(published, (int, float)) and published > 0:
        w(
            f"Helix      {published:.2f} tokens/s published; this plan is x{result.objective_tokens_per_s / published:.3f}\n"
        )
    node_flow = max_flow(cluster, result.placement, result.partial_inference).node_flow_tokens_per_s
    rows = sorted(result.placement.items(), key=lambda item: (item[1], item[0]))
    w(f"\n{'node':<16} {'gpu':<8} {'layers':<12} {'k':>3} {'capacity':>10} {'flow':>10}\n")
    for node_id, (start, end) in rows:
        node = cluster.node_by_id[node_id]
        capacity = cluster.node_capacity_tokens_per_s(node_id, end - start)
        w(
            f"{node_id:<16} {node.gpu:<8} {f'[{start}, {end})':<12} {end - start:>3} "
            f"{capacity:>10.1f} {node_flow.get(node_id, 0.0):>10.1f}\n"
        )
    idle = [n.id for n in cluster.nodes if n.id not in result.placement]
    if idle:
        w(f"\nunused: {', '.join(idle)}\n")
