"""Serve a fixed layer range of a local model on the data plane, without the control plane: no DHT
records, no plan. Data-plane tests and `benchmarks/swarm.py` start these, so that they measure the
data plane alone.

    python -m helix_p2p.node.serve_cmd --model DIR --start 0 --end 2 [--initial-peers MADDR ...]

Prints the peer's multiaddrs (one per line, ending in /p2p/<peer id>), then serves until SIGINT or
SIGTERM. Peers find each other by peer id through libp2p's own DHT, so start the first server alone
and give its address to the others and to the client as an initial peer."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from helix_p2p.errors import HelixError
from helix_p2p.logs import configure_logging

EXIT_USAGE = 2
logger = logging.getLogger("helix_p2p.node.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m helix_p2p.node.serve_cmd",
        description="Serve layers [start, end) of a local model on the data plane (no control plane).",
    )
    a = parser.add_argument
    a("--model", required=True, help="a local Hugging Face checkpoint folder")
    a("--start", type=int, required=True, help="first layer held")
    a("--end", type=int, required=True, help="one past the last layer held")
    a("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    a("--port", type=int, default=0, help="TCP port (default: any free one)")
    a("--initial-peers", nargs="*", default=[], metavar="MADDR", help="peers to join (full multiaddrs)")
    a("--identity", help="key file for a stable peer id (created if missing)")
    a("--device", default="cpu", help="cpu, cuda or cuda:N")
    a("--dtype", default="float32", help="float32, bfloat16 or float16")
    a("--max-kv-tokens", type=int, help="KV positions all sessions together may reserve (default: no cap)")
    a("--max-chunk-tokens", type=int, default=512, help="prefill chunk (tokens per forward)")
    a("--idle-timeout-s", type=float, default=300.0, help="close sessions idle this long")
    a("--max-sessions-per-peer", type=int, default=256)
    a("--max-queued-steps-per-peer", type=int, default=256)
    a(
        "--max-kv-tokens-per-peer",
        type=int,
        default=1 << 20,
        help="KV positions one peer's sessions may reserve",
    )
    a(
        "--max-bytes-in-flight-per-peer",
        type=int,
        default=512 << 20,
        help="request bytes one peer may have in flight",
    )
    a("--max-step-tokens", type=int, default=8192)
    a("--threads", type=int, help="torch's CPU threads for this process (default: torch's choice)")
    a("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


async def serve(args: argparse.Namespace) -> int:
    from hivemind.p2p import P2P

    from helix_p2p.protocol import DataPlaneLimits
    from helix_p2p.shard import ShardSpec, load_shard

    from .serving import attach_data_plane

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    limits = DataPlaneLimits(
        max_sessions_per_peer=args.max_sessions_per_peer,
        max_queued_steps_per_peer=args.max_queued_steps_per_peer,
        max_kv_tokens_per_peer=args.max_kv_tokens_per_peer,
        max_bytes_in_flight_per_peer=args.max_bytes_in_flight_per_peer,
        max_step_tokens=args.max_step_tokens,
        idle_timeout_s=args.idle_timeout_s,
    )
    spec = ShardSpec(
        model_path=args.model,
        start=args.start,
        end=args.end,
        dtype=args.dtype,
        device=args.device,
        max_kv_tokens=args.max_kv_tokens,
        max_chunk_tokens=args.max_chunk_tokens,
        max_batch_tokens=max(4096, args.max_chunk_tokens),
        idle_timeout_s=args.idle_timeout_s,
    )
    shard = await asyncio.to_thread(load_shard, spec)
    p2p = await P2P.create(
        initial_peers=list(args.initial_peers) or None,
        host_maddrs=[f"/ip4/{args.host}/tcp/{args.port}"],
        identity_path=args.identity,
    )
    plane = await attach_data_plane(p2p, lambda: [shard], limits)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for maddr in await p2p.get_visible_maddrs():
            print(
                f"{maddr}/p2p/{p2p.peer_id.to_base58()}" if "/p2p/" not in str(maddr) else maddr, flush=True
            )
        logger.info(
            "serving layers [%d, %d) of %s as %s (KV budget: %s positions)",
            args.start, args.end, args.model, plane.peer_id, args.max_kv_tokens or "no cap",
        )  # fmt: skip
        await stop.wait()
        forwards, steps = plane.batching_stats()
        logger.info(
            "stopping: %d steps in %d forwards (%.2f steps per forward, %d on the event loop)",
            steps,
            forwards,
            steps / max(1, forwards),
            plane.inline_forwards,
        )
        return 0
    finally:
        await plane.close()
        await p2p.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return asyncio.run(serve(args))
    except HelixError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
