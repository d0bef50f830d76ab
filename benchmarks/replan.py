"""Re-planning benchmark: layers moved and flow, one-stage MILP against the keep-layers stage.

    python benchmarks/replan.py [--time-limit 10] [--tolerance 0.02] [--only NAME ...] [--seeds 2]

For each of the paper's clusters a plan is made, then the cluster changes as a live swarm's does
and is planned again from that plan: link numbers drift by +-5 % (each link drawn anew per seed),
one node of each GPU type joins (a copy of an existing one, same links) and one node holding
layers of each type leaves; every change but the drift alone also comes with the drift. Each
case is solved twice on the same input: one stage (PlanOptions.keep_layers_tolerance=None: the
best flow found, relabelled within classes) and two stages (the tolerance, stability.py). Columns:
layers moved (what nodes must load, helix_p2p.plan.moved_layers) and flow (tokens/s) for each,
with the two-stage figure over the one-stage one, the seconds each took, and the fewest layers
any placement within the tolerance moves, where the stage proved it (its MILP's dual bound; "-"
when it ran out of time first)."""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

from helix_p2p.cluster import Cluster, Link, NodeId
from helix_p2p.data import CLUSTERS_DIR
from helix_p2p.formats import read_cluster
from helix_p2p.plan import Plan
from helix_p2p.planner import PlanOptions, plan

CLUSTERS = ("cluster10-llama30b", "single24-llama30b", "single24-llama70b")
DRIFT = 0.05


def with_new_node(cluster: Cluster, like: NodeId, new_id: str) -> Cluster:
    """`cluster` plus a copy of node `like`: same table, same links both ways and to the clients."""
    template = cluster.node_by_id[like]
    new = replace(template, id=NodeId(new_id))
    links = list(cluster.links)
    links += [replace(link, src=new.id) for link in cluster.links if link.src == template.id]
    links += [replace(link, dst=new.id) for link in cluster.links if link.dst == template.id]
    twin = next(link for link in cluster.links if link.src == template.id)
    links += [Link(template.id, new.id, twin.bytes_per_s, twin.latency_s)]
    links += [Link(new.id, template.id, twin.bytes_per_s, twin.latency_s)]
    coordinator = (
        *cluster.coordinator,
        *(replace(c, node=new.id) for c in cluster.coordinator if c.node == like),
    )
    return replace(cluster, nodes=(*cluster.nodes, new), links=tuple(links), coordinator=coordinator)


def without_node(cluster: Cluster, gone: NodeId) -> Cluster:
    return replace(
        cluster,
        nodes=tuple(n for n in cluster.nodes if n.id != gone),
        links=tuple(link for link in cluster.links if gone not in (link.src, link.dst)),
        coordinator=tuple(c for c in cluster.coordinator if c.node != gone),
    )


def with_drift(cluster: Cluster, seed: int) -> Cluster:
    rng = random.Random(seed)
    drifted = tuple(
        replace(link, bytes_per_s=link.bytes_per_s * rng.uniform(1 - DRIFT, 1 + DRIFT))
        for link in cluster.links
    )
    return replace(cluster, links=drifted)


def cases(cluster: Cluster, previous: Plan, seeds: int) -> Iterator[tuple[str, Cluster]]:
    gpus = sorted({n.gpu for n in cluster.nodes})
    for seed in range(seeds):
        yield f"links +-5% (seed {seed})", with_drift(cluster, seed)
    for gpu in gpus:
        like = next(n.id for n in cluster.nodes if n.gpu == gpu)
        yield f"+1 {gpu}, links +-5%", with_drift(with_new_node(cluster, like, f"new-{gpu}"), 0)
    for gpu in gpus:
        holder = next((n.id for n in cluster.nodes if n.gpu == gpu and n.id in previous.placement), None)
        if holder is not None:
            yield f"-1 {gpu} ({holder}), links +-5%", with_drift(without_node(cluster, holder), 0)


def fmt(value: object) -> str:
    return "-" if value is None else str(value)


def ratio(new: float, old: float) -> str:
    if old == 0:
        return "=" if new == 0 else "inf"
    return f"{new / old:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per solve (default 10)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="keep_layers_tolerance (default 0.02)")
    parser.add_argument("--only", nargs="+", choices=CLUSTERS, help="clusters to run (default: all)")
    parser.add_argument("--seeds", type=int, default=2, help="drift-only cases per cluster (default 2)")
    args = parser.parse_args(argv)
    one_stage = PlanOptions(time_limit_s=args.time_limit, keep_layers_tolerance=None)
    two_stage = PlanOptions(time_limit_s=args.time_limit, keep_layers_tolerance=args.tolerance)
    header = (
        f"{'cluster':<20} {'change':<32} {'moved 1st':>9} {'moved 2st':>9} {'ratio':>6} "
        f"{'flow 1st':>9} {'flow 2st':>9} {'ratio':>6} {'s 1st':>6} {'s 2st':>6} {'moved >=':>8}"
    )
    print(header)
    print("-" * len(header))
    totals = [0, 0]
    for name in args.only or CLUSTERS:
        cluster = read_cluster(CLUSTERS_DIR / f"{name}.json")
        previous = plan(cluster, one_stage)
        for change, changed in cases(cluster, previous, args.seeds):
            results = []
            for options in (one_stage, two_stage):
                started = time.monotonic()
                result = plan(changed, options, previous=previous)
                results.append((result, time.monotonic() - started))
            (one, one_s), (two, two_s) = results
            moved = [one.details["moved_layers"], two.details["moved_layers"]]
            totals = [totals[0] + moved[0], totals[1] + moved[1]]
            print(
                f"{name:<20} {change:<32} {moved[0]:>9} {moved[1]:>9} {ratio(moved[1], moved[0]):>6} "
                f"{one.objective_tokens_per_s:>9.1f} {two.objective_tokens_per_s:>9.1f} "
                f"{ratio(two.objective_tokens_per_s, one.objective_tokens_per_s):>6} {one_s:>6.1f} {two_s:>6.1f} "
                f"{fmt(two.details.get('keep_layers', {}).get('moved_layers_lower_bound')):>8}",
                flush=True,
            )
    print(
        f"layers moved in all: one stage {totals[0]}, two stages {totals[1]} ({ratio(totals[1], totals[0])})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
