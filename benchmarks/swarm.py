"""The data plane's cost on loopback: what passing activations node to node adds to a decode step.

Starts standalone servers (`python -m helix_p2p.node.serve_cmd`), each holding the whole small
model so that a route can cut it anywhere, and a client in this process. Prints:

1. The physical floor and hivemind's own cost: the round trip of a 64-byte message on a bare TCP
   socket, of one hivemind unary call to a server process (a tiny request it refuses at once), and
   of the same request over the data plane's channel (a persistent libp2p stream, what hops and
   clients use; `helix_p2p.protocol.transport`).
2. Per-token decode latency through 1, 2, 3 and 4 hops, beside the same shard chain run in this
   process (no network): the difference, divided by the hops, is what the network path costs per
   hop; its ratio to one unary call is the issue's target (within 2x). Each hop count is measured
   `--repeats` times, each beside its own unary RTT, and the medians are printed (a loaded machine
   moves single runs by more than the cost measured).
3. Decode throughput with 1, 8 and 32 concurrent sessions through 3 hops, beside the same sessions
   batched in one process: it should grow with concurrency, through the nodes' continuous batching.

    python benchmarks/swarm.py [--layers 8] [--hidden 512] [--tokens 32] [--device cpu]"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the process helpers the data-plane tests use

import itertools

from dataplane_helpers import LoopThread, Server, start_servers
from procs import Processes

from helix_p2p.protocol import CloseSession, RouteHop
from helix_p2p.protocol.driver import RemoteSession
from helix_p2p.protocol.transport import call_peer, unary_call
from helix_p2p.protocol.wire import encode_request
from helix_p2p.shard import LocalChain, ShardSpec, TinyModelSpec, load_shard, make_tiny_model

PROMPT_TOKENS = 16
#: decode steps run before timing (first calls allocate and warm caches)
WARMUP_STEPS = 4


def split(num_layers: int, hops: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_layers / hops) for i in range(hops + 1)]
    return list(itertools.pairwise(bounds))


def tcp_rtt_s(rounds: int) -> float:
    """Median round trip of 64 bytes over a loopback TCP socket (an echo thread on the other end)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def echo() -> None:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(64):
                conn.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    times = []
    with socket.create_connection(server.getsockname()) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            start = time.perf_counter()
            client.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(client.recv(64 - got))
            times.append(time.perf_counter() - start)
    thread.join(timeout=5)
    server.close()
    return statistics.median(times)


async def unary_rtt_s(client: LoopThread, server: Server, rounds: int, *, channel: bool = False) -> float:
    """Median round trip of one hivemind unary call (or, with `channel`, one call over the data
    plane's channel) to a server process: a close of an unknown session, decoded, refused,
    answered; no model work."""
    request = encode_request(CloseSession("no-such-session"))
    call = call_peer if channel else unary_call
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await call(client.p2p, server.peer_id, request, 30)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def decode_latency_s(
    client: LoopThread, route: list[RouteHop], chain: LocalChain, tokens: int
) -> tuple[float, float, float]:
    """Seconds per decode step of one session over `route` and of the same session on `chain` in
    this process, steps interleaved so that both see the same load on the machine: the medians of
    each, and the median of the paired differences (the network path's cost)."""
    length = PROMPT_TOKENS + tokens + WARMUP_STEPS + 1
    prompt = list(range(3, 3 + PROMPT_TOKENS))
    session = await RemoteSession.open(client.p2p, route, length)
    chain.open_session("bench", length)
    remote, local = [], []
    try:
        token = (await session.step(prompt)).token_id
        local_token = chain.step("bench", torch.tensor(prompt)).token_id
        for i in range(tokens + WARMUP_STEPS):
            start = time.perf_counter()
            token = (await session.step([token])).token_id
            middle = time.perf_counter()
            local_token = chain.step("bench", torch.tensor([local_token])).token_id
            end = time.perf_counter()
            if i >= WARMUP_STEPS:
                remote.append(middle - start)
                local.append(end - middle)
    finally:
        chain.close_session("bench")
        await session.close()
    if token != local_token:
        raise AssertionError(f"the network path sampled {token}, one process {local_token}")
    diffs = [r - x for r, x in zip(remote, local)]
    return statistics.median(remote), statistics.median(local), statistics.median(diffs)


async def remote_throughput(client: LoopThread, route: list[RouteHop], sessions: int, tokens: int) -> float:
    """Decode tokens per second with `sessions` sessions stepping concurrently (prefill excluded)."""
    opened = [
        await RemoteSession.open(client.p2p, route, PROMPT_TOKENS + tokens + 1) for _ in range(sessions)
    ]
    firsts = await asyncio.gather(
        *(s.step(list(range(3 + i % 50, 3 + i % 50 + PROMPT_TOKENS))) for i, s in enumerate(opened))
    )

    async def decode(session: RemoteSession, token: int) -> None:
        for _ in range(tokens):
            token = (await session.step([token])).token_id

    start = time.perf_counter()
    await asyncio.gather(*(decode(s, r.token_id) for s, r in zip(opened, firsts)))
    elapsed = time.perf_counter() - start
    await asyncio.gather(*(s.close() for s in opened))
    return sessions * tokens / elapsed


