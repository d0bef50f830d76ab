"""The `--swarm-key FILE` flag every swarm command takes (bootstrap, node, client, status, doctor).
Kept apart from `helix_p2p.swarm.swarm_key` so that building a parser does not import hivemind."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from helix_p2p.swarm.swarm_key import SwarmKey


def add_swarm_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--swarm-key",
        metavar="FILE",
        default=None,
        help="the shared key file of a private swarm (make one with `helix keygen`); only its holders "
        "can join, announce, serve or use the swarm",
    )


def swarm_key_from_args(args: argparse.Namespace) -> SwarmKey | None:
    """The key named by `--swarm-key` (None without the flag); `SwarmKeyError` if it is unusable."""
    path = getattr(args, "swarm_key", None)
    if path is None:
        return None
    from helix_p2p.swarm.swarm_key import load_swarm_key

    return load_swarm_key(path)
