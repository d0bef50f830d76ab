"""What `helix status` shows: the live registry and the plan the election rule makes current, as
one JSON-ready document and as a table. Pure: the caller reads the DHT."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from helix_p2p.swarm.election import choose_plan, elect_planner
from helix_p2p.swarm.records import NodeRecord, PlanRecord


def main_model(records: Iterable[NodeRecord]) -> str | None:
    """The model most live nodes serve (a swarm normally serves one)."""
    counts = Counter(r.model.id for r in records)
    return max(counts, key=lambda m: (counts[m], m)) if counts else None


def held_tokens_per_s(record: NodeRecord) -> float | None:
    """What the node sustains with the layers it holds now; None when it holds none."""
    if record.layers is None:
        return None
    k = record.layers[1] - record.layers[0]
    return record.tokens_per_s[k - 1] if k <= len(record.tokens_per_s) else None


def swarm_status(
    records: Mapping[str, NodeRecord], plans: Iterable[PlanRecord], now: float, model_id: str | None = None
) -> dict[str, Any]:
    live = [r for r in records.values() if not r.is_stale(now)]
    model_id = model_id or main_model(live)
    plan = None
    if model_id is not None:
        plan = choose_plan(
            list(plans), elect_planner({r.peer_id: r for r in live}, now, model_id), None, model_id
        )
    nodes = sorted(live, key=lambda r: (r.layers or (10**9, 0), r.name, r.peer_id))
    return {
        "model": model_id,
        "nodes": [
            {
                "peer_id": r.peer_id,
                "name": r.name,
                "gpu": r.gpu,
                "state": r.state.value,
                "layers": list(r.layers) if r.layers else None,
                "tokens_per_s": held_tokens_per_s(r),
                "free_kv_tokens": r.free_kv_tokens,
                "reachability": r.reachability.value,
            }
            for r in nodes
        ],
        "plan": None
        if plan is None
        else {
            "epoch": plan.epoch,
            "planner": plan.planner,
            "method": plan.method,
            "objective_tokens_per_s": plan.objective_tokens_per_s,
            "upper_bound_tokens_per_s": plan.upper_bound_tokens_per_s,
            "placement": {
                peer: list(span) for peer, span in sorted(plan.placement.items(), key=lambda x: x[1])
            },
        },
    }


def plan_served(doc: Mapping[str, Any], min_nodes: int = 0) -> tuple[bool, str]:
    """Whether every node the current plan gives layers serves exactly those layers now (what a
    script waits for before its first request), and the plan places at least `min_nodes` nodes (a
    script that just started one more node waits for the plan that includes it), with a one-line
    account of where it stands."""
    plan = doc["plan"]
    if plan is None:
        return False, f"{len(doc['nodes'])} live node(s), no plan yet"
    if len(plan["placement"]) < min_nodes:
        return False, (
            f"plan epoch {plan['epoch']} places {len(plan['placement'])} node(s), waiting for {min_nodes} "
            f"({len(doc['nodes'])} live)"
        )
    nodes = {n["peer_id"]: n for n in doc["nodes"]}
    serving = [
        peer
        for peer, span in plan["placement"].items()
        if peer in nodes and nodes[peer]["state"] == "serving" and nodes[peer]["layers"] == list(span)
    ]
    total = len(plan["placement"])
    return len(serving) == total > 0, f"plan epoch {plan['epoch']}: {len(serving)}/{total} planned node(s) serving"


def format_status(doc: Mapping[str, Any]) -> str:
    rows = [("NAME", "PEER", "GPU", "STATE", "LAYERS", "TOKENS/S", "FREE KV", "REACH")]
    for n in doc["nodes"]:
        rows.append(
            (
                n["name"] or "-",
                _short(n["peer_id"]),
                n["gpu"],
                n["state"],
                "-" if n["layers"] is None else f"[{n['layers'][0]}, {n['layers'][1]})",
                "-" if n["tokens_per_s"] is None else f"{n['tokens_per_s']:.1f}",
                str(n["free_kv_tokens"]),
                n["reachability"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"swarm model: {doc['model'] or '-'}, {len(doc['nodes'])} live node(s)", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append("")
    plan = doc["plan"]
    if plan is None:
        lines.append("plan: none yet (no plan from the elected planner)")
    else:
        bound = plan["upper_bound_tokens_per_s"]
        lines.append(
            f"plan: epoch {plan['epoch']} by {_short(plan['planner'])} ({plan['method']}), "
            f"flow {plan['objective_tokens_per_s']:.1f} tokens/s, "
            f"bound {'none' if bound is None else f'{bound:.1f} tokens/s'}, {len(plan['placement'])} node(s) hold layers"
        )
    return "\n".join(lines)


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 14 else f"{peer_id[:6]}..{peer_id[-6:]}"


# ------------------------------------------------------------------------------- the status page


@dataclass(frozen=True)
class PeerRates:
    """A node's counters as of its newest record, and the rates since the record before."""

    updated_at: float
    requests_started: int
    tokens_generated: int
    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0


