"""`helix doctor --initial-peers MADDR`: the questions volunteers ask most, answered by trying.

1. Can I reach the bootstrap (and how long does joining take)?
2. Which addresses and ports does my peer listen on?
3. Am I reachable from outside, or only through a relay (the bootstrap dials me back)?
4. My round-trip time and bandwidth to the bootstrap and a few nodes.
5. What the swarm looks like (live nodes, current plan).
6. My GPU and memory.
Each line says ok / warn / FAIL, and a failed check says what to change. Exit code 0 when the
swarm is reachable, 1 when not."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable

from .status_cmd import add_swarm_arguments, swarm_client

OK, WARN, FAIL = "ok  ", "warn", "FAIL"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check connectivity, reachability, links and hardware before joining a swarm",
        description="Try what a node does when it joins, and say what to change when something fails.",
    )
    add_swarm_arguments(p)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on for the reachability check")
    p.add_argument("--port", type=int, default=0, help="port to test (use the one your node will use)")
    p.add_argument(
        "--no-listen",
        action="store_true",
        help="listen on no address, as `helix-node join --no-listen` (what a node behind a strict NAT gets)",
    )
    p.add_argument("--peers", type=int, default=3, help="nodes to measure links to (default 3)")
    p.add_argument("--probe-bytes", type=int, default=1 << 20, help="bytes each way per bandwidth probe")
    p.add_argument("--device", default="auto", help="device to report on: auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = print
    ok = asyncio.run(check_network(args, report))
    check_hardware(args.device, report)
    return 0 if ok else 1


async def check_network(args: argparse.Namespace, say: Callable[[str], None]) -> bool:
    from helix_p2p.errors import HelixError
    from helix_p2p.swarm.probe import ProbeError, ProbeServer, measure_link
    from helix_p2p.swarm.reachability import ReachServer, ask_dial_back
    from helix_p2p.swarm.records import Reachability
    from helix_p2p.swarm.relay import (
        RELAYED_PROBE_BYTES,
        RelayDialer,
        RelayError,
        circuit_addr,
        relayed_connection,
        relayed_targets,
        reserve,
    )
    from helix_p2p.swarm.status import swarm_status

    bootstrap = args.initial_peers[0].rsplit("/p2p/", 1)[-1]
    started = time.monotonic()
    try:
        async with swarm_client(
            args.initial_peers,
            args.swarm,
            args.connect_timeout_s,
            host=args.host,
            port=args.port,
            swarm_key_path=args.swarm_key,
            no_listen=args.no_listen,
        ) as dht:
            say(
                f"{OK} reached the swarm through {args.initial_peers[0]} in {time.monotonic() - started:.1f} s"
            )
            await ProbeServer().register(dht.p2p)
            await ReachServer().register(dht.p2p)
            addrs = await dht.visible_maddrs()
            ports = sorted({a.split("/tcp/")[1].split("/")[0] for a in addrs if "/tcp/" in a})
            if args.no_listen:
                say(f"{OK} listening on no address (--no-listen): only a relay slot lets peers in")
            else:
                say(
                    f"{OK} listening on TCP port(s) {', '.join(ports) or '-'}: {', '.join(addrs) or 'no address'}"
                )

            reach = await ask_dial_back(dht.p2p, bootstrap, addrs)
            if reach.reachable:
                say(f"{OK} reachable directly: the bootstrap dialed back ({reach.detail})")
            elif reach.answered:
                say(
                    f"{WARN} not reachable directly ({reach.detail}); relayed traffic is slower: forward TCP "
                    f"port {ports[0] if ports else 'P'} on your router (or open it in the firewall) and start "
                    "the node with that --port"
                )
            else:
                say(f"{WARN} could not check reachability: {reach.detail}")
            if not reach.reachable:
                try:
                    slot = await reserve(dht.p2p, bootstrap)
                    say(
                        f"{OK} reachable through the bootstrap's relay: it granted a slot (each relayed "
                        f"connection capped at {slot.limit_bytes or 'unlimited'} bytes and "
                        f"{slot.limit_duration_s or 'unlimited'} s), so a node here joins and serves at "
                        f"{circuit_addr(args.initial_peers[0], str(dht.p2p.peer_id))}"
                    )
                except RelayError as e:
                    say(
                        f"{FAIL} not reachable through a relay either: {e}; peers will not be able to call a node here"
                    )

            records, plans = await dht.read()
            status = swarm_status(records, [p.record for p in plans], time.time())
            targets = [bootstrap] + [n["peer_id"] for n in status["nodes"]][: args.peers]
            # nodes behind a NAT are measured through their relays, as activations would reach them
            await RelayDialer(dht.p2p).reach(relayed_targets(records, None, targets))
            for peer in targets:
                label = (
                    "bootstrap"
                    if peer == bootstrap
                    else next((n["name"] or peer for n in status["nodes"] if n["peer_id"] == peer), peer)
                )
                probe_bytes = args.probe_bytes
                if peer in records and records[peer].reachability == Reachability.RELAY:
                    label += " (behind a NAT)"
                    if await relayed_connection(dht.p2p, peer):
                        # a relay resets a connection past its cap (128 KiB each way in p2pd)
                        label += f", through its relay, probed with {RELAYED_PROBE_BYTES // 1024} KiB"
                        probe_bytes = min(probe_bytes, RELAYED_PROBE_BYTES)
                try:
                    m = await measure_link(dht.p2p, peer, probe_bytes=probe_bytes)
                except ProbeError as e:
                    say(f"{WARN} link to {label}: not measured ({e})")
                    continue
                say(
                    f"{OK} link to {label}: rtt {m.rtt_s * 1e3:.1f} ms, "
                    f"up {m.out_bytes_per_s / 1e6:.1f} MB/s, down {m.in_bytes_per_s / 1e6:.1f} MB/s"
                )
            plan = status["plan"]
            say(
                f"{OK} swarm: {len(status['nodes'])} live node(s) serving {status['model'] or 'nothing yet'}; "
                + (
                    "no plan yet"
                    if plan is None
                    else f"plan epoch {plan['epoch']}, flow {plan['objective_tokens_per_s']:.1f} tokens/s"
                )
            )
            return True
    except HelixError as e:
        say(f"{FAIL} cannot reach the swarm: {e}")
        if "private swarm" in str(e):
            say("     ask the swarm's operator for its key file and pass it with --swarm-key FILE")
        else:
            say(
                "     check the address (copy the line helix-bootstrap printed), that the bootstrap is "
                "running, and that outgoing TCP to its port is allowed"
            )
        return False


def check_hardware(device: str, say: Callable[[str], None]) -> None:
    import torch

    if device in ("auto", "cuda") or device.startswith("cuda"):
        if torch.cuda.is_available():
            indices = (
                range(torch.cuda.device_count()) if device == "auto" else [torch.device(device).index or 0]
            )
            for i in indices:
                props = torch.cuda.get_device_properties(i)
                free, total = torch.cuda.mem_get_info(i)
                say(f"{OK} GPU cuda:{i}: {props.name}, {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            return
        say(
            f"{WARN} no CUDA GPU visible to torch {torch.__version__}; a node can run on CPU (slowly). "
            "If you have an NVIDIA GPU, install the CUDA build of torch and check `nvidia-smi`"
        )
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    say(f"{OK} CPU: {os.cpu_count()} cores, {memory / 2**30:.1f} GiB RAM")
