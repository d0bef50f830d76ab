"""What the HTTP layer costs: time to first token and decode tokens/s through the OpenAI-compatible
gateway (driven by the `openai` package, streaming), against the library (`HelixClient`) and the
`helix generate` command, with 1 and 16 concurrent clients, on a real swarm on 127.0.0.1 (a
bootstrap and two `helix-node join` processes holding halves of a tiny Llama).

Prints one table; ratios are against the library with the same number of clients. `helix generate`
runs with one client only: each run is a process that imports torch and joins the DHT, and its
wall time (start-up included) is shown beside the timings it reports itself.

    python benchmarks/client.py [--tokens 32] [--layers 4] [--rounds 5]"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the process helpers the swarm tests use

from procs import Processes, SwarmObserver, free_port, start_bootstrap, start_node, wait_for

MODEL_ID = "bench-client"
PROMPT = "the quick brown fox jumps over the lazy dog"


def start_swarm(procs: Processes, model: Path, layers: int) -> list[str]:
    boot = start_bootstrap(procs)
    half = [900.0] * (layers // 2)
    for name in ("n1", "n2"):
        start_node(procs, name, boot.maddrs, model, half, "--planner-method", "petals")
    with SwarmObserver(boot.maddrs) as observer:

        def ready():
            plan = observer.followed_plan(MODEL_ID)
            if plan is None or len(plan.placement) < 2:
                return None
            records, _ = observer.read()
            return all(
                (r := records.get(p)) is not None and r.layers == span and r.state.value == "serving"
                for p, span in plan.placement.items()
            )

        wait_for(ready, 180, "a loaded plan over both nodes", describe=procs.report)
    return boot.maddrs


def library(client, clients: int, tokens: int) -> list[tuple[float, float]]:
    """(first-token seconds, decode tokens/s) per request, all started at once."""
    futures = [client.start(PROMPT, max_new_tokens=tokens) for _ in range(clients)]
    results = [f.result() for f in futures]
    return [(r.timings.first_token_s, r.timings.decode_tokens_per_s) for r in results]


def gateway(base_url: str, clients: int, tokens: int) -> list[tuple[float, float]]:
    import openai

    def one(_: int) -> tuple[float, float]:
        api = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
        started = time.perf_counter()
        first = None
        count = 0
        for chunk in api.completions.create(
            model=MODEL_ID, prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True
        ):
            if chunk.choices[0].finish_reason is None:  # one event per token
                count += 1
                first = first or time.perf_counter()
        end = time.perf_counter()
        first = first or end
        return first - started, (count - 1) / (end - first) if end > first else 0.0

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def cli(maddrs: list[str], model: Path, tokens: int) -> tuple[float, float, float]:
    argv = [str(Path(sys.executable).parent / "helix"), "generate", "--initial-peers", *maddrs,
            "--model", str(model), "--max-new-tokens", str(tokens), "--json", PROMPT]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - started
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["timings"]["first_token_s"], out["timings"]["decode_tokens_per_s"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="repetitions of each row (medians are shown)")
    args = parser.parse_args()

    from helix_p2p.client import ClientOptions, HelixClient
    from helix_p2p.client.gateway import gateway_in_background

    from helix_p2p.shard import TinyModelSpec, make_tiny_model

    with tempfile.TemporaryDirectory() as tmp, Processes(Path(tmp)) as procs:
        model = make_tiny_model(Path(tmp) / MODEL_ID, TinyModelSpec(num_layers=args.layers))
        maddrs = start_swarm(procs, model, args.layers)
        rows = []
        with HelixClient(maddrs, model=str(model), options=ClientOptions()) as client:
            library(client, 1, 4)  # warm-up: connections to both nodes
            with gateway_in_background(client, free_port()) as url:
                for clients in (1, 16):
                    base, http = [], []
                    for _ in range(args.rounds):  # interleaved, so that load from elsewhere hits both
                        base += library(client, clients, args.tokens)
                        http += gateway(url, clients, args.tokens)
                    rows.append(("library", clients, base, base))
                    rows.append(("gateway (openai, stream)", clients, http, base))
        first, rate, wall = cli(maddrs, model, args.tokens)

    print(
        f"{args.tokens} new tokens per request, tiny Llama with {args.layers} layers over 2 nodes, 127.0.0.1"
    )
    print(
        f"{'path':<26} {'clients':>7} {'TTFT s (med)':>12} {'tok/s/client':>12} {'TTFT ratio':>10} {'tok/s ratio':>11}"
    )
    for name, clients, got, base in rows:
        ttft = statistics.median(t for t, _ in got)
        rate_ = statistics.median(r for _, r in got)
        ttft0 = statistics.median(t for t, _ in base)
        rate0 = statistics.median(r for _, r in base)
        print(
            f"{name:<26} {clients:>7} {ttft:>12.4f} {rate_:>12.1f} {ttft / ttft0:>10.2f} {rate_ / rate0:>11.2f}"
        )
    print(
        f"{'helix generate (--json)':<26} {1:>7} {first:>12.4f} {rate:>12.1f}   (process wall time {wall:.1f} s)"
    )


if __name__ == "__main__":
    main()
