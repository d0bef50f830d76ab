"""What `helix status` shows, from records and plans (the DHT reading is tested with real processes)."""

from __future__ import annotations

from swarm_builders import MODEL, NOW, node, plan

from helix_p2p.swarm.records import NodeState
from helix_p2p.swarm.status import format_status, held_tokens_per_s, swarm_status


def test_status_lists_live_nodes_and_the_elected_plan():
    records = {
        "QmA": node("QmA", layers=(0, 4), joined_at=NOW - 50, name="alpha", gpu="A100"),
        "QmB": node("QmB", layers=(4, 8), joined_at=NOW - 40, name="beta"),
        "QmC": node("QmC", state=NodeState.JOINING, joined_at=NOW - 10),
        "QmGone": node("QmGone", updated_at=NOW - 100),
    }
    plans = [
        plan(3, "QmA", {"QmA": (0, 4), "QmB": (4, 8)}, upper_bound_tokens_per_s=12.0),
        plan(50, "QmB", {"QmB": (0, 8)}),  # not the elected planner
    ]
    doc = swarm_status(records, plans, NOW)
    assert doc["model"] == MODEL.id
    assert [n["peer_id"] for n in doc["nodes"]] == ["QmA", "QmB", "QmC"]
    alpha = doc["nodes"][0]
    assert alpha == {
        "peer_id": "QmA", "name": "alpha", "gpu": "A100", "state": "serving", "layers": [0, 4],
        "tokens_per_s": 100.0, "free_kv_tokens": 1000, "reachability": "direct",
    }  # fmt: skip
    assert doc["nodes"][2]["layers"] is None and doc["nodes"][2]["tokens_per_s"] is None
    assert doc["plan"]["epoch"] == 3 and doc["plan"]["planner"] == "QmA"
    assert doc["plan"]["placement"] == {"QmA": [0, 4], "QmB": [4, 8]}
    text = format_status(doc)
    assert "alpha" in text and "[0, 4)" in text and "epoch 3" in text and "bound 12.0 tokens/s" in text


def test_status_of_an_empty_swarm():
    doc = swarm_status({}, [], NOW)
    assert doc == {"model": None, "nodes": [], "plan": None}
    assert "plan: none yet" in format_status(doc)


def test_held_throughput_is_read_from_the_table():
    assert held_tokens_per_s(node("QmA", layers=(2, 4))) == 200.0
    assert held_tokens_per_s(node("QmA")) is None


def test_plan_served_waits_for_every_planned_node_to_serve_its_own_layers():
    from helix_p2p.swarm.status import plan_served

    def node(peer, state, layers):
        return {"peer_id": peer, "state": state, "layers": layers}

    plan = {"epoch": 3, "placement": {"A": [0, 2], "B": [2, 4]}}
    assert plan_served({"nodes": [node("A", "serving", [0, 2])], "plan": None}) == (False, "1 live node(s), no plan yet")
    waiting = {"nodes": [node("A", "serving", [0, 2]), node("B", "loading", None)], "plan": plan}
    assert plan_served(waiting) == (False, "plan epoch 3: 1/2 planned node(s) serving")
    stale_layers = {"nodes": [node("A", "serving", [0, 2]), node("B", "serving", [2, 3])], "plan": plan}
    assert plan_served(stale_layers)[0] is False
    done = {"nodes": [node("A", "serving", [0, 2]), node("B", "serving", [2, 4]), node("C", "standby", None)], "plan": plan}
    assert plan_served(done) == (True, "plan epoch 3: 2/2 planned node(s) serving")
    assert plan_served({"nodes": [], "plan": {"epoch": 1, "placement": {}}})[0] is False
    # a script that started a third node waits for the plan that places it
    assert plan_served(done, min_nodes=2)[0] is True
    assert plan_served(done, min_nodes=3) == (False, "plan epoch 3 places 2 node(s), waiting for 3 (3 live)")
