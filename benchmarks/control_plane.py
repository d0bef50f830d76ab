"""What the swarm's control plane costs as the swarm grows: the size of what every node reads from
the DHT on each poll, the CPU to check it, and the planner's input built from it.

For registries of n synthetic nodes (80-layer model, 12-entry throughput tables, MAX_LINKS measured
links each) it prints, per n, with ratios to the smallest n:

- registry bytes: every node record as stored (msgpack + hivemind's signature), summed; every poll
  reads this (spread over the REGISTRY_SHARDS keys, each well under hivemind's 4 MiB message cap);
- validate ms: hivemind's signature check plus our schema check over all records, as each DHT peer
  runs it on records it stores or receives;
- cluster s: `registry_to_cluster` (n^2 directed links, measured or estimated);
- plan bytes / sign+verify ms: a plan placing every node, its signature made and checked.

    python benchmarks/control_plane.py [--sizes 10 100 300 1000]"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # record builders shared with the tests

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils.timed_storage import get_dht_time
from swarm_builders import link, node

from helix_p2p.plan import EdgeFlow
from helix_p2p.swarm.cluster_view import registry_to_cluster
from helix_p2p.swarm.identity import ephemeral_identity
from helix_p2p.swarm.keys import REGISTRY_SHARDS, registry_key
from helix_p2p.swarm.records import MAX_LINKS, ModelInfo, PlanRecord, node_record_to_wire
from helix_p2p.swarm.signing import sign_plan, verify_plan
from helix_p2p.swarm.validator import key_id, swarm_validators

MODEL = ModelInfo(id="llama-2-70b", num_layers=80, hidden_size=8192, dtype_bytes=2)


def registry(n: int, identity) -> dict:
    peers = [identity.peer_id] + [f"Qm{i:044d}" for i in range(1, n)]
    now = get_dht_time()
    records = {}
    for i, peer in enumerate(peers):
        neighbours = [peers[(i + j) % n] for j in range(1, min(MAX_LINKS, n - 1) + 1)]
        records[peer] = node(
            peer,
            model=MODEL,
            max_layers=12,
            tokens_per_s=tuple(20000.0 / k for k in range(1, 13)),
            links=tuple(link(p, at=now - 5) for p in neighbours),
            updated_at=now,
            joined_at=now - 100,
            name=f"volunteer-{i}",
            gpu="NVIDIA A100-SXM4-80GB",
        )
    return records


def measure(n: int, identity) -> dict:
    records = registry(n, identity)
    composite = CompositeValidator(swarm_validators(identity, "helix"))
    # every record as stored: signed with the writer's key. Only our own key is at hand, so each
    # record is signed as ours; size and checking cost are the same as for n distinct writers.
    signed = []
    for record in records.values():
        links = tuple(m for m in record.links if m.peer != identity.peer_id)
        record = dataclasses.replace(record, peer_id=identity.peer_id, links=links)
        dht_record = DHTRecord(
            key=key_id(registry_key("helix", identity.peer_id)),
            subkey=DHTProtocol.serializer.dumps(identity.owner_subkey),
            value=DHTProtocol.serializer.dumps(node_record_to_wire(record)),
            expiration_time=get_dht_time() + 60,
        )
        signed.append(dataclasses.replace(dht_record, value=composite.sign_value(dht_record)))
    registry_bytes = sum(len(r.value) + len(r.subkey) for r in signed)
    started = time.perf_counter()
    refused = sum(not composite.validate(r) for r in signed)
    if refused:
        raise SystemExit(f"{refused} of {n} records refused by the validator")
    validate_ms = (time.perf_counter() - started) * 1e3

    started = time.perf_counter()
    cluster = registry_to_cluster(records)
    cluster_s = time.perf_counter() - started

    peers = sorted(records)
    spans = {p: ((i * 8) % 80, (i * 8) % 80 + 8) for i, p in enumerate(peers)}
    flows = [EdgeFlow(a, b, 1.5) for a, b in itertools.pairwise(peers)]
    plan = PlanRecord(
        epoch=1, planner=identity.peer_id, model=MODEL.id, num_layers=80, method="milp", members=tuple(peers),
        placement=spans, flows=tuple(flows), objective_tokens_per_s=1234.5, upper_bound_tokens_per_s=1300.0,
        solve_seconds=10.0, created_at=get_dht_time(),
    )  # fmt: skip
    started = time.perf_counter()
    signed_plan = sign_plan(plan, identity)
    verify_plan(
        {"body": signed_plan.body, "public_key": signed_plan.public_key, "signature": signed_plan.signature}
    )
    sign_ms = (time.perf_counter() - started) * 1e3
    return {
        "n": n,
        "registry_kib": registry_bytes / 1024,
        "shard_kib": registry_bytes / 1024 / min(n, REGISTRY_SHARDS),
        "validate_ms": validate_ms,
        "links": len(cluster.links),
        "cluster_s": cluster_s,
        "plan_kib": len(signed_plan.body) / 1024,
        "sign_ms": sign_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 300, 1000])
    args = parser.parse_args()
    identity = ephemeral_identity()
    try:
        rows = [measure(n, identity) for n in args.sizes]
    finally:
        identity.path.chmod(0o600)
        identity.path.unlink()
    base = rows[0]
    print(f"control plane cost by swarm size (ratios to n={base['n']})")
    header = (
        f"{'nodes':>6} {'registry KiB':>13} {'per shard KiB':>14} {'validate ms':>12} {'links':>9} "
        f"{'cluster s':>10} {'plan KiB':>9} {'sign+verify ms':>15}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['n']:>6} {r['registry_kib']:>8.1f} x{r['registry_kib'] / base['registry_kib']:<4.0f}"
            f"{r['shard_kib']:>14.1f} {r['validate_ms']:>7.1f} x{r['validate_ms'] / base['validate_ms']:<4.0f}"
            f"{r['links']:>9} {r['cluster_s']:>6.2f} x{r['cluster_s'] / max(base['cluster_s'], 1e-9):<4.0f}"
            f"{r['plan_kib']:>8.1f} {r['sign_ms']:>15.1f}"
        )


if __name__ == "__main__":
    main()
