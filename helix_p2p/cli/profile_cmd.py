"""`helix profile`: measure this machine's tokens_per_s table for a model, as a node announces it.

    helix profile --model PATH [--device D] [--max-memory GB] [--dtype D] [--kv-fraction F]
                  [--max-batch-sessions N] [--id ID] [--region R] [--nic-in-bytes-per-s B] [--nic-out-bytes-per-s B]
                  [--refresh] [--cache-dir DIR] [--full]

Prints the node in `helix-cluster/1` form (JSON) on stdout; a progress bar on a terminal. The
measurement is cached (by model, device, memory, options and software versions) under
~/.cache/helix-p2p/profiles, so a second run prints at once. How the table is derived:
`helix_p2p/shard/profile.py`."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from helix_p2p.cli.make_model_cmd import DTYPE_CHOICES

#: the profile's default NIC figure (helix_p2p.shard.profile.DEFAULT_NIC_BYTES_PER_S), spelled out
#: here so that registering the command does not import torch
DEFAULT_NIC_BYTES_PER_S = 1.25e9


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure this device's tokens_per_s table for a model",
        description="Measure the tokens/s this device sustains holding k = 1 .. max_layers layers of the "
        "model under Helix's prompt/decode mix, and print the node in helix-cluster/1 form.",
    )
    p.add_argument(
        "--model", required=True, metavar="PATH", help="checkpoint directory (or hub id with a network)"
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:0 where CUDA is available, else cpu)")
    p.add_argument(
        "--max-memory",
        type=float,
        metavar="GB",
        help="memory budget in GB (1e9 bytes; default: the device's)",
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument(
        "--kv-fraction",
        type=float,
        default=0.5,
        help="share of the memory kept for KV cache when choosing max_layers (default 0.5, as Helix)",
    )
    p.add_argument(
        "--max-batch-sessions",
        type=int,
        metavar="N",
        help="most concurrent sessions in a batch (default 256 on CUDA, 64 on CPU)",
    )
    p.add_argument("--id", default=socket.gethostname(), help="node id in the output (default: host name)")
    p.add_argument("--region", default="default", help="region in the output (default: default)")
    p.add_argument(
        "--nic-in-bytes-per-s",
        type=float,
        default=DEFAULT_NIC_BYTES_PER_S,
        help="NIC figure for the output; not measured here (default 1.25e9, 10 Gbit/s)",
    )
    p.add_argument("--nic-out-bytes-per-s", type=float, default=DEFAULT_NIC_BYTES_PER_S, help="likewise")
    p.add_argument("--refresh", action="store_true", help="measure again even if a cached profile matches")
    p.add_argument(
        "--cache-dir", type=Path, help="cache root (default: $HELIX_P2P_CACHE_DIR or ~/.cache/helix-p2p)"
    )
    p.add_argument("--full", action="store_true", help="print the whole profile (measurements, key) instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from helix_p2p.progress import progress_bar, step_callback
    from helix_p2p.shard.profile import ProfileError, ProfileOptions, cached_profile, node_form

    if args.max_memory is not None and not args.max_memory > 0:
        raise ProfileError(f"--max-memory must be > 0 GB, got {args.max_memory}")
    if min(args.nic_in_bytes_per_s, args.nic_out_bytes_per_s) <= 0:
        raise ProfileError("NIC figures must be > 0 bytes/s")
    options = ProfileOptions(
        dtype=args.dtype,
        max_memory_bytes=args.max_memory * 1e9 if args.max_memory is not None else None,
        kv_fraction=args.kv_fraction,
        max_batch_sessions=args.max_batch_sessions,
    )
    bar = progress_bar("profiling", unit="step")
    progress = step_callback(bar)
    try:
        profile, from_cache = cached_profile(
            args.model,
            args.device,
            options,
            directory=args.cache_dir,
            refresh=args.refresh,
            progress=progress,
        )
    finally:
        bar.close()
    print(
        f"helix profile: {'cached' if from_cache else 'measured'} {profile.device_name}, "
        f"max_layers {profile.max_layers}, {profile.measure_s:.1f} s to measure",
        file=sys.stderr,
    )
    if args.full:
        print(json.dumps(profile.to_json(), indent=1))
        return 0
    node = profile.node_spec(args.id, args.region, args.nic_in_bytes_per_s, args.nic_out_bytes_per_s)
    print(json.dumps(node_form(profile, node), indent=1))
    return 0
