"""`helix generate`: generate text with a swarm from the command line. Registered through the
`helix_p2p.commands` entry point; torch, transformers and hivemind load only when it runs."""

from __future__ import annotations

import argparse
import json
import sys

from helix_p2p.cli.peers_arg import add_initial_peers
from helix_p2p.cli.swarm_key_arg import add_swarm_key_argument

DEFAULT_SWARM = "helix"


def _add_swarm_arguments(p: argparse.ArgumentParser) -> None:
    """Where the swarm is and which model to use: shared by `helix generate` and `helix serve`."""
    add_initial_peers(p)
    p.add_argument("--model", required=True, metavar="PATH_OR_ID", help="the model (its tokenizer is read)")
    p.add_argument("--model-id", help="the model's id in the swarm (default: the folder name of --model)")
    p.add_argument(
        "--swarm", default=DEFAULT_SWARM, metavar="PREFIX", help=f"swarm name (default {DEFAULT_SWARM})"
    )
    add_swarm_key_argument(p)


def _add_failover_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step-timeout-s", type=float, default=30.0, help="a hop silent this long has failed")
    p.add_argument("--max-failovers", type=int, default=4, help="re-routes allowed per request (4)")
    p.add_argument(
        "--connect-timeout-s", type=float, default=30.0, help="give up reaching the swarm after this"
    )
    p.add_argument(
        "--verify-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="recompute this share of steps on another holder of the same layers and compare; "
        "a peer caught lying is avoided and reported to the swarm (default 0)",
    )
    p.add_argument(
        "--ban-min-reporters",
        type=int,
        default=2,
        metavar="K",
        help="do not route to peers reported lying by at least K distinct clients (default 2)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text with a swarm (streams it to the terminal)",
        description="Join the swarm as a client, route the prompt over the plan and stream the generated "
        "text. Only the tokenizer and config of the model are read locally, never its weights.",
    )
    _add_swarm_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="most tokens to generate (32)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed for sampling")
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)"
    )
    _add_failover_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address the client's p2p daemon listens on")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, token_ids, prompt_token_ids, route, failovers, timings)",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    p.set_defaults(func=run)


def register_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP gateway to a swarm",
        description="Serve GET /v1/models, POST /v1/completions and POST /v1/chat/completions (with "
        "stream: true as server-sent events) by generating with the swarm.",
    )
    _add_swarm_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    _add_failover_arguments(p)
    p.set_defaults(func=run_serve)


def _open_client(args: argparse.Namespace, p2p_host: str):
    """The HelixClient both commands build from the shared swarm and failover flags."""
    from helix_p2p.client.client import ClientOptions, HelixClient

    options = ClientOptions(
        step_timeout_s=args.step_timeout_s,
        max_failovers=args.max_failovers,
        connect_timeout_s=args.connect_timeout_s,
        verify_rate=args.verify_rate,
        ban_min_reporters=args.ban_min_reporters,
        host=p2p_host,
    )
    return HelixClient(
        args.initial_peers,
        model=args.model,
        swarm=args.swarm,
        model_id=args.model_id,
        options=options,
        swarm_key=args.swarm_key,
    )


def run_serve(args: argparse.Namespace) -> int:
    from aiohttp import web
    from helix_p2p.client.gateway import Gateway

    # the gateway's own p2p daemon listens where its HTTP side does: loopback stays loopback
    p2p_host = "127.0.0.1" if args.host in ("127.0.0.1", "localhost") else "0.0.0.0"
    with _open_client(args, p2p_host) as client:
        print(f"serving {client.model_id} at http://{args.host}:{args.port}/v1", flush=True)
        print(f"status page at http://{args.host}:{args.port}/ (metrics at /metrics)", flush=True)
        web.run_app(Gateway(client).app(), host=args.host, port=args.port, print=None)
    return 0


def run(args: argparse.Namespace) -> int:

    with _open_client(args, args.host) as client:
        params = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "repetition_penalty": args.repetition_penalty,
            "seed": args.seed,
            "stop": args.stop,
        }
        if args.json:
            result = client.generate(args.prompt, **params)
            print(json.dumps(result.to_json()))
            return 0
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        for token in client.stream(args.prompt, **params):
            sys.stdout.write(token.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        result = client.last_result
        print(
            f"[{len(result.token_ids)} tokens, first after {result.timings.first_token_s:.2f} s, "
            f"{result.timings.decode_tokens_per_s:.1f} tokens/s, failovers {result.failovers}]",
            file=sys.stderr,
        )
    return 0
