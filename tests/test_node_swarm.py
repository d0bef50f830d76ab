"""A real swarm on 127.0.0.1: a bootstrap and helix-node processes with different --throughput
tables, serving a tiny 8-layer checkpoint. The tests run in order on one swarm (starting it costs
more than all the checks together):

1. nodes join, an elected planner publishes a signed plan covering every layer, every placed node
   loads its range (bound: JOIN_BOUND_S after the last node starts);
   and a request routed along its flows generates what the whole model generates;
2. a plan validly signed by a member that is not the elected planner is ignored;
3. records forged for another peer's key are refused by every peer;
4. a node behind a strict NAT (no inbound connections, DHT client) joins; its record says it is
   reachable only through a relay, its links get measured and the planner counts it;
5. a new node joins and gets layers;
6. a node leaving (SIGTERM) refuses new sessions, lets its running one finish, exits 0 as soon as
   it has, and triggers a plan without it;
7. a crashed node (SIGKILL) is planned around;
8. killing the planner: another node publishes a newer plan within one record TTL.

Timings are shortened by flags: records live TTL_S, refreshed every REFRESH_S."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from procs import FAST, Proc, Processes, SwarmObserver, start_bootstrap, start_node, wait_for

from helix_p2p.errors import HelixError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NUM_LAYERS = 8
MODEL_ID = "tiny-llama"
TTL_S = 10.0
REFRESH_S = 1.5
GRACE_S = 20.0
TIMINGS = dict(
    FAST,
    **{
        "--ttl-s": str(TTL_S),
        "--refresh-s": str(REFRESH_S),
        "--probe-max-age-s": "20",
        "--grace-s": str(GRACE_S),
    },
)
PLANNER = ("--planner-method", "petals")
#: what the cluster sustains with k layers held: four different "GPUs" (n2 holds the most)
TABLES = {
    "n1": [500.0, 260.0, 180.0, 140.0],
    "n2": [900.0, 470.0, 320.0, 250.0, 200.0],
    "n3": [300.0, 160.0, 110.0],
    "n4": [700.0, 360.0, 250.0, 190.0],
    "n5": [2000.0, 1000.0, 700.0, 520.0],
    "nat": [60.0],
}
#: a plan covering every layer is published and loaded this long after the last node starts,
#: even on two busy cores (each node spends most of it importing torch and hivemind)
JOIN_BOUND_S = 120.0
#: a re-plan after membership changes lands within this (stale detection + debounce + solve + load)
REPLAN_BOUND_S = 60.0


@dataclass
class Swarm:
    procs: Processes
    maddrs: list[str]
    model: Path
    observer: SwarmObserver
    nodes: dict[str, Proc] = field(default_factory=dict)
    last_start: float = 0.0
    #: nodes the tests stopped on purpose
    stopped: set[str] = field(default_factory=set)

    def start(self, name: str, *extra: str) -> Proc:
        proc = start_node(
            self.procs, name, self.maddrs, self.model, TABLES[name], *PLANNER, *extra, timings=TIMINGS
        )
        self.nodes[name] = proc
        self.last_start = time.monotonic()
        return proc

    def live(self) -> dict:
        """Live node records by public name (fails at once if a node died unasked)."""
        for name, proc in self.nodes.items():
            if name not in self.stopped and not proc.alive():
                raise AssertionError(f"node {name} exited with {proc.popen.returncode}\n{self.report()}")
        records, _ = self.observer.read()
        now = time.time()
        return {r.name: r for r in records.values() if r.is_live(now)}

    def plan(self):
        return self.observer.followed_plan(MODEL_ID)

    def report(self) -> str:
        return self.procs.report()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from helix_p2p.shard import TinyModelSpec, make_tiny_model

    workdir = tmp_path_factory.mktemp("swarm")
    model = make_tiny_model(workdir / MODEL_ID, TinyModelSpec(num_layers=NUM_LAYERS))
    with Processes(workdir) as procs:
        boot = start_bootstrap(procs)
        observer = SwarmObserver(boot.maddrs)
        try:
            s = Swarm(procs, boot.maddrs, model, observer)
            for name in ("n1", "n2", "n3"):
                s.start(name)
            wait_for(
                lambda: {"n1", "n2", "n3"} <= set(s.live()),
                JOIN_BOUND_S,
                "n1-n3 in the registry",
                describe=s.report,
            )
            # n4 joins later (so it is never the oldest, hence never elected) with a key file the
            # test can read, to sign as a member that is not the planner
            s.start("n4", "--identity", str(workdir / "n4.key"))
            s.start("nat", "--no-listen", "--client-mode")
            yield s
        finally:
            observer.close()


def covers_every_layer(plan) -> bool:
    held = {layer for start, end in plan.placement.values() for layer in range(start, end)}
    return held == set(range(NUM_LAYERS)) and plan.objective_tokens_per_s > 0


def loaded(swarm: Swarm, plan) -> bool:
    """Every node the plan places serves exactly its range."""
    records, _ = swarm.observer.read()
    for peer, span in plan.placement.items():
        r = records.get(peer)
        if r is None or r.layers != span or r.state.value != "serving":
            return False
    return True


def plan_that(swarm: Swarm, condition, timeout_s: float, what: str):
    def check():
        plan = swarm.plan()
        return plan if plan is not None and condition(plan) else None

    return wait_for(check, timeout_s, what, interval_s=0.5, describe=swarm.report)


def peer_of(swarm: Swarm, name: str) -> str:
    return wait_for(
        lambda: swarm.live().get(name), 60, f"{name} in the registry", describe=swarm.report
    ).peer_id


# -------------------------------------------------------------------------------------------- tests


def test_nodes_join_and_an_elected_plan_covering_every_layer_is_loaded(swarm):
    names = {"n1", "n2", "n3", "n4", "nat"}

    def all_live():
        live = swarm.live()
        return live if names <= set(live) else None

    live = wait_for(all_live, JOIN_BOUND_S, "all nodes live", describe=swarm.report)
    for name in names:
        record = live[name]
        assert record.tokens_per_s == tuple(TABLES[name]) and record.max_layers == len(TABLES[name])
        assert record.model.num_layers == NUM_LAYERS and record.model.id == MODEL_ID

    members = {r.peer_id for r in live.values()}
    plan = plan_that(
        swarm,
        lambda p: covers_every_layer(p) and members <= set(p.members),
        JOIN_BOUND_S,
        "a plan over all five nodes covering every layer",
    )
    oldest = min((r for r in live.values()), key=lambda r: r.joined_at)
    assert plan.planner == oldest.peer_id  # the election rule: the oldest live member plans
    wait_for(
        lambda: loaded(swarm, plan),
        JOIN_BOUND_S,
        "every placed node serving its range",
        describe=swarm.report,
    )
    # the observer only returns plans whose signature verified; the planner's log says it published
    planner_name = next(r.name for r in live.values() if r.peer_id == plan.planner)
    assert f"published plan epoch {plan.epoch}" in swarm.nodes[planner_name].stderr()


def test_the_plan_serves_greedy_generation_equal_to_the_whole_model(swarm):
    """The layers the nodes loaded are the right ones: a request routed along the plan's flows
    generates what `transformers` generates on the whole checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from helix_p2p.protocol.driver import generate

    plan = plan_that(swarm, covers_every_layer, REPLAN_BOUND_S, "a covering plan")
    wait_for(lambda: loaded(swarm, plan), REPLAN_BOUND_S, "the plan loaded", describe=swarm.report)
    route = route_along_flows(plan)
    prompt = [5, 17, 42, 7, 99]
    ours = swarm.observer.run(generate(swarm.observer.dht.p2p, route, prompt, 4), timeout_s=120)
    whole = AutoModelForCausalLM.from_pretrained(swarm.model, dtype=torch.float32).eval()
    expected = whole.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert ours == expected[0, len(prompt) :].tolist()


