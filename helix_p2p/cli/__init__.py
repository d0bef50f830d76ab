"""`helix`: the user's command line. Subcommands are plugged in through the `helix_p2p.commands`
entry-point group (pyproject.toml), so the core never imports the node, client or bootstrap shells:
each module there exposes `register(subparsers)`, which adds its parser and sets `func`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from helix_p2p.errors import HelixError
from helix_p2p.logs import configure_logging

EXIT_USAGE = 2  # argparse's own code for bad arguments; we use it for bad input files too
EXIT_FAILURE = 1


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` just that subcommand's: loading a subcommand's module can
    be slow (the model-running ones pull in torch), and `helix plan` should not pay for it."""
    parser = argparse.ArgumentParser(
        prog="helix",
        description="Serve a large language model over a swarm of mixed GPUs, placed and routed by max-flow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = sorted(entry_points(group="helix_p2p.commands"), key=lambda e: e.name)
    if only is not None and any(ep.name == only for ep in commands):
        commands = [ep for ep in commands if ep.name == only]
    for ep in commands:
        ep.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    named = [a for a in argv if not a.startswith("-")]
    parser = build_parser(only=named[0] if named else None)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except HelixError as e:
        print(f"helix {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"helix {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
