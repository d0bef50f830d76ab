"""`helix keygen [PATH] [--force]`: write a new private-swarm key (libp2p's swarm.key format, mode
0600). Give the same file to the bootstrap, every node and every client with `--swarm-key PATH`."""

from __future__ import annotations

import argparse

DEFAULT_PATH = "swarm.key"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "keygen",
        help="write a new private-swarm key for --swarm-key",
        description="Write a new random key for a private swarm (readable by you only). Only peers "
        "started with --swarm-key and this file can join, announce, serve or use the swarm.",
    )
    p.add_argument(
        "path",
        nargs="?",
        default=DEFAULT_PATH,
        metavar="PATH",
        help=f"where to write it (default {DEFAULT_PATH})",
    )
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from helix_p2p.swarm.swarm_key import write_new_swarm_key

    key = write_new_swarm_key(args.path, force=args.force)
    print(f"wrote swarm key {key.path} (key id {key.key_id}, mode 0600)")
    print(f"start every peer of the swarm with --swarm-key {key.path}")
    return 0
