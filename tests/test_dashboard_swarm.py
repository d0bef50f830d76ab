"""The status page and the metrics against a real swarm on 127.0.0.1: a bootstrap serving the page
(`--dashboard-port`), three `helix-node join` processes with throughput tables and `--metrics-port`,
and the OpenAI gateway (in this process) in front of a client. One module-scoped swarm:

1. the bootstrap's `/api/state` and the gateway's show every node, the followed plan's epoch and
   flow graph, and the swarm's tokens/s once a generation has gone through;
2. headless Chromium renders the page: the layer map has a row per node, the plan line its epoch,
   and the script has polled `api/state` (a screenshot lands in the test's temp dir);
3. `/metrics` of the nodes and of the gateway parse, and their counters moved with the generations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from procs import FAST, Processes, SwarmObserver, free_port, start_bootstrap, start_node, wait_for

from helix_p2p.metrics import parse_exposition

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL_ID = "tiny-dashboard"
NUM_LAYERS = 4
TIMINGS = dict(FAST, **{"--ttl-s": "10", "--refresh-s": "1.5"})
#: two layers at most each: a fast node, a middling one and a slow one
TABLES = {"fast": [900.0, 500.0], "mid": [600.0, 350.0], "slow": [300.0, 180.0]}
CHROMIUM = "/usr/bin/chromium"
MAX_TOKENS = 6


@dataclass
class Swarm:
    procs: Processes
    maddrs: list[str]
    model: Path
    dashboard_url: str
    metrics_urls: dict[str, str] = field(default_factory=dict)
    plan_epoch: int = -1


def get(url: str, timeout_s: float = 20) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read()


def state_of(base_url: str) -> dict:
    return json.loads(get(f"{base_url}/api/state"))


def _ready(observer: SwarmObserver):
    return observer.served_plan(MODEL_ID, min_placed=len(TABLES))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from helix_p2p.shard import TinyModelSpec, make_tiny_model

    workdir = tmp_path_factory.mktemp("dashboard-swarm")
    model = make_tiny_model(workdir / MODEL_ID, TinyModelSpec(num_layers=NUM_LAYERS, initializer_range=0.1))
    dashboard_port = free_port()
    with Processes(workdir) as procs:
        boot = start_bootstrap(procs, extra=["--dashboard-port", str(dashboard_port)])
        s = Swarm(procs, boot.maddrs, model, f"http://127.0.0.1:{dashboard_port}")
        for name, table in TABLES.items():
            port = free_port()
            s.metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
            start_node(procs, name, boot.maddrs, model, table, "--planner-method", "petals",
                       "--metrics-port", str(port), timings=TIMINGS)  # fmt: skip
        with SwarmObserver(boot.maddrs) as observer:
            plan = wait_for(lambda: _ready(observer), 150, "a plan over all three nodes, loaded",
                            describe=procs.report)  # fmt: skip
        s.plan_epoch = plan.epoch
        yield s


@pytest.fixture(scope="module")
def gateway(swarm):
    """The gateway's base URL, after two completions went through it (the counters have moved)."""
    from helix_p2p.client import ClientOptions, HelixClient
    from helix_p2p.client.gateway import gateway_in_background

    options = ClientOptions(step_timeout_s=20, route_wait_s=20)
    with (
        HelixClient(swarm.maddrs, model=str(swarm.model), options=options) as client,
        gateway_in_background(client, free_port()) as api,
    ):
        for prompt in ("the quick brown fox", "hello"):
            body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            request = urllib.request.Request(
                f"{api}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
            assert answer["usage"]["completion_tokens"] >= 1, answer
        yield api.removesuffix("/v1")


def test_api_state_shows_nodes_plan_flows_and_rates(swarm, gateway) -> None:
    def settled():
        state = state_of(swarm.dashboard_url)
        plan = state["plan"]
        # counters reach the page with each node's next record refresh: wait for both requests' own
        counted = sum(n["requests_started"] for n in state["nodes"]) >= 2
        counted = counted and sum(n["tokens_generated"] for n in state["nodes"]) >= 2
        fresh = plan and plan["epoch"] >= swarm.plan_epoch and state["tokens_per_s"] > 0
        return state if fresh and counted else None

    state = wait_for(settled, 30, "the bootstrap's page to show the plan and a token rate",
                     describe=lambda: json.dumps(state_of(swarm.dashboard_url))[:2000])  # fmt: skip
    assert {n["name"] for n in state["nodes"]} == set(TABLES)
    assert {m["name"] for m in state["layer_map"]} == set(TABLES)
    assert all(n["state"] == "serving" and n["free_kv_tokens"] > 0 for n in state["nodes"])
    assert state["num_layers"] == NUM_LAYERS
    flows = state["plan"]["flows"]
    assert {e["src"] for e in flows} >= {"source"} and {e["dst"] for e in flows} >= {"sink"}
    out_of_source = sum(e["tokens_per_s"] for e in flows if e["src"] == "source")
    assert out_of_source == pytest.approx(state["plan"]["objective_tokens_per_s"], rel=1e-6)
    # every generated token is counted once, by the node that sampled it
    assert sum(n["tokens_generated"] for n in state["nodes"]) >= 2
    assert sum(n["requests_started"] for n in state["nodes"]) >= 2

    # the gateway serves the same page and state from its client's view
    mirrored = state_of(gateway)
    assert {n["name"] for n in mirrored["nodes"]} == set(TABLES)
    assert mirrored["plan"]["epoch"] == state["plan"]["epoch"]
    assert b'id="layermap"' in get(f"{gateway}/")


def _chromium(url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *extra, url]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)


