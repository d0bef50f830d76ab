"""Lying peers against a real swarm on 127.0.0.1 (`--verify-rate`): a bootstrap and `helix-node
join` processes serving a tiny 4-layer Llama; node "a" can hold all four layers, "b" and "c" two.
The tests run in order on one swarm:

1. honest nodes only: a client verifying every step finds no liar and no suspect, and its greedy
   output equals `transformers`' on the whole checkpoint;
2. node "d" joins with the hidden test flag `--test-perturb-outputs` (noise on everything it
   computes) and is planned onto layers [0, 2), which "a" and "c" also hold: a client verifying
   every step catches it, reports it, routes around it, and its output stays the whole model's;
3. the report is in the DHT, signed under the client's key; a second client that verifies nothing
   reads it and never routes to "d";
4. the elected planner's next plan leaves "d" out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from procs import FAST, Proc, Processes, SwarmObserver, start_bootstrap, start_node, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

MODEL_ID = "tiny-verify"
NUM_LAYERS = 4
TIMINGS = dict(FAST, **{"--ttl-s": "10", "--refresh-s": "1.5"})
HONEST = {"a": [900.0, 500.0, 300.0, 200.0], "b": [800.0, 450.0], "c": [700.0, 400.0]}
LIAR = ("d", [600.0, 350.0])
#: every node leaves out a peer one reporter accused (the default, 2, needs two clients)
BAN = ("--ban-min-reporters", "1")
PROMPT = "the quick brown fox"
NEW_TOKENS = 8


@dataclass
class Swarm:
    procs: Processes
    maddrs: list[str]
    model: Path
    observer: SwarmObserver
    nodes: dict[str, Proc] = field(default_factory=dict)

    def peer_of(self, name: str) -> str:
        records, _ = self.observer.read()
        return next(p for p, r in records.items() if r.name == name)


def _ready(swarm: Swarm, names: set[str]):
    return swarm.observer.served_plan(MODEL_ID, names=names)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from helix_p2p.shard import TinyModelSpec, make_tiny_model

    workdir = tmp_path_factory.mktemp("verify-swarm")
    model = make_tiny_model(workdir / MODEL_ID, TinyModelSpec(num_layers=NUM_LAYERS, initializer_range=0.2))
    with Processes(workdir) as procs:
        boot = start_bootstrap(procs)
        observer = SwarmObserver(boot.maddrs)
        try:
            s = Swarm(procs, boot.maddrs, model, observer)
            for name, table in HONEST.items():
                s.nodes[name] = start_node(
                    procs,
                    name,
                    boot.maddrs,
                    model,
                    table,
                    "--planner-method",
                    "petals",
                    *BAN,
                    timings=TIMINGS,
                )
            wait_for(
                lambda: _ready(s, set(HONEST)), 150, "a plan over the honest nodes", describe=procs.report
            )
            yield s
        finally:
            observer.close()


@pytest.fixture(scope="module")
def expected(swarm) -> list[int]:
    """The whole model's greedy continuation of PROMPT."""
    from shard_fixtures import whole_model_greedy

    _, tokens = whole_model_greedy(swarm.model, PROMPT, NEW_TOKENS)
    assert len(set(tokens)) >= 4, f"a continuation that tells tokens apart: {tokens}"
    return tokens


def _client(swarm: Swarm, verify_rate: float):
    from helix_p2p.client import ClientOptions, HelixClient

    options = ClientOptions(
        step_timeout_s=20, avoid_s=60, route_wait_s=10, max_failovers=6, ban_min_reporters=1, refresh_s=1.0
    )
    return HelixClient(swarm.maddrs, model=str(swarm.model), options=options, verify_rate=verify_rate)


def test_honest_swarm_has_no_false_positives(swarm, expected) -> None:
    with _client(swarm, verify_rate=1.0) as client:
        for _ in range(2):
            result = client.generate(PROMPT, max_new_tokens=NEW_TOKENS)
            assert result.token_ids == expected[: len(result.token_ids)] and result.finish_reason in (
                "length",
                "stop",
            )
            assert result.failovers == 0, result.failures
        verifier = client.verifier
        assert verifier is not None and verifier.comparisons >= NEW_TOKENS, "every step compared somewhere"
        assert verifier.disagreements == 0 and not client.liars and not client.avoided()
    reports = swarm.observer.run(swarm.observer.dht.read_reports())
    assert reports == []


@pytest.fixture(scope="module")
def liar(swarm) -> str:
    name, table = LIAR
    swarm.nodes[name] = start_node(
        swarm.procs, name, swarm.maddrs, swarm.model, table, "--planner-method", "petals", *BAN,
        "--no-plan", "--test-perturb-outputs", "1.0", timings=TIMINGS,
    )  # fmt: skip
    plan = wait_for(
        lambda: _ready(swarm, {*HONEST, name}),
        150,
        "a plan that gives the liar layers",
        describe=swarm.procs.report,
    )
    peer = swarm.peer_of(name)
    span = plan.placement[peer]
    others = [p for p, (s, e) in plan.placement.items() if p != peer and s <= span[0] and span[1] <= e]
    assert len(others) >= 2, (
        f"the liar's layers {span} need two other holders to outvote it: {plan.placement}"
    )
    return peer


def test_liar_is_caught_reported_and_routed_around(swarm, expected, liar) -> None:
    with _client(swarm, verify_rate=1.0) as client:
        for attempt in range(6):
            result = client.generate(PROMPT, max_new_tokens=NEW_TOKENS)
            assert result.token_ids == expected[: len(result.token_ids)], (attempt, result.failures)
            if liar in client.liars:
                break
        assert client.liars == {liar}, (client.liars, swarm.procs.report())
        assert client.verifier is not None and client.verifier.disagreements >= 1
        # from now on the liar is on no route, and the output stays the whole model's
        # (the planner may be moving layers around the banned liar meanwhile: failovers allowed)
        result = client.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        assert liar not in {hop["peer_id"] for hop in result.route}
        assert result.token_ids == expected[: len(result.token_ids)]
        reporter = client.dht.peer_id

    def reported():
        reports = swarm.observer.run(swarm.observer.dht.read_reports())
        return [r for r in reports if r.reporter == reporter and liar in {a.peer_id for a in r.accusations}]

    found = wait_for(reported, 30, "the client's report in the DHT")
    assert found[0].model == MODEL_ID


def test_other_clients_read_the_report_and_avoid_the_liar(swarm, expected, liar) -> None:
    with _client(swarm, verify_rate=0.0) as client:
        wait_for(lambda: liar in client.snapshot().banned, 30, "the ban in the client's view")
        for _ in range(3):
            result = client.generate(PROMPT, max_new_tokens=4)
            assert liar not in {hop["peer_id"] for hop in result.route}
            assert result.token_ids == expected[:4]


def test_planner_leaves_the_liar_out(swarm, liar) -> None:
    def replanned():
        plan = swarm.observer.followed_plan(MODEL_ID)
        return plan if plan is not None and liar not in plan.members else None

    plan = wait_for(replanned, 60, "a plan without the reported liar", describe=swarm.procs.report)
    assert liar not in plan.placement and len(plan.placement) == len(HONEST)