def local_throughput(chain: LocalChain, sessions: int, tokens: int) -> float:
    ids = [f"bench-{i}" for i in range(sessions)]
    for sid in ids:
        chain.open_session(sid, PROMPT_TOKENS + tokens + 1)
    try:
        results = chain.step_batch([(sid, torch.arange(3, 3 + PROMPT_TOKENS)) for sid in ids])
        start = time.perf_counter()
        for _ in range(tokens):
            results = chain.step_batch([(sid, torch.tensor([r.token_id])) for sid, r in zip(ids, results)])
        elapsed = time.perf_counter() - start
    finally:
        for sid in ids:
            chain.close_session(sid)
    return sessions * tokens / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps measured per session")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hops", default="1,2,3,4")
    parser.add_argument("--sessions", default="1,8,32")
    parser.add_argument("--rtt-rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="latency runs per hop count (medians)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per process, here and in each server"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hop_counts = [int(x) for x in args.hops.split(",")]
    session_counts = [int(x) for x in args.sessions.split(",")]
    spec = TinyModelSpec(
        family="llama", num_layers=args.layers, hidden_size=args.hidden, num_heads=8, num_kv_heads=2,
        intermediate_size=2 * args.hidden, dtype=args.dtype,
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="helix-bench-swarm-"))
    model = make_tiny_model(work / "model", spec)
    print(f"model: llama, {args.layers} layers, hidden {args.hidden}, {args.dtype} on {args.device}; "
          f"torch threads per process {torch.get_num_threads()}; work dir {work}")  # fmt: skip

    def shards(ranges: list[tuple[int, int]]) -> LocalChain:
        return LocalChain(
            [load_shard(ShardSpec(str(model), a, b, dtype=args.dtype, device=args.device)) for a, b in ranges]
        )

    with Processes(work) as procs:
        flags = ("--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads))
        servers = start_servers(procs, model, [(0, args.layers)] * max(hop_counts), [flags] * max(hop_counts))
        client = LoopThread([servers[0].maddr])
        try:
            tcp = tcp_rtt_s(args.rtt_rounds)
            for server in servers:  # connect and warm every pair the routes use
                client.run(unary_rtt_s(client, server, 5))
                client.run(unary_rtt_s(client, server, 5, channel=True))
            unary = client.run(unary_rtt_s(client, servers[0], args.rtt_rounds))
            channel = client.run(unary_rtt_s(client, servers[0], args.rtt_rounds, channel=True))
            print("\n## loopback round trips")
            print("| path | RTT ms |\n| --- | ---: |")
            print(f"| bare TCP socket, 64 B | {tcp * 1e3:.3f} |")
            print(f"| hivemind unary call to a server process | {unary * 1e3:.3f} |")
            print(f"| data-plane channel call to a server process | {channel * 1e3:.3f} |")

            print(
                f"\n## decode latency per token ({args.tokens} steps, medians; cost: median of paired differences; "
                f"medians of {args.repeats} runs, each ratio against a unary RTT measured just before it)"
            )
            print(
                "| hops | network ms | one process ms | network cost ms | per hop ms | per hop / unary RTT |"
            )
            print("| ---: | ---: | ---: | ---: | ---: | ---: |")
            for hops in hop_counts:
                ranges = split(args.layers, hops)
                route = [RouteHop(s.peer_id, a, b) for s, (a, b) in zip(servers, ranges)]
                chain = shards(ranges)
                client.run(decode_latency_s(client, route, chain, 4))  # warm the hop-to-hop connections
                runs = []
                for _ in range(args.repeats):
                    unary_now = client.run(unary_rtt_s(client, servers[0], args.rtt_rounds // 4))
                    remote, local, cost = client.run(decode_latency_s(client, route, chain, args.tokens))
                    runs.append((remote, local, cost, cost / hops / unary_now))
                remote, local, cost, ratio = (statistics.median(r[i] for r in runs) for i in range(4))
                per_hop = cost / hops
                print(f"| {hops} | {remote * 1e3:.2f} | {local * 1e3:.2f} | {cost * 1e3:.2f} | "
                      f"{per_hop * 1e3:.2f} | {ratio:.2f}x |")  # fmt: skip

            hops = min(3, max(hop_counts))
            ranges = split(args.layers, hops)
            route = [RouteHop(s.peer_id, a, b) for s, (a, b) in zip(servers, ranges)]
            chain = shards(ranges)
            print(f"\n## decode throughput through {hops} hops ({args.tokens} tokens per session)")
            print(
                "| sessions | network tokens/s | vs 1 session | one process (batched) tokens/s | network / one process |"
            )
            print("| ---: | ---: | ---: | ---: | ---: |")
            base = None
            for n in session_counts:
                remote = client.run(remote_throughput(client, route, n, args.tokens), timeout_s=600)
                local = local_throughput(chain, n, args.tokens)
                base = base or remote
                print(f"| {n} | {remote:.1f} | {remote / base:.2f}x | {local:.1f} | {remote / local:.2f} |")
        finally:
            client.close()
            procs.close()
        stats = [
            line.split("stopping: ", 1)[1]
            for p in procs.procs
            for line in p.stderr().splitlines()
            if "stopping:" in line
        ]
        print("\nservers' batching:", "; ".join(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