def test_the_page_renders_in_chromium(swarm, gateway, tmp_path) -> None:
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        if os.environ.get("HELIX_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"HELIX_REQUIRE_CHROMIUM=1 but {CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium); the browser test needs it")
    state = state_of(swarm.dashboard_url)
    epoch = state["plan"]["epoch"]

    done = _chromium(f"{swarm.dashboard_url}/", tmp_path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-3000:]
    dom = done.stdout
    for node in state["nodes"]:
        assert f'class="layer-row" data-peer="{node["peer_id"]}"' in dom, (
            f"no layer-map row for {node['name']}"
        )
        assert f">{node['name']}</text>" in dom
    assert dom.count('class="held"') == len(TABLES)  # each node's bar over the layers it holds
    assert f"plan: epoch {epoch} " in dom
    assert 'data-polls="' in dom, "the script never fetched api/state"
    assert dom.count('class="edge"') == len(state["plan"]["flows"])

    shot = tmp_path / "dashboard.png"
    done = _chromium(f"{swarm.dashboard_url}/", tmp_path, f"--screenshot={shot}", "--window-size=1280,900")
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-3000:]


def test_metrics_of_nodes_and_gateway_moved(swarm, gateway) -> None:
    scraped = {name: parse_exposition(get(url).decode()) for name, url in swarm.metrics_urls.items()}
    for name, m in scraped.items():
        assert m.types["helix_node_step_seconds"] == "histogram", name
        assert m.value("helix_node_kv_tokens_free") > 0, name
        assert m.value("helix_node_sessions_open") >= 0
    # each completion opened a session on every node of its route, and one node sampled its tokens
    assert sum(m.value("helix_node_requests_started_total") for m in scraped.values()) >= 2
    assert sum(m.value("helix_node_tokens_generated_total") for m in scraped.values()) >= 2
    assert sum(m.total("helix_node_step_seconds_count") for m in scraped.values()) >= 4
    processed = [
        s for m in scraped.values() for s in m.samples if s.name == "helix_node_tokens_processed_total"
    ]
    assert {s.labels["phase"] for s in processed if s.value > 0} == {"prefill", "decode"}

    # a bad request is counted by its error code
    request = urllib.request.Request(
        f"{gateway}/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 404
    m = parse_exposition(get(f"{gateway}/metrics").decode())
    assert m.value("helix_gateway_requests_total", endpoint="completions") == 3
    assert m.value("helix_gateway_errors_total", kind="model_not_found") == 1
    assert 2 <= m.value("helix_gateway_tokens_total", kind="completion") <= 2 * MAX_TOKENS
    assert m.value("helix_gateway_tokens_total", kind="prompt") >= 2
    assert m.value("helix_gateway_time_to_first_token_seconds_count") == 2
    assert m.value("helix_gateway_time_to_first_token_seconds_sum") > 0
    assert m.value("helix_gateway_requests_in_flight") == 0
