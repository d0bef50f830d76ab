"""The `--initial-peers` option every swarm command takes, defaulting to `$HELIX_INITIAL_PEERS` so a
shell that exported the bootstrap's address once (see `helix-bootstrap --print-address`) can run
`helix-node join`, `helix generate`, `helix status`... without repeating it."""

from __future__ import annotations

import argparse
import os
import re

ENV_VAR = "HELIX_INITIAL_PEERS"


def initial_peers_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """The multiaddrs in `$HELIX_INITIAL_PEERS`, separated by spaces, commas or newlines."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return [word for word in re.split(r"[\s,]+", value) if word]


def add_initial_peers(parser: argparse.ArgumentParser, help_text: str = "multiaddrs of swarm peers") -> None:
    default = initial_peers_from_env()
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        required=not default,
        default=default or None,
        metavar="MADDR",
        help=f"{help_text} (default: ${ENV_VAR}" + (f", now {' '.join(default)})" if default else ", unset)"),
    )
