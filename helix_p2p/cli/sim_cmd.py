"""`helix sim`: what a plan and a scheduler deliver on a cluster, simulated.

    helix sim CLUSTER.json --plan PLAN.json [--scheduler iwrr|random|shortest-queue|swarm]
              [--mode offline|online] [--rate TOKENS_PER_S] [--duration SECONDS] [--seed N]
              [--churn FILE] [--json]

CLUSTER may also be a bundled cluster's name (e.g. single24-llama70b). Prints a summary table (a
progress bar on a terminal while it runs); `--json` prints one JSON object instead."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import TextIO

from helix_p2p.data import resolve_cluster_path
from helix_p2p.formats import read_cluster, read_plan
from helix_p2p.routing import SCHEDULERS
from helix_p2p.sim import MODES, SimConfig, SimResult, read_churn, simulate

#: rows of the per-node and per-edge tables before "... and N more" (the JSON has them all)
MAX_ROWS = 40


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sim",
        help="simulate serving with a plan and a scheduler",
        description="Simulate a cluster serving the model with a plan's placement and a request scheduler: "
        "decode throughput, latencies, rejected requests, KV use per node and each edge's carried "
        "flow beside its planned flow.",
    )
    p.add_argument(
        "cluster", metavar="CLUSTER.json", help="a helix-cluster/1 file or a bundled cluster's name"
    )
    p.add_argument(
        "--plan", required=True, metavar="PLAN.json", help="a helix-plan/1 file (helix plan --out)"
    )
    p.add_argument("--scheduler", choices=SCHEDULERS, default="iwrr", help="request routing (default: iwrr)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="offline",
        help="offline: keep the cluster as full as the KV caches allow; online: arrivals at --rate",
    )
    p.add_argument(
        "--rate", type=float, metavar="TOKENS_PER_S", help="online offered load, prompt + output tokens/s"
    )
    p.add_argument(
        "--duration", type=float, default=600.0, metavar="SECONDS", help="simulated seconds (default 600)"
    )
    p.add_argument(
        "--warmup",
        type=float,
        metavar="SECONDS",
        help="simulated seconds left out of the measurements (default: min(60, duration / 10))",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--churn", metavar="FILE", help="a helix-churn/1 file of nodes leaving and joining")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cluster = read_cluster(resolve_cluster_path(args.cluster))
    plan = read_plan(args.plan)
    churn = read_churn(args.churn) if args.churn else None
    bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.json else None
    config = SimConfig(
        scheduler=args.scheduler,
        mode=args.mode,
        duration_s=args.duration,
        warmup_s=args.warmup,
        rate_tokens_per_s=args.rate,
        seed=args.seed,
        churn=churn,
        progress=bar.update if bar else None,
    )
    started = time.monotonic()
    result = simulate(cluster, plan, config)
    wall_s = time.monotonic() - started
    if bar:
        bar.close()
    if args.json:
        doc = result.to_json()
        doc["wall_s"] = wall_s
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(summary(result, wall_s))
    return 0


class _ProgressBar:
    """One line on a terminal, redrawn at most a few times a second."""

    def __init__(self, out: TextIO, width: int = 40) -> None:
        self.out = out
        self.width = width
        self._last = 0.0

    def update(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self._last < 0.2 and fraction < 1.0:
            return
        self._last = now
        filled = int(self.width * fraction)
        self.out.write(f"\rsimulating [{'#' * filled}{'.' * (self.width - filled)}] {fraction:6.1%}")
        self.out.flush()

    def close(self) -> None:
        self.out.write("\r" + " " * (self.width + 30) + "\r")
        self.out.flush()


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def summary(r: SimResult, wall_s: float | None = None) -> str:
    lines = [
        (
            f"cluster {r.cluster}, plan {r.plan_method}, scheduler {r.scheduler}, {r.mode}, "
            f"{r.duration_s:g} s simulated (measured after {r.warmup_s:g} s), seed {r.seed}"
        ),
        "",
        f"  decode throughput      {r.decode_tokens_per_s:10.1f} tokens/s",
        (
            f"  carried flow           {r.carried_tokens_per_s:10.1f} tokens/s  "
            f"({r.flow_fraction:.1%} of the plan's max flow, {r.max_flow_tokens_per_s:.1f} tokens/s)"
        ),
    ]
    for name, stats in (("prompt latency", r.prompt_latency_s), ("decode latency/token", r.decode_latency_s)):
        lines.append(
            f"  {name:22} mean {_fmt(stats.mean)} s  p50 {_fmt(stats.p50)} s  p95 {_fmt(stats.p95)} s"
            f"  ({stats.count} samples)"
        )
    rejected = ", ".join(f"{reason} {n}" for reason, n in r.rejected.items()) or "none"
    lines += [
        (
            f"  requests               {r.arrived} arrived, {r.admitted} admitted, {r.completed} completed, "
            f"{r.in_flight_at_end} in flight and {r.waiting_at_end} waiting at the end"
        ),
        f"  rejected               {rejected}",
    ]
    if r.rerouted or len(r.plan_changes) > 1:
        lines.append(f"  rerouted after churn   {r.rerouted}")
        for change in r.plan_changes[1:]:
            lines.append(
                f"  t={change.time_s:8.1f} s  {change.reason}: re-planned ({change.method}), max flow "
                f"{change.max_flow_tokens_per_s:.1f} tokens/s, {change.nodes_reloading} nodes loading layers"
            )
    if wall_s is not None:
        lines.append(f"  wall time              {wall_s:.1f} s ({r.events_processed} events)")
    lines += [
        "",
        f"  {'node':14} {'gpu':6} {'layers':10} {'KV budget':>11} {'KV peak':>11} {'KV mean':>11} {'busy':>6}",
    ]
    nodes = sorted(r.nodes, key=lambda n: (n.layers is None, n.layers or (0, 0), n.id))
    for n in nodes[:MAX_ROWS]:
        layers = f"[{n.layers[0]}, {n.layers[1]})" if n.layers else "-"
        lines.append(
            f"  {n.id:14} {n.gpu:6} {layers:10} {n.kv_budget_tokens:11d} {n.kv_peak_tokens:11d} "
            f"{n.kv_mean_tokens:11.0f} {n.busy_fraction:6.1%}"
        )
    if len(nodes) > MAX_ROWS:
        lines.append(f"  ... and {len(nodes) - MAX_ROWS} more nodes (see --json)")
    lines += ["", f"  {'edge':30} {'planned tokens/s':>17} {'carried tokens/s':>17}"]
    edges = sorted(r.edges, key=lambda e: -max(e.planned_tokens_per_s, e.carried_tokens_per_s))
    for e in edges[:MAX_ROWS]:
        lines.append(
            f"  {e.src + ' -> ' + e.dst:30} {e.planned_tokens_per_s:17.1f} {e.carried_tokens_per_s:17.1f}"
        )
    if len(edges) > MAX_ROWS:
        lines.append(f"  ... and {len(edges) - MAX_ROWS} more edges (see --json)")
    return "\n".join(lines) + "\n"
