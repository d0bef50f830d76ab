"""Nodes behind a NAT join and serve through the bootstrap's relay, on 127.0.0.1.

A NATed node runs with `--no-listen`: its p2p daemon listens on no address at all, so no peer can
dial it, as behind a NAT that lets nothing in (on loopback a port would otherwise be reachable by
anyone, so a flag that only claimed privacy would prove nothing). It can still dial out, as a NAT
lets out. One module-scoped swarm: a bootstrap (the relay), an ordinary node and two NATed nodes.
The ordinary node and `natted` each hold at most two of the tiny model's four layers and
`natted2` one, so no route can leave `natted` out.

1. `natted`'s record says `relay` and leads with a circuit address through the bootstrap;
2. its links are measured (numbers in its record) and the plan gives it layers;
3. the two NATed nodes cannot dial each other: their link is probed through the relay, and that
   measurement, not an estimate, is what the planner's cluster holds for the pair;
4. a client, which no NATed node ever dials, reaches `natted` only through the relay, and greedy
   generation over the swarm equals the whole model's;
5. `helix doctor --no-listen` finds the relay and measures the NATed nodes through it, and the
   status (`helix status --json`'s document) shows them as relayed."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import FAST, Proc, Processes, SwarmObserver, start_bootstrap, start_node, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL_ID = "tiny-nat"
NUM_LAYERS = 4
TIMINGS = dict(FAST, **{"--ttl-s": "10", "--refresh-s": "1.5", "--probe-period-s": "2"})
PROMPT = "the quick brown fox"


@dataclass
class Swarm:
    procs: Processes
    maddrs: list[str]
    model: Path
    observer: SwarmObserver
    natted: Proc
    natted2: Proc
    plan: object

    def record(self, name: str):
        records, _ = self.observer.read()
        return next((r for r in records.values() if r.name == name), None)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from helix_p2p.shard import TinyModelSpec, make_tiny_model

    workdir = tmp_path_factory.mktemp("nat-swarm")
    model = make_tiny_model(workdir / MODEL_ID, TinyModelSpec(num_layers=NUM_LAYERS, initializer_range=0.1))
    with Processes(workdir) as procs:
        boot = start_bootstrap(procs)
        observer = SwarmObserver(boot.maddrs)
        try:
            natted = start_node(
                procs, "natted", boot.maddrs, model, [900.0, 500.0], "--no-listen", "--planner-method", "petals",
                timings=TIMINGS,
            )  # fmt: skip
            natted2 = start_node(
                procs, "natted2", boot.maddrs, model, [700.0], "--no-listen", "--planner-method", "petals",
                timings=TIMINGS,
            )  # fmt: skip
            start_node(
                procs, "open", boot.maddrs, model, [800.0, 450.0], "--planner-method", "petals", timings=TIMINGS,
            )  # fmt: skip

            def ready():
                plan = observer.served_plan(MODEL_ID, min_placed=3)
                return plan if plan is not None and len(plan.placement) == 3 else None

            plan = wait_for(ready, 150, "a plan over the three nodes, loaded", describe=procs.report)
            yield Swarm(procs, boot.maddrs, model, observer, natted, natted2, plan)
        finally:
            observer.close()


def test_the_natted_node_announces_a_circuit_through_the_bootstrap(swarm) -> None:
    from helix_p2p.swarm.records import Reachability

    record = wait_for(
        lambda: (r := swarm.record("natted")) is not None and r.addrs and "p2p-circuit" in r.addrs[0] and r,
        30,
        "the NATed node's circuit address",
        describe=swarm.procs.report,
    )
    assert record.reachability == Reachability.RELAY
    assert record.dht_client_mode, "a peer nobody can dial stores nothing for others"
    bootstrap_id = swarm.maddrs[0].rsplit("/p2p/", 1)[-1]
    relayed = [a for a in record.addrs if "p2p-circuit" in a]
    assert relayed == [f"{swarm.maddrs[0]}/p2p-circuit/p2p/{record.peer_id}"], record.addrs
    assert bootstrap_id in relayed[0]
    assert all("p2p-circuit" in a for a in record.addrs), f"it listens on nothing else: {record.addrs}"
    assert "reachable through relay" in swarm.natted.stderr() + swarm.natted.stdout()


def test_its_links_are_measured_and_the_plan_gives_it_layers(swarm) -> None:
    other = swarm.record("open")
    record = wait_for(
        lambda: (
            (r := swarm.record("natted")) is not None and any(m.peer == other.peer_id for m in r.links) and r
        ),
        60,
        "the NATed node's measured link to the other node",
        describe=swarm.procs.report,
    )
    link = next(m for m in record.links if m.peer == other.peer_id)
    assert link.rtt_s > 0 and link.out_bytes_per_s > 0 and link.in_bytes_per_s > 0, link
    assert swarm.plan.placement.get(record.peer_id), f"no layers for the NATed node: {swarm.plan.placement}"


def test_the_link_between_two_natted_nodes_is_measured_through_the_relay_and_planned_with(swarm) -> None:
    from helix_p2p.swarm.cluster_view import link_between

    def measured():
        a, b = swarm.record("natted"), swarm.record("natted2")
        linked = any(m.peer == b.peer_id for m in a.links) or any(m.peer == a.peer_id for m in b.links)
        return (a, b) if linked else None

    a, b = wait_for(measured, 60, "a measured link between the two NATed nodes", describe=swarm.procs.report)
    logs = swarm.natted.stderr() + swarm.natted2.stderr()
    assert (
        f"link to {b.peer_id} (through a relay)" in logs or f"link to {a.peer_id} (through a relay)" in logs
    )
    assert f"reached {b.peer_id} through a relay" in logs or f"reached {a.peer_id} through a relay" in logs
    # what the planner's cluster holds for the pair is the relayed measurement, not the NIC estimate
    for src, dst in ((a, b), (b, a)):
        link = link_between(src, dst)
        mine = [m.out_bytes_per_s for m in src.links if m.peer == dst.peer_id]
        theirs = [m.in_bytes_per_s for m in dst.links if m.peer == src.peer_id]
        assert link.bytes_per_s in mine + theirs, (link, src.links, dst.links)


def test_a_client_reaches_it_through_the_relay_and_generates_exactly(swarm) -> None:
    from helix_p2p.client import ClientOptions, HelixClient
    from shard_fixtures import whole_model_greedy

    ids, whole = whole_model_greedy(swarm.model, PROMPT, 8)
    natted = swarm.record("natted").peer_id
    options = ClientOptions(step_timeout_s=15, avoid_s=30, route_wait_s=10, max_failovers=2)
    with HelixClient(swarm.maddrs, model=str(swarm.model), options=options) as client:

        async def addrs_to_natted() -> list[str]:
            peers = await client.dht.p2p.list_peers()
            return [str(a) for info in peers if info.peer_id.to_base58() == natted for a in info.addrs]

        # the client listens, but the NATed node never dials a DHT client: its only way in is the relay
        assert all("p2p-circuit" in a for a in client._call(addrs_to_natted(), 15)), "a direct connection"
        result = client.generate(PROMPT, max_new_tokens=8)
        via = client._call(addrs_to_natted(), 15)
    assert result.prompt_token_ids == ids
    assert result.token_ids == whole[:8]
    assert natted in {hop["peer_id"] for hop in result.route}, result.route
    assert via and all("p2p-circuit" in a for a in via), f"the client's connection to it: {via}"


def test_helix_doctor_behind_the_nat_finds_the_relay_and_measures_through_it(swarm) -> None:
    helix = str(Path(sys.executable).parent / "helix")
    done = subprocess.run(
        [helix, "doctor", "--initial-peers", *swarm.maddrs, "--no-listen", "--device", "cpu", "--peers", "3"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-2000:]
    assert "listening on no address" in out and "not reachable directly" in out
    assert "reachable through the bootstrap's relay" in out and "/p2p-circuit/p2p/" in out, out
    assert re.search(r"link to natted2? \(behind a NAT\), through its relay, probed with 32 KiB: rtt", out), (
        out
    )


def test_the_status_shows_the_natted_nodes_as_relayed(swarm) -> None:
    """What `helix status --json` prints for each node, from the registry as a DHT peer reads it
    (the command itself is run against a swarm by test_node_swarm; a second process here would
    cost seconds to show the same function's output)."""
    import time

    from helix_p2p.swarm.status import swarm_status

    records, plans = swarm.observer.read()
    nodes = {n["name"]: n for n in swarm_status(records, [p.record for p in plans], time.time())["nodes"]}
    assert nodes["natted"]["reachability"] == nodes["natted2"]["reachability"] == "relay"
    assert nodes["open"]["reachability"] == "direct"
    assert nodes["natted"]["layers"] is not None