def advance_rates(
    previous: Mapping[str, PeerRates], records: Mapping[str, NodeRecord]
) -> dict[str, PeerRates]:
    """Rates from the counters of successive records of each node. A node's rate changes only when
    a newer record of it arrives (records refresh every few seconds, a page polls faster), so a
    poll that sees the same record keeps the rate; a node seen for the first time has rate 0, and a
    counter that went down (the node restarted) counts from 0 again. Nodes gone from `records` are
    dropped."""
    out: dict[str, PeerRates] = {}
    for peer, r in records.items():
        before = previous.get(peer)
        if before is not None and r.updated_at <= before.updated_at:
            out[peer] = before
            continue
        if before is None:
            out[peer] = PeerRates(r.updated_at, r.requests_started, r.tokens_generated)
            continue
        elapsed_s = r.updated_at - before.updated_at
        out[peer] = PeerRates(
            r.updated_at,
            r.requests_started,
            r.tokens_generated,
            _increase(before.requests_started, r.requests_started) / elapsed_s,
            _increase(before.tokens_generated, r.tokens_generated) / elapsed_s,
        )
    return out


def _increase(then_count: int, now_count: int) -> int:
    return now_count - then_count if now_count >= then_count else now_count


def swarm_state(
    records: Mapping[str, NodeRecord],
    plans: Iterable[PlanRecord],
    now: float,
    rates: Mapping[str, PeerRates],
    model_id: str | None = None,
) -> dict[str, Any]:
    """What the status page shows (and `GET /api/state` returns): `swarm_status`'s nodes and plan,
    each node with its load, counters and rates; the plan with its flow graph; the layer map (each
    node's served and planned range over the model's layers); the swarm's requests/s and tokens/s."""
    plans = list(plans)
    doc = swarm_status(records, plans, now, model_id)
    plan = None
    if doc["plan"] is not None:
        plan = next(
            p for p in plans if p.epoch == doc["plan"]["epoch"] and p.planner == doc["plan"]["planner"]
        )
        doc["plan"]["flows"] = [
            {"src": e.src, "dst": e.dst, "tokens_per_s": e.tokens_per_s} for e in plan.flows
        ]
        doc["plan"]["num_layers"] = plan.num_layers
    for n in doc["nodes"]:
        r = records[n["peer_id"]]
        rate = rates.get(n["peer_id"])
        n["load"] = r.load
        n["requests_started"] = r.requests_started
        n["tokens_generated"] = r.tokens_generated
        n["requests_per_s"] = rate.requests_per_s if rate else 0.0
        n["tokens_generated_per_s"] = rate.tokens_per_s if rate else 0.0
        planned = plan.placement.get(n["peer_id"]) if plan is not None else None
        n["planned_layers"] = list(planned) if planned else None
    model_layers = [records[n["peer_id"]].model.num_layers for n in doc["nodes"]]
    doc["num_layers"] = plan.num_layers if plan is not None else max(model_layers, default=0)
    doc["layer_map"] = [
        {"peer_id": n["peer_id"], "name": n["name"], "layers": n["layers"], "planned": n["planned_layers"]}
        for n in doc["nodes"]
        if n["layers"] is not None or n["planned_layers"] is not None
    ]
    doc["requests_per_s"] = sum(n["requests_per_s"] for n in doc["nodes"])
    doc["tokens_per_s"] = sum(n["tokens_generated_per_s"] for n in doc["nodes"])
    doc["at"] = now
    return doc