def route_along_flows(plan):
    """Hops from source to sink along edges that carry flow; with partial inference a hop runs only
    the layers its predecessor has not."""
    from helix_p2p.protocol.messages import RouteHop

    out = {}
    for flow in plan.flows:
        if flow.tokens_per_s > 0:
            out.setdefault(flow.src, []).append(flow)
    hops, at, done = [], "source", 0
    while at != "sink":
        step = max(out[at], key=lambda f: f.tokens_per_s)
        if step.dst != "sink":
            end = plan.placement[step.dst][1]
            hops.append(RouteHop(step.dst, done, end))
            done = end
        at = step.dst
    assert done == NUM_LAYERS
    return hops


def test_helix_status_and_doctor_read_the_swarm(swarm):
    import json
    import subprocess
    import sys

    plan = plan_that(swarm, covers_every_layer, REPLAN_BOUND_S, "a covering plan")
    helix = [str(Path(sys.executable).with_name("helix"))]  # the console script of this venv
    done = subprocess.run(
        [*helix, "status", "--initial-peers", *swarm.maddrs, "--json"],
        check=False, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    names = {n["name"]: n for n in doc["nodes"]}
    assert {"n1", "n2", "n3", "n4", "nat"} <= set(names)
    assert set(doc["nodes"][0]) >= {
        "peer_id",
        "name",
        "gpu",
        "state",
        "layers",
        "tokens_per_s",
        "free_kv_tokens",
    }
    assert doc["plan"]["epoch"] >= plan.epoch and doc["plan"]["planner"] == plan.planner
    for name, n in names.items():
        if n["layers"] is not None:
            k = n["layers"][1] - n["layers"][0]
            assert n["tokens_per_s"] == TABLES[name][k - 1] and n["free_kv_tokens"] > 0

    done = subprocess.run(
        [*helix, "doctor", "--initial-peers", *swarm.maddrs, "--host", "127.0.0.1", "--probe-bytes", "65536",
         "--device", "cpu"],
        check=False, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "ok   reached the swarm" in out and "ok   reachable directly" in out
    assert "ok   link to bootstrap: rtt" in out and "ok   CPU:" in out
    assert f"plan epoch {doc['plan']['epoch']}" in out or "plan epoch" in out


def test_a_plan_signed_by_a_member_that_is_not_elected_is_ignored(swarm):
    from helix_p2p.swarm.identity import load_identity

    current = plan_that(swarm, covers_every_layer, REPLAN_BOUND_S, "a covering plan")
    n4 = load_identity(swarm.procs.workdir / "n4.key", create=False)
    assert current.planner != n4.peer_id
    forged_epoch = current.epoch + 100
    forged = _replace_plan(
        current, epoch=forged_epoch, planner=n4.peer_id, placement={p: (0, 1) for p in current.placement}
    )
    assert swarm.observer.run(_publish_signed_by(n4, swarm.maddrs, forged))

    # the forgery is a valid, well-signed plan: only the election rule makes nodes ignore it
    wait_for(
        lambda: any(p.record.epoch == forged_epoch for p in swarm.observer.read()[1]),
        30,
        "the forged plan to be readable in the DHT",
    )
    time.sleep(4 * REFRESH_S)  # several registry reads on every node
    for name, proc in swarm.nodes.items():
        assert f"following plan epoch {forged_epoch} " not in proc.stderr(), name
    followed = swarm.plan()
    assert followed.planner == current.planner and followed.epoch < forged_epoch
    wait_for(
        lambda: loaded(swarm, followed),
        REPLAN_BOUND_S,
        "nodes serving the elected plan",
        describe=swarm.report,
    )


def test_records_forged_for_another_peer_are_refused(swarm):
    from hivemind.utils.timed_storage import get_dht_time

    from helix_p2p.swarm.keys import registry_key
    from helix_p2p.swarm.records import node_record_to_wire

    n2 = swarm.live()["n2"]
    forged = node_record_to_wire(_replace_record(n2, name="evil", updated_at=get_dht_time()))
    dht = swarm.observer.dht
    key = registry_key("helix", n2.peer_id)
    owner_subkey = b"[owner:" + _owner_key_of(swarm, n2.peer_id) + b"]"
    # under n2's own subkey: the observer cannot sign for n2's key
    assert swarm.observer.run(dht.node.store(key, forged, get_dht_time() + 5, subkey=owner_subkey)) is False
    # under the observer's own subkey, claiming n2's peer id: the schema binds the two
    assert (
        swarm.observer.run(dht.node.store(key, forged, get_dht_time() + 5, subkey=dht.identity.owner_subkey))
        is False
    )
    time.sleep(1)
    assert swarm.live()["n2"].name == "n2"


def test_a_node_behind_nat_joins_and_is_measured(swarm):
    nat = wait_for(
        lambda: (r := swarm.live().get("nat")) is not None and r.addrs and r,
        60,
        "the NAT node in the registry, with the address of its relay slot",
        describe=swarm.report,
    )
    # it accepts no inbound connection: its record says it is reached only through a relay (the
    # circuit through the bootstrap is its only address), and it keeps out of the DHT's routing
    assert nat.reachability.value == "relay" and nat.dht_client_mode
    assert nat.addrs == (f"{swarm.maddrs[0]}/p2p-circuit/p2p/{nat.peer_id}",), nat.addrs

    def links_with_nat():
        records = swarm.live()
        found = [(r.name, m) for r in records.values() for m in r.links if m.peer == nat.peer_id]
        return found + [("nat", m) for m in records["nat"].links]

    links = wait_for(
        links_with_nat, 60, "a measured link to or from the NAT node", interval_s=1, describe=swarm.report
    )
    assert all(m.rtt_s > 0 and m.out_bytes_per_s > 0 and m.in_bytes_per_s > 0 for _, m in links)
    # and the planner plans with it like with any member
    plan_that(swarm, lambda p: nat.peer_id in p.members, REPLAN_BOUND_S, "a plan that counts the NAT node")


def test_a_new_node_joins_and_gets_layers(swarm):
    before = plan_that(swarm, covers_every_layer, REPLAN_BOUND_S, "a covering plan")
    swarm.start("n5")
    n5 = peer_of(swarm, "n5")
    plan = plan_that(
        swarm,
        lambda p: p.epoch > before.epoch and n5 in p.placement and covers_every_layer(p),
        REPLAN_BOUND_S,
        "a plan giving n5 layers",
    )
    wait_for(lambda: loaded(swarm, plan), REPLAN_BOUND_S, "the new plan loaded", describe=swarm.report)


def test_a_leaving_node_finishes_its_sessions_refuses_new_ones_and_is_planned_around(swarm):
    from helix_p2p.protocol.driver import RemoteSession

    n3 = peer_of(swarm, "n3")
    before = plan_that(
        swarm, lambda p: n3 in p.placement and covers_every_layer(p), REPLAN_BOUND_S, "n3 placed"
    )
    wait_for(lambda: loaded(swarm, before), REPLAN_BOUND_S, "the plan loaded", describe=swarm.report)
    p2p = swarm.observer.dht.p2p
    route = route_through(before, n3)
    session = swarm.observer.run(RemoteSession.open(p2p, route, max_length=32))
    token = swarm.observer.run(session.step([5, 17, 42])).token_id

    proc = swarm.nodes["n3"]
    swarm.stopped.add("n3")
    swarm.procs.signal(proc, signal.SIGTERM)
    wait_for(
        lambda: "state serving -> leaving" in proc.stderr(), 30, "n3 to start leaving", describe=swarm.report
    )
    with pytest.raises(HelixError, match="leaving"):
        swarm.observer.run(RemoteSession.open(p2p, route, max_length=32))
    swarm.observer.run(session.step([token]))  # the running session still runs on n3
    swarm.observer.run(session.close())
    closed_at = time.monotonic()
    assert swarm.procs.wait(proc, GRACE_S + 30) == 0
    assert time.monotonic() - closed_at < GRACE_S  # it left when its last session closed
    assert "still running" not in proc.stderr()

    plan = plan_that(
        swarm,
        lambda p: p.epoch > before.epoch and n3 not in p.members and covers_every_layer(p),
        REPLAN_BOUND_S,
        "a plan without n3",
    )
    wait_for(lambda: loaded(swarm, plan), REPLAN_BOUND_S, "the repaired plan loaded", describe=swarm.report)


def route_through(plan, peer: str):
    """A route over the whole model whose hops include `peer`'s whole range, the rest taken from
    other nodes (sub-ranges where needed)."""
    from helix_p2p.protocol.messages import RouteHop

    start, end = plan.placement[peer]
    hops: list[RouteHop] = []

    def cover(position: int, upto: int) -> int:
        while position < upto:
            here = [(p, e) for p, (s, e) in plan.placement.items() if p != peer and s <= position < e]
            other, reach = max(here, key=lambda c: c[1])
            hops.append(RouteHop(other, position, min(reach, upto)))
            position = min(reach, upto)
        return position

    cover(0, start)
    hops.append(RouteHop(peer, start, end))
    cover(end, NUM_LAYERS)
    return hops


def test_a_crashed_node_is_planned_around(swarm):
    n4 = peer_of(swarm, "n4")
    before = swarm.plan()
    swarm.stopped.add("n4")
    swarm.procs.kill(swarm.nodes["n4"])
    plan = plan_that(
        swarm,
        lambda p: p.epoch > before.epoch and n4 not in p.members and covers_every_layer(p),
        TTL_S + REPLAN_BOUND_S,
        "a plan without the crashed n4",
    )
    wait_for(lambda: loaded(swarm, plan), REPLAN_BOUND_S, "the repaired plan loaded", describe=swarm.report)


def test_killing_the_planner_elects_another_within_one_ttl(swarm):
    before = plan_that(swarm, covers_every_layer, REPLAN_BOUND_S, "a covering plan")
    name = next(n for n, r in swarm.live().items() if r.peer_id == before.planner)
    swarm.stopped.add(name)
    killed_at = time.monotonic()
    swarm.procs.kill(swarm.nodes[name])
    plan = plan_that(
        swarm,
        lambda p: p.planner != before.planner and p.epoch > before.epoch,
        TTL_S,
        f"a newer plan from another planner within one TTL ({TTL_S:g} s) of killing {name}",
    )
    took = time.monotonic() - killed_at
    assert took <= TTL_S
    assert before.planner not in plan.members and covers_every_layer(plan)
    wait_for(
        lambda: loaded(swarm, plan), REPLAN_BOUND_S, "the new planner's plan loaded", describe=swarm.report
    )


def test_ctrl_c_in_a_terminal_stops_a_node_cleanly(swarm):
    """A terminal's Ctrl-C reaches the whole process group, the p2p daemon included, which then
    dies before the node can announce that it leaves: the node must still exit 0, promptly."""
    import os

    proc = swarm.nodes["n5"]
    swarm.stopped.add("n5")
    os.killpg(proc.pid, signal.SIGINT)
    assert swarm.procs.wait(proc, 60) == 0, proc.stderr()[-3000:]
    assert "Traceback" not in proc.stderr()


# ------------------------------------------------------------------------------------------ helpers


def _replace_plan(plan, **changes):
    from dataclasses import replace

    return replace(plan, **changes)


def _replace_record(record, **changes):
    from dataclasses import replace

    return replace(record, **changes)


def _owner_key_of(swarm: Swarm, peer_id: str) -> bytes:
    """The public key in the peer's registry subkey, as any reader of the registry sees it."""
    from helix_p2p.swarm.identity import peer_id_of, public_key_of_owner_subkey
    from helix_p2p.swarm.keys import registry_key

    found = swarm.observer.run(swarm.observer.dht.node.get(registry_key("helix", peer_id), latest=True))
    for subkey in found.value:
        key = public_key_of_owner_subkey(subkey)
        if key is not None and peer_id_of(key) == peer_id:
            return key
    raise AssertionError(f"no registry entry for {peer_id}")


async def _publish_signed_by(identity, maddrs, record) -> bool:
    """Store `record` as a plan signed with `identity`'s key, from a throw-away DHT peer whose own
    libp2p identity differs (the member itself keeps running)."""
    from hivemind.dht.node import DHTNode
    from hivemind.dht.validation import CompositeValidator
    from hivemind.utils.timed_storage import get_dht_time

    from helix_p2p.swarm.identity import ephemeral_identity
    from helix_p2p.swarm.keys import plan_key
    from helix_p2p.swarm.records import signed_plan_to_wire
    from helix_p2p.swarm.signing import sign_plan
    from helix_p2p.swarm.validator import swarm_validators

    p2p_identity = ephemeral_identity()
    node = await DHTNode.create(
        initial_peers=maddrs,
        identity_path=str(p2p_identity.path),
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        client_mode=True,
        record_validator=CompositeValidator(swarm_validators(identity, "helix")),
    )
    try:
        signed = sign_plan(record, identity)
        return await node.store(
            plan_key("helix"),
            signed_plan_to_wire(signed),
            get_dht_time() + TTL_S,
            subkey=identity.owner_subkey,
        )
    finally:
        await node.shutdown()
        await asyncio.sleep(0)
        p2p_identity.path.chmod(0o600)
        p2p_identity.path.unlink()
