"""One log format for every command: one line per event, readable by a person on call."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, stream=sys.stderr)
    # asyncio warns when hivemind's p2p daemon exits after the loop closed (a failed join): noise
    # after our one-line error, and nothing a user can act on.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
