"""`helix-bootstrap`: the swarm's meeting point. A DHT peer with a persistent identity (created on
first run, reused after, so with a fixed port its address never changes). It prints each address
it can be reached at alone on its own line, then the `helix-node join` line to copy, and runs
until SIGINT/SIGTERM (exit 0).

Besides the DHT it answers link probes and reachability checks (nodes ask it to dial them back),
and it relays for nodes behind NAT: it declares itself publicly reachable, which is what libp2p
needs to offer circuit relay reservations."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from helix_p2p.cli.swarm_key_arg import add_swarm_key_argument
from helix_p2p.errors import HelixError
from helix_p2p.logs import configure_logging
from helix_p2p.swarm.keys import DEFAULT_PREFIX, check_prefix

EXIT_USAGE = 2
DEFAULT_PORT = 31337

logger = logging.getLogger("helix_p2p.bootstrap")


def default_identity_path() -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "helix-p2p" / "bootstrap.key"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helix-bootstrap",
        description="Start the swarm's bootstrap peer and print the address volunteers join with.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--identity",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"key file, created on first run and reused (default {default_identity_path()})",
    )
    parser.add_argument(
        "--swarm", default=DEFAULT_PREFIX, metavar="PREFIX", help=f"swarm name (default {DEFAULT_PREFIX})"
    )
    parser.add_argument(
        "--print-address",
        action="store_true",
        help="print the address this identity and port will have (creating the identity if needed) and "
        "exit, e.g. export HELIX_INITIAL_PEERS=$(helix-bootstrap --print-address)",
    )
    parser.add_argument(
        "--dashboard-port", type=int, metavar="PORT", help="serve the swarm's status page on this port"
    )
    parser.add_argument(
        "--dashboard-host", default="127.0.0.1", help="address of the status page (default 127.0.0.1)"
    )
    add_swarm_key_argument(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def local_ipv4s(host: str) -> list[str]:
    """The IPv4 addresses a peer listening on `host` answers on: loopback first, so that the first
    address always works on this machine."""
    if host not in ("0.0.0.0", ""):
        return [host]
    found = ["127.0.0.1"]
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            address = info[4][0]
            if address not in found and not address.startswith("127."):
                found.append(address)
    except OSError:  # no resolvable host name: loopback is still right
        pass
    return found


def predicted_maddrs(host: str, port: int, peer_id: str) -> list[str]:
    return [f"/ip4/{address}/tcp/{port}/p2p/{peer_id}" for address in local_ipv4s(host)]


def join_line(maddrs: Sequence[str], swarm: str, swarm_key: str | None = None) -> str:
    words = ["helix-node", "join", "--initial-peers", *maddrs, "--model", "PATH_OR_ID"]
    if swarm != DEFAULT_PREFIX:
        words += ["--swarm", swarm]
    if swarm_key is not None:
        words += ["--swarm-key", swarm_key]
    return " ".join(shlex.quote(w) if w != "PATH_OR_ID" else w for w in words)


async def serve(
    host: str,
    port: int,
    identity_path: Path,
    swarm: str,
    dashboard: tuple[str, int] | None = None,
    swarm_key_path: str | None = None,
) -> int:
    from helix_p2p.swarm.dht import NetworkOptions, SwarmDHT
    from helix_p2p.swarm.identity import load_identity
    from helix_p2p.swarm.probe import ProbeServer
    from helix_p2p.swarm.reachability import ReachServer
    from helix_p2p.swarm.swarm_key import load_swarm_key

    swarm_key = None if swarm_key_path is None else load_swarm_key(swarm_key_path)
    identity = load_identity(identity_path)
    options = NetworkOptions(
        host=host, port=port, force_reachability="public", use_auto_relay=False, swarm_key=swarm_key
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    dht = await SwarmDHT.start(identity, swarm, (), options)
    page = None
    try:
        await ProbeServer().register(dht.p2p)
        await ReachServer().register(dht.p2p)
        if dashboard is not None:
            from helix_p2p.web import serve_swarm_page

            page = await serve_swarm_page(dht, *dashboard)
            print(f"status page: http://{dashboard[0]}:{dashboard[1]}/")
        maddrs = await dht.visible_maddrs()
        for maddr in maddrs:
            print(maddr)
        print()
        print("Volunteers join with:")
        print(join_line(maddrs, swarm, swarm_key_path))
        sys.stdout.flush()
        logger.info(
            "bootstrap of %s swarm %r up as %s (identity %s)",
            "open" if swarm_key is None else f"private (key id {swarm_key.key_id})",
            swarm,
            identity.peer_id,
            identity.path,
        )
        await stop.wait()
        logger.info("stopping")
        return 0
    finally:
        if page is not None:
            await page.close()
        await dht.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        if not 0 <= args.port <= 65535:
            raise HelixError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
        check_prefix(args.swarm)
        identity_path = (args.identity or default_identity_path()).expanduser()
        if args.identity is None:
            identity_path.parent.mkdir(parents=True, exist_ok=True)
        elif not identity_path.parent.is_dir():  # checked before the slow hivemind import
            raise HelixError(
                f"cannot create identity {identity_path}: directory {identity_path.parent} does not exist"
            )
        if args.print_address:
            if args.port == 0:
                raise HelixError("--print-address needs a fixed --port (0 means a port chosen at start)")
            from helix_p2p.swarm.identity import load_identity

            for maddr in predicted_maddrs(args.host, args.port, load_identity(identity_path).peer_id):
                print(maddr)
            return 0
        dashboard = None
        if args.dashboard_port is not None:
            if not 0 < args.dashboard_port <= 65535:
                raise HelixError(f"--dashboard-port must be in 1..65535, got {args.dashboard_port}")
            dashboard = (args.dashboard_host, args.dashboard_port)
        return asyncio.run(
            serve(args.host, args.port, identity_path, args.swarm, dashboard, swarm_key_path=args.swarm_key)
        )
    except HelixError as e:
        print(f"helix-bootstrap: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
