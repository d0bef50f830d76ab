"""The status page's state, built from records and plans (pure), its rates from successive records,
and the page's HTML keeping strangers' names inert. The live page is tested in
`test_dashboard_swarm.py`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from swarm_builders import NOW, node, plan

from helix_p2p.plan import EdgeFlow
from helix_p2p.swarm.records import NodeState
from helix_p2p.swarm.status import PeerRates, advance_rates, swarm_state
from helix_p2p.web.page import render_page


def _swarm():
    records = {
        "QmA": node("QmA", layers=(0, 4), name="alpha", gpu="A100", load=2.0, joined_at=NOW - 50),
        "QmB": node("QmB", layers=(4, 8), name="beta", gpu="T4", free_kv_tokens=300, joined_at=NOW - 40),
        "QmC": node("QmC", state=NodeState.LOADING, name="gamma", joined_at=NOW - 30),
    }
    placement = {"QmA": (0, 4), "QmB": (4, 8), "QmC": (0, 8)}
    flows = (
        EdgeFlow("source", "QmA", 6.0), EdgeFlow("QmA", "QmB", 6.0), EdgeFlow("QmB", "sink", 6.0),
        EdgeFlow("source", "QmC", 4.0), EdgeFlow("QmC", "sink", 4.0),
    )  # fmt: skip
    bounds = {"objective_tokens_per_s": 10.0, "upper_bound_tokens_per_s": 12.0}
    plans = [plan(7, "QmA", placement, flows=flows, **bounds)]
    return records, plans


def test_state_has_nodes_layer_map_flow_graph_plan_and_rates():
    records, plans = _swarm()
    state = swarm_state(records, plans, NOW, {})
    assert [n["name"] for n in state["nodes"]] == ["alpha", "beta", "gamma"]
    alpha = state["nodes"][0]
    assert [alpha[k] for k in ("gpu", "state", "load", "free_kv_tokens")] == ["A100", "serving", 2.0, 1000]
    assert state["num_layers"] == 8
    # gamma is planned for [0, 8) but holds nothing yet: in the map, with its planned range
    assert state["layer_map"] == [
        {"peer_id": "QmA", "name": "alpha", "layers": [0, 4], "planned": [0, 4]},
        {"peer_id": "QmB", "name": "beta", "layers": [4, 8], "planned": [4, 8]},
        {"peer_id": "QmC", "name": "gamma", "layers": None, "planned": [0, 8]},
    ]
    p = state["plan"]
    assert [p["epoch"], p["planner"], p["objective_tokens_per_s"], p["upper_bound_tokens_per_s"]] == [
        7,
        "QmA",
        10,
        12,
    ]
    assert {(e["src"], e["dst"]): e["tokens_per_s"] for e in p["flows"]} == {
        ("source", "QmA"): 6.0, ("QmA", "QmB"): 6.0, ("QmB", "sink"): 6.0, ("source", "QmC"): 4.0, ("QmC", "sink"): 4.0,
    }  # fmt: skip
    assert state["requests_per_s"] == 0.0 and state["tokens_per_s"] == 0.0
    json.dumps(state, allow_nan=False)  # what /api/state sends


def test_state_of_an_empty_swarm():
    state = swarm_state({}, [], NOW, {})
    assert (state["nodes"], state["plan"], state["layer_map"], state["num_layers"]) == ([], None, [], 0)


def test_rates_come_from_successive_records_of_each_node():
    a0 = node("QmA", updated_at=NOW, requests_started=10, tokens_generated=100)
    b0 = node("QmB", updated_at=NOW, requests_started=0, tokens_generated=0)
    rates = advance_rates({}, {"QmA": a0, "QmB": b0})
    assert rates["QmA"] == PeerRates(NOW, 10, 100)  # first sight: no rate yet

    # A's next record 4 s later; B's record did not change (a page polls faster than records refresh)
    a1 = replace(a0, updated_at=NOW + 4, requests_started=12, tokens_generated=140)
    rates = advance_rates(rates, {"QmA": a1, "QmB": b0})
    assert (rates["QmA"].requests_per_s, rates["QmA"].tokens_per_s) == (0.5, 10.0)
    assert rates["QmB"].tokens_per_s == 0.0
    # the same record again keeps the rate
    assert advance_rates(rates, {"QmA": a1})["QmA"].tokens_per_s == 10.0
    # a restarted node (counter went down) counts from zero; a node gone is dropped
    a2 = replace(a1, updated_at=NOW + 6, requests_started=1, tokens_generated=8)
    rates = advance_rates(rates, {"QmA": a2})
    assert set(rates) == {"QmA"} and rates["QmA"].tokens_per_s == 4.0

    records, plans = _swarm()
    records["QmA"] = replace(records["QmA"], updated_at=NOW - 1)
    a = replace(records["QmA"], updated_at=NOW + 1, tokens_generated=30, requests_started=2)
    later = {**records, "QmA": a}
    rates = advance_rates(advance_rates({}, records), later)
    state = swarm_state(later, plans, NOW + 1, rates)
    assert state["tokens_per_s"] == 15.0 and state["requests_per_s"] == 1.0
    assert state["nodes"][0]["tokens_generated_per_s"] == 15.0 and state["nodes"][0]["tokens_generated"] == 30


@pytest.mark.parametrize("name", ["</script><script>alert(1)</script>", "<img src=x onerror=alert(1)>"])
def test_the_page_embeds_the_state_inertly(name):
    records, plans = _swarm()
    records["QmA"] = replace(records["QmA"], name=name)
    html = render_page(swarm_state(records, plans, NOW, {}))
    assert name not in html  # "<" is escaped inside the embedded JSON: no element can open or close
    after = html.split('<script id="initial-state" type="application/json">', 1)[1]
    embedded = after.split("</script>", 1)[0]
    assert json.loads(embedded)["nodes"][0]["name"] == name
    assert "innerHTML" not in html  # the script only sets text and attributes


def test_bad_ports_are_one_line_errors(tmp_path, capsys):
    from helix_p2p.bootstrap.cli import main as bootstrap_main
    from helix_p2p.node.cli import build_parser, config_from_args
    from helix_p2p.node.config import NodeConfigError

    assert bootstrap_main(["--identity", str(tmp_path / "b.key"), "--dashboard-port", "70000"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "helix-bootstrap: error: --dashboard-port must be in 1..65535, got 70000"
    )
    peer = "/ip4/127.0.0.1/tcp/1/p2p/QmXYp1b3GqWRQmXYp1b3GqWR"
    args = build_parser().parse_args(["join", "--initial-peers", peer, "--model", "m", "--metrics-port", "0"])
    with pytest.raises(NodeConfigError, match="--metrics-port must be in 1..65535, got 0"):
        config_from_args(args)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_dashboard_port_in_use_is_a_one_line_error(tmp_path):
    import socket
    import subprocess

    from procs import bootstrap_argv

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = bootstrap_argv("--host", "127.0.0.1", "--port", "0", "--identity", str(tmp_path / "b.key"),
                              "--dashboard-port", str(port))  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last
        == f"helix-bootstrap: error: cannot serve the status page on 127.0.0.1:{port}: the port is in use"
    )
    assert "Traceback" not in done.stderr
