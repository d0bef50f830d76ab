"""`helix status --initial-peers MADDR [--json]`: the swarm as the DHT holds it now: each live node's
name, GPU, state, layers, tokens/s and free KV, and the current plan (the newest from the elected
planner). A short-lived DHT client peer with a throw-away identity does the reading."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from helix_p2p.cli.peers_arg import add_initial_peers
from helix_p2p.cli.swarm_key_arg import add_swarm_key_argument

DEFAULT_PREFIX = "helix"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status",
        help="show the swarm: nodes, their layers and throughput, and the current plan",
        description="Read the swarm's registry and plan from the DHT and print them.",
    )
    add_swarm_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--model-id", help="the model whose plan to show (default: the one most nodes serve)")
    p.add_argument(
        "--wait-s",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds until every node in the plan serves its layers "
        "(exit 1 if it does not happen); for scripts that generate next",
    )
    p.add_argument(
        "--min-nodes",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="with --wait-s: also wait until the plan places at least N nodes (after starting one more)",
    )
    p.set_defaults(func=run)


def add_swarm_arguments(p: argparse.ArgumentParser) -> None:
    add_initial_peers(p)
    p.add_argument(
        "--swarm", default=DEFAULT_PREFIX, metavar="PREFIX", help=f"swarm name (default {DEFAULT_PREFIX})"
    )
    p.add_argument(
        "--connect-timeout-s", type=float, default=20.0, help="give up reaching the swarm after this long"
    )
    add_swarm_key_argument(p)


@asynccontextmanager
async def swarm_client(
    initial_peers: list[str], prefix: str, connect_timeout_s: float, *, client_mode: bool = True, host: str = "127.0.0.1",
    port: int = 0, swarm_key_path: str | None = None, no_listen: bool = False,
) -> AsyncIterator:  # fmt: skip
    """A DHT peer for one command, with a throw-away identity (its key file is removed after)."""
    from helix_p2p.swarm.dht import NetworkOptions, SwarmDHT
    from helix_p2p.swarm.identity import ephemeral_identity
    from helix_p2p.swarm.swarm_key import load_swarm_key

    swarm_key = None if swarm_key_path is None else load_swarm_key(swarm_key_path)
    identity = ephemeral_identity()
    try:
        options = NetworkOptions(
            host=host,
            port=port,
            client_mode=client_mode,
            use_auto_relay=False,
            no_listen=no_listen,
            connect_timeout_s=connect_timeout_s,
            check_identity_free=False,
            swarm_key=swarm_key,
        )
        dht = await SwarmDHT.start(identity, prefix, initial_peers, options)
        try:
            yield dht
        finally:
            await dht.shutdown()
    finally:
        if identity.path.exists():
            identity.path.chmod(0o600)
            identity.path.unlink()


async def read_status(args: argparse.Namespace) -> dict:
    from helix_p2p.swarm.dht import SwarmConnectError
    from helix_p2p.swarm.status import plan_served, swarm_status

    deadline = time.monotonic() + args.wait_s
    while True:
        try:
            async with swarm_client(
                args.initial_peers, args.swarm, args.connect_timeout_s, swarm_key_path=args.swarm_key
            ) as dht:
                while True:
                    records, plans = await dht.read()
                    doc = swarm_status(records, [p.record for p in plans], time.time(), args.model_id)
                    served, account = plan_served(doc, args.min_nodes)
                    if args.wait_s <= 0 or served:
                        return doc
                    if time.monotonic() >= deadline:
                        raise StatusWaitTimeout(
                            f"the plan was not served as asked after {args.wait_s:g} s ({account})", doc
                        )
                    print(f"waiting: {account}", file=sys.stderr, flush=True)
                    await asyncio.sleep(1.0)
        except SwarmConnectError as e:
            # A script may start the bootstrap and wait in one breath: waiting covers reaching it.
            # A refusal (a private swarm, another key) is an answer, not a peer still starting.
            unreachable = "bootstrap is running" in str(e)
            if time.monotonic() >= deadline or not unreachable:
                raise
            print(f"waiting: {e}", file=sys.stderr, flush=True)
            await asyncio.sleep(2.0)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


class StatusWaitTimeout(Exception):
    def __init__(self, message: str, doc: dict) -> None:
        super().__init__(message)
        self.doc = doc


def run(args: argparse.Namespace) -> int:
    from helix_p2p.swarm.status import format_status

    status = 0
    try:
        doc = asyncio.run(read_status(args))
    except StatusWaitTimeout as e:
        doc, status = e.doc, 1
        print(f"helix status: {e}", file=sys.stderr)
    if args.json:
        json.dump({"nodes": doc["nodes"], "plan": doc["plan"], "model": doc["model"]}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_status(doc))
    return status
