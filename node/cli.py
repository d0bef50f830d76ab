"""`helix-node join`: run a volunteer node until SIGINT/SIGTERM.

Bad flags or inputs print one line (`helix-node: error: ...`) and exit 2; an unreachable initial
peer fails after --connect-timeout-s, never hangs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from helix_p2p.cli.peers_arg import add_initial_peers
from helix_p2p.cli.swarm_key_arg import add_swarm_key_argument
from helix_p2p.errors import HelixError
from helix_p2p.logs import configure_logging
from helix_p2p.swarm.keys import DEFAULT_PREFIX
from helix_p2p.swarm.reports import DEFAULT_MIN_REPORTERS

from .config import (
    KV_RESERVE_TOKENS,
    NodeConfig,
    NodeConfigError,
    PlannerOptions,
    Throughput,
    default_memory_bytes,
    default_model_id,
    read_throughput,
)

EXIT_USAGE = 2
GIB = 1 << 30

logger = logging.getLogger("helix_p2p.node")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helix-node", description="A volunteer node of a helix-p2p swarm (DESIGN.md, 'Roles')."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    join = commands.add_parser(
        "join",
        help="join a swarm and serve the layers the plan assigns",
        description="Join a swarm, announce this node, measure links, follow (or make) the plan, "
        "load the assigned layers; SIGINT/SIGTERM leaves cleanly.",
    )
    j = join.add_argument
    add_initial_peers(join, "multiaddrs of swarm peers (the bootstrap)")
    j(
        "--model",
        required=True,
        metavar="PATH_OR_ID",
        help="Hugging Face checkpoint: a local folder or a hub id",
    )
    j("--model-id", help="the model's name in the swarm (default: the folder name or hub id)")
    j("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    j(
        "--dtype",
        default="auto",
        help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)",
    )
    j(
        "--max-memory",
        type=float,
        metavar="GB",
        help="memory for weights and KV cache (default: 90%% of the GPU, half the RAM on CPU)",
    )
    j("--max-layers", type=int, metavar="N", help="hold at most this many layers")
    j(
        "--throughput",
        default="auto",
        metavar="auto|FILE",
        help="tokens/s table: profile the device, or a JSON list (entry k-1 for k layers held)",
    )
    j("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    j("--port", type=int, default=0, help="port to listen on (default: any free port)")
    j(
        "--announce-addr",
        action="append",
        default=[],
        metavar="MADDR",
        help="address to announce instead (port forwarding); repeatable",
    )
    j(
        "--identity",
        type=Path,
        metavar="PATH",
        help="key file for a stable peer id, created if missing (default: a fresh id per run)",
    )
    j(
        "--swarm",
        default=DEFAULT_PREFIX,
        metavar="PREFIX",
        help=f"swarm name: the DHT key prefix (default {DEFAULT_PREFIX})",
    )
    add_swarm_key_argument(join)
    j("--public-name", default="", metavar="NAME", help="a name shown in `helix status`")
    j("--client-mode", action="store_true", help="DHT client only: store nothing for others (behind NAT)")
    j("--no-relay", action="store_true", help="do not use libp2p circuit relays")
    j(
        "--no-auto-relay",
        action="store_true",
        help="behind NAT, do not reserve a relay slot to become reachable",
    )
    j(
        "--no-listen",
        action="store_true",
        help="listen on no address, so no peer can dial in (a NAT that lets nothing in): the node "
        "is reached only through a slot on a relay (the bootstrap); implies --client-mode",
    )
    j(
        "--reachability",
        choices=["auto", "public", "private"],
        default="auto",
        help="force libp2p's NAT verdict (default: auto)",
    )
    j("--no-plan", action="store_true", help="never act as the planner")
    j(
        "--planner-method",
        default="milp",
        help="planning method when elected: milp, petals, swarm or sp (default milp)",
    )
    j("--planner-time-limit-s", type=float, default=30.0, help="time limit of one solve (default 30)")
    j(
        "--replan-period-s",
        type=float,
        default=600.0,
        help="how often the planner tries a better plan (default 600)",
    )
    j(
        "--replan-min-gain",
        type=float,
        default=0.1,
        help="relative flow gain that justifies moving layers (default 0.1)",
    )
    j(
        "--debounce-s",
        type=float,
        help="membership must hold this long before a re-plan (default: half the refresh period, "
        "the time between two registry reads)",
    )
    j(
        "--ban-min-reporters",
        type=int,
        default=DEFAULT_MIN_REPORTERS,
        metavar="K",
        help="when planning, leave out peers reported lying by at least K distinct clients "
        f"(default {DEFAULT_MIN_REPORTERS})",
    )
    # Tests only: a node that lies (noise on its outputs) for the verification tests; not in --help.
    j("--test-perturb-outputs", type=float, default=0.0, metavar="SCALE", help=argparse.SUPPRESS)
    j("--ttl-s", type=float, default=60.0, help="lifetime of this node's record without refresh (default 60)")
    j("--refresh-s", type=float, help="re-announce period (default: ttl/4)")
    j("--probe-peers", type=int, default=8, help="peers measured per probing round (default 8)")
    j(
        "--probe-bytes",
        type=int,
        default=1 << 20,
        help="bytes moved each way per bandwidth probe (default 1 MiB)",
    )
    j("--probe-period-s", type=float, default=60.0, help="time between probing rounds (default 60)")
    j("--probe-max-age-s", type=float, default=600.0, help="re-measure a link after this long (default 600)")
    j("--nic-bytes-per-s", type=float, help="this node's network bandwidth, if known (default: from probes)")
    j(
        "--grace-s",
        type=float,
        default=30.0,
        help="on SIGINT/SIGTERM, let running sessions finish this long (default 30)",
    )
    j("--connect-timeout-s", type=float, default=30.0, help="give up joining after this long (default 30)")
    j(
        "--rpc-timeout-s",
        type=float,
        default=3.0,
        help="a DHT call to a silent peer is abandoned after this long (default 3)",
    )
    j("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics at /metrics on this port")
    j("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default 127.0.0.1)")
    return parser


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    ttl_s = args.ttl_s
    refresh_s = args.refresh_s
    # By default two registry reads in a row (every half refresh period) must agree on the members:
    # that absorbs a burst of arrivals, and a departure already takes two missed refreshes to show.
    debounce_s = args.debounce_s if args.debounce_s is not None else (refresh_s or ttl_s / 4) / 2
    return NodeConfig(
        initial_peers=tuple(args.initial_peers),
        model=args.model,
        model_id=args.model_id or default_model_id(args.model),
        device=args.device,
        dtype=args.dtype,
        max_memory_bytes=None if args.max_memory is None else int(args.max_memory * GIB),
        max_layers=args.max_layers,
        throughput=args.throughput,
        host=args.host,
        port=args.port,
        announce_addrs=tuple(args.announce_addr),
        identity=args.identity,
        swarm=args.swarm,
        swarm_key=None if args.swarm_key is None else Path(args.swarm_key),
        public_name=args.public_name,
        # a peer nobody can dial must not offer to store DHT records for others
        client_mode=args.client_mode or args.no_listen,
        use_relay=not args.no_relay,
        use_auto_relay=not (args.no_relay or args.no_auto_relay),
        no_listen=args.no_listen,
        force_reachability=None if args.reachability == "auto" else args.reachability,
        planner_eligible=not args.no_plan,
        test_perturb_scale=args.test_perturb_outputs,
        planner=PlannerOptions(
            method=args.planner_method,
            time_limit_s=args.planner_time_limit_s,
            min_gain=args.replan_min_gain,
            replan_period_s=args.replan_period_s,
            debounce_s=debounce_s,
            ban_min_reporters=args.ban_min_reporters,
        ),
        ttl_s=ttl_s,
        refresh_s=refresh_s,
        probe_peers=args.probe_peers,
        probe_bytes=args.probe_bytes,
        probe_period_s=args.probe_period_s,
        probe_max_age_s=args.probe_max_age_s,
        nic_bytes_per_s=args.nic_bytes_per_s,
        grace_s=args.grace_s,
        connect_timeout_s=args.connect_timeout_s,
        rpc_timeout_s=args.rpc_timeout_s,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    ).check()


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    import torch

    from helix_p2p.shard import parse_dtype, resolve_device

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = resolve_device(device)
    device = str(resolved)
    if dtype == "auto":
        dtype = "bfloat16" if resolved.type == "cuda" else "float32"
    parse_dtype(dtype)
    return device, dtype


def profile_throughput(config: NodeConfig) -> Throughput:
    """Measure this device for the model (the shard library's profiler), or reuse the cached table."""
    from helix_p2p.shard.profile import ProfileOptions, cached_profile

    logger.info("profiling %s on %s (cached after the first run)", config.model, config.device)
    options = ProfileOptions(dtype=config.dtype, max_memory_bytes=config.max_memory_bytes)
    profile, from_cache = cached_profile(config.model, config.device, options)
    logger.info(
        "throughput %s: %s tokens/s for 1..%d layers",
        "from the profile cache" if from_cache else f"measured in {profile.measure_s:.0f} s",
        ", ".join(f"{x:.0f}" for x in profile.tokens_per_s[:4])
        + (", ..." if len(profile.tokens_per_s) > 4 else ""),
        profile.max_layers,
    )
    return Throughput(tokens_per_s=profile.tokens_per_s, gpu=profile.device_name)


def gpu_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def run_join(args: argparse.Namespace) -> int:
    # Flags and input files are checked before the slow imports (torch, transformers, hivemind),
    # so a typo is reported in a second, not after ten.
    config = config_from_args(args)
    throughput = read_throughput(config.throughput) if config.throughput != "auto" else None
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    config = replace(config, device=device, dtype=dtype)
    throughput = throughput or profile_throughput(config)

    from helix_p2p.shard import dtype_bytes, max_layers_for_budget, open_checkpoint
    from helix_p2p.swarm.identity import ephemeral_identity, load_identity
    from helix_p2p.swarm.records import MAX_NAME_CHARS, ModelInfo

    from .layers import ShardLoader
    from .node import Node

    checkpoint = open_checkpoint(config.model)
    hf_config = checkpoint.config
    model = ModelInfo(
        id=config.model_id,
        num_layers=int(hf_config.num_hidden_layers),
        hidden_size=int(hf_config.hidden_size),
        dtype_bytes=dtype_bytes(dtype),
    )
    memory_bytes = config.max_memory_bytes or default_memory_bytes(device)
    fit = max_layers_for_budget(
        hf_config,
        dtype,
        memory_bytes,
        kv_tokens_per_layer=KV_RESERVE_TOKENS,
        include_embedding=True,
        include_head=True,
    )
    if fit < 1:
        raise NodeConfigError(
            f"not even one layer of {config.model_id} fits in {memory_bytes / GIB:.2f} GB with its embedding, "
            "head and KV reserve; raise --max-memory"
        )
    max_layers = min(
        x for x in (config.max_layers, len(throughput.tokens_per_s), model.num_layers, fit) if x is not None
    )
    ephemeral = config.identity is None
    identity = ephemeral_identity() if ephemeral else load_identity(config.identity)
    try:
        node = Node(
            config,
            identity,
            model,
            throughput.tokens_per_s,
            max_layers,
            # the record caps names (MAX_NAME_CHARS); a long CPU model name must not void the record
            "".join(c for c in (throughput.gpu or gpu_name(device)) if c.isprintable())[:MAX_NAME_CHARS],
            memory_bytes,
            ShardLoader(config.model, device, dtype, memory_bytes),
        )
        return asyncio.run(node.run())
    finally:
        if ephemeral and identity.path.exists():
            identity.path.chmod(0o600)
            identity.path.unlink()


class _StoppedWhileStarting(BaseException):
    """SIGTERM came before the node's event loop took signals over (imports, profiling)."""


def _stop_while_starting(signum: int, frame: object) -> None:
    raise _StoppedWhileStarting


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if args.command != "join":
        parser.print_help()
        return EXIT_USAGE
    # Starting takes seconds (torch, the checkpoint, the p2p daemon): a SIGTERM then used to kill the
    # process by the signal (exit -15); stop as a node that is stopped while joining does, with 0.
    signal.signal(signal.SIGTERM, _stop_while_starting)
    try:
        return run_join(args)
    except _StoppedWhileStarting:
        logger.info("SIGTERM while starting: stopped before joining")
        return 0
    except HelixError as e:
        print(f"helix-node: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("helix-node: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
