"""`helix demo`: a whole swarm on this machine in one command, for a first look.

It makes a tiny random model once (cached), starts the real commands as child processes on
127.0.0.1 (a `helix-bootstrap` and four `helix-node join` that pretend to be an A100, an L4 and two
T4s through `--throughput` tables from the Helix paper's data, `helix_p2p.demo_gpus`), waits for the
elected planner's plan and for every node to load its layers, prints the plan, generates through
the client library (`HelixClient`) and prints tokens/s, then stops everything it started.

Every child runs in its own session (process group), so a terminal's Ctrl-C reaches only this
process, which then stops the children politely (SIGTERM) and kills each whole group (the p2p
daemons included) after a short grace period, on every way out: normal end, error, SIGINT, SIGTERM,
SIGHUP. On Linux the children also get SIGTERM if this process is killed outright.

It lives in the client shell because it uses `HelixClient`; the node and the bootstrap are only run
as processes, never imported (the shells do not import each other)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helix_p2p.errors import HelixError

DEFAULT_BASE_PORT = 31400
SWARM = "helix-demo"
MODEL_NAME = "helix-demo-tiny-llama"
NUM_LAYERS = 8
PROMPTS = ("The quick brown fox", "A swarm of volunteers", "Once upon a time there was")
#: short record lifetimes and quick rounds so that the swarm settles in seconds, not minutes
NODE_TIMINGS = {
    "--ttl-s": "10",
    "--refresh-s": "1",
    "--debounce-s": "2",
    "--probe-period-s": "5",
    "--probe-bytes": "65536",
    "--planner-time-limit-s": "10",
    "--grace-s": "3",
    "--connect-timeout-s": "60",
}
#: how long children get to stop politely before their process groups are killed
STOP_GRACE_S = 10.0
INTERRUPTED_GRACE_S = 3.0
MADDR_LINE = re.compile(r"^/ip[46]/\S+/tcp/\d+/p2p/\w+$")


class DemoError(HelixError):
    """The demo cannot run or its swarm did not come up (the message says which part and why)."""


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP: stop every process."""


#: signals received during this run. The handler raises, but an exception raised while the main
#: thread runs a finalizer or a callback is swallowed ("Exception ignored in ..."), and CI once saw
#: a Ctrl-C vanish that way; the demo also checks this list between its steps.
_SIGNALLED: list[str] = []


def raise_if_signalled() -> None:
    if _SIGNALLED:
        raise Interrupted(_SIGNALLED[0])


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a small swarm on this machine: plan, generate, print tokens/s, stop",
        description="Start a bootstrap peer and four nodes on 127.0.0.1 that pretend to be an A100, an "
        "L4 and two T4s (tables from the Helix paper's data, scaled to a tiny model made once and "
        "cached), wait for the plan, print it, generate through the client and print tokens/s, then "
        "stop every process it started. Ctrl-C at any point stops them all.",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_BASE_PORT,
        help=f"first of 6 consecutive ports: bootstrap, 4 nodes, status page (default {DEFAULT_BASE_PORT}; "
        "0: any free ports)",
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the swarm up after the generations, print what to try, stop on Ctrl-C",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=300.0,
        help="give up if the swarm is not serving after this long (default 300)",
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per generation (default 16)")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------ processes


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def last_words(self, lines: int = 5) -> str:
        """The end of its stderr, for error messages (debug lines left out)."""
        text = self.stderr_path.read_text(errors="replace").splitlines()
        kept = [line for line in text if "DEBUG" not in line][-lines:]
        return "\n".join(f"    {line}" for line in kept) or "    (no output)"


@dataclass
class Children:
    """Every process the demo starts, each in its own session; `stop()` ends them all."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str]) -> Child:
        out, err = self.workdir / f"{name}.out", self.workdir / f"{name}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                # Own session: the terminal's Ctrl-C is ours to handle, and killing the group takes
                # the child's p2p daemon along.
                start_new_session=True,
                # safe here: every child starts before the client's thread exists
                preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )
        child = Child(name, popen, out, err)
        self.children.append(child)
        print(f"started {name} (pid {popen.pid})", flush=True)
        return child

    def check_alive(self) -> None:
        raise_if_signalled()
        for child in self.children:
            if not child.alive():
                raise DemoError(
                    f"{child.name} exited with code {child.popen.returncode}; the end of its log:\n"
                    + child.last_words()
                )

    def terminate(self) -> None:
        """SIGTERM to each child (nodes announce leaving and drain); returns at once."""
        for child in self.children:
            if child.alive():
                child.popen.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to each child, then after `grace_s` SIGKILL to each whole group."""
        self.terminate()
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass  # killed with its group below
        for child in self.children:
            try:
                os.killpg(child.pid, signal.SIGKILL)  # what is left in the group (a p2p daemon)
            except (ProcessLookupError, PermissionError):
                pass  # the group is already empty
            child.popen.wait(timeout=10)


def _terminate_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the demo dies, even by SIGKILL."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def check_ports_free(ports: Sequence[int]) -> None:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise DemoError(
                    f"port {port} on 127.0.0.1 is in use (another demo still running?); choose other "
                    f"ports with --port N (uses N..N+5) or --port 0 (any free ports)"
                ) from None


def any_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_module(module: str) -> list[str]:
    """The command of a helix console script, run by this interpreter (no PATH needed)."""
    return [sys.executable, "-m", module]


# ---------------------------------------------------------------------------------------- model


def demo_model() -> Path:
    """The tiny model, made once into the cache (a folder renamed into place whole)."""
    from helix_p2p.shard import TinyModelSpec, make_tiny_model
    from helix_p2p.shard.profile import cache_dir

    path = cache_dir() / "demo" / MODEL_NAME
    if (path / "config.json").is_file():
        print(f"model: {path} (cached)", flush=True)
        return path
    print(f"model: making a tiny random {NUM_LAYERS}-layer llama at {path} (once)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=path.parent))
    try:
        make_tiny_model(building / "m", TinyModelSpec(num_layers=NUM_LAYERS, hidden_size=128, num_heads=4))
        try:
            (building / "m").rename(path)
        except OSError:
            if not (path / "config.json").is_file():  # not another demo that finished first
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------- the swarm


@dataclass(frozen=True)
class Ports:
    bootstrap: int
    nodes: tuple[int, ...]
    dashboard: int


def choose_ports(base: int, num_nodes: int) -> Ports:
    if base == 0:
        return Ports(0, (0,) * num_nodes, any_free_port())
    if not 1024 <= base <= 65535 - (num_nodes + 1):
        raise DemoError(f"--port must be in 1024..{65535 - num_nodes - 1} (or 0: any free ports), got {base}")
    ports = Ports(base, tuple(base + 1 + i for i in range(num_nodes)), base + num_nodes + 1)
    check_ports_free([ports.bootstrap, *ports.nodes, ports.dashboard])
    return ports


def bootstrap_supports(flag: str) -> bool:
    """Whether this version of `helix-bootstrap` has `flag` (its --help says)."""
    done = subprocess.run(
        [*python_module("helix_p2p.bootstrap"), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return flag in done.stdout


def wait_for_addresses(boot: Child, children: Children, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children.check_alive()
        lines = boot.stdout().splitlines()
        maddrs = [line for line in lines if MADDR_LINE.match(line)]
        if maddrs and any(line.startswith("helix-node join") for line in lines):
            return maddrs
        time.sleep(0.2)
    raise DemoError(
        f"the bootstrap printed no address within {timeout_s:g} s; its log:\n" + boot.last_words()
    )


@dataclass(frozen=True)
class Readiness:
    """How far the swarm is: nodes in the registry, a plan over all of them, nodes ready under it."""

    joined: int
    planned: bool
    ready: int
    total: int

    @property
    def steps(self) -> int:
        return self.joined + int(self.planned) + self.ready

    @property
    def done(self) -> bool:
        return self.joined == self.total and self.planned and self.ready == self.total

    def describe(self) -> str:
        if self.joined < self.total:
            return f"{self.joined}/{self.total} nodes joined"
        if not self.planned:
            return "waiting for the plan"
        return f"{self.ready}/{self.total} nodes loaded their layers"


def readiness(snapshot: Any, model_id: str, total: int) -> Readiness:
    from helix_p2p.swarm.records import NodeState

    ours = {
        p: r for p, r in snapshot.records.items() if r.model.id == model_id and r.state != NodeState.LEAVING
    }
    plan = snapshot.plan
    planned = plan is not None and len(ours) == total and set(ours) <= set(plan.members)
    ready = 0
    if planned:
        for peer, record in ours.items():
            span = plan.placement.get(peer)
            if span is None:
                ready += record.state == NodeState.STANDBY
            else:
                ready += record.state == NodeState.SERVING and tuple(record.layers or ()) == tuple(span)
    return Readiness(min(len(ours), total), planned, ready, total)


def wait_until_ready(client: Any, children: Children, model_id: str, total: int, timeout_s: float) -> None:
    from helix_p2p.progress import advance_to, on_terminal, progress_bar

    started = time.monotonic()
    last = None
    bar = progress_bar(
        "swarm", 2 * total + 1, unit="step", show_after_s=0, bar_format="{desc}: {bar} {n}/{total}{postfix}"
    )
    try:
        while True:
            children.check_alive()
            state = readiness(client.snapshot(), model_id, total)
            if state.describe() != (last.describe() if last else None):
                advance_to(bar, state.steps, state.describe())
                if not on_terminal():  # the bar is not shown: say each milestone once, as a line
                    print(f"[{time.monotonic() - started:5.1f} s] {state.describe()}", flush=True)
                last = state
            if state.done:
                return
            if time.monotonic() - started > timeout_s:
                raise DemoError(
                    f"the swarm was not serving after {timeout_s:g} s ({state.describe()}); raise "
                    "--timeout-s on a slow machine"
                )
            time.sleep(0.25)
    finally:
        bar.close()


# ------------------------------------------------------------------------------------- printing


def format_plan(snapshot: Any) -> str:
    plan = snapshot.plan
    names = {p: (r.name or p) for p, r in snapshot.records.items()}
    gpus = {p: r.gpu for p, r in snapshot.records.items()}
    tables = {p: r.tokens_per_s for p, r in snapshot.records.items()}
    lines = [
        (
            f"plan: epoch {plan.epoch}, made by {names.get(plan.planner, plan.planner)} with {plan.method} "
            f"in {plan.solve_seconds:.2f} s"
        ),
        f"  {'node':<6} {'gpu':<12} {'layers':<8} {'capacity tokens/s':>17}",
    ]
    for peer, (start, end) in sorted(
        plan.placement.items(), key=lambda item: (item[1], names.get(item[0], ""))
    ):
        table = tables.get(peer, ())
        capacity = f"{table[end - start - 1]:.1f}" if end - start <= len(table) else "-"
        lines.append(
            f"  {names.get(peer, peer):<6} {gpus.get(peer, '?'):<12} {f'[{start}, {end})':<8} {capacity:>17}"
        )
    idle = sorted(names[p] for p in plan.members if p not in plan.placement and p in names)
    if idle:
        lines.append(f"  not used by this plan: {', '.join(idle)}")
    lines.append("flows (tokens/s):")
    for flow in plan.flows:
        if flow.tokens_per_s > 1e-9:
            lines.append(
                f"  {names.get(flow.src, flow.src):>6} -> {names.get(flow.dst, flow.dst):<6} {flow.tokens_per_s:9.1f}"
            )
    bound = plan.upper_bound_tokens_per_s
    if bound is None:
        verdict = "no bound proven by this method"
    elif bound - plan.objective_tokens_per_s <= 1e-6 * max(1.0, bound):
        verdict = f"bound {bound:.1f}: proven optimal"
    else:
        # The planner may give flow up for a shallower pipeline (planner/servable.py), or stop short.
        verdict = (
            f"bound {bound:.1f} (gap {100 * (bound - plan.objective_tokens_per_s) / bound:.1f}%: flow given "
            "up for fewer hops, or not proven)"
        )
    lines.append(f"max flow {plan.objective_tokens_per_s:.1f} tokens/s, {verdict}")
    lines.append(
        "  (the pretend GPUs' figures, from the Helix paper's LLaMA-30B profiles; this machine's CPU "
        "runs the tiny model at its own speed)"
    )
    return "\n".join(lines)


def run_generations(client: Any, prompts: Sequence[str], max_new_tokens: int) -> None:
    names = {p: (r.name or p) for p, r in client.snapshot().records.items()}
    tokens = 0
    seconds = 0.0
    print("generating (a random tiny model: the words are noise, the tokens/s are real):", flush=True)
    for prompt in prompts:
        raise_if_signalled()
        result = client.generate(prompt, max_new_tokens=max_new_tokens)
        route = " -> ".join(
            f"{names.get(h['peer_id'], h['peer_id'])}[{h['start']},{h['end']})" for h in result.route
        )
        print(
            f"  {prompt!r} -> {result.text!r}\n"
            f"    {len(result.token_ids)} tokens in {result.timings.total_s:.2f} s "
            f"(first after {result.timings.first_token_s:.2f} s, then "
            f"{result.timings.decode_tokens_per_s:.1f} tokens/s) via {route}",
            flush=True,
        )
        tokens += len(result.token_ids)
        seconds += result.timings.total_s
    print(
        f"tokens/s: {tokens / seconds:.1f} ({tokens} tokens in {len(prompts)} generations, {seconds:.2f} s)"
    )


def try_lines(maddrs: Sequence[str], model: Path, dashboard_port: int | None) -> str:
    peers = " ".join(shlex.quote(m) for m in maddrs)
    common = f"--initial-peers {peers} --swarm {SWARM} --model {shlex.quote(str(model))}"
    lines = ["The swarm stays up until Ctrl-C. Try:"]
    if dashboard_port is not None:
        lines.append(f"  status page:  http://127.0.0.1:{dashboard_port}/")
    lines += [
        f"  helix status --initial-peers {peers} --swarm {SWARM}",
        f"  helix generate {common} 'Once upon a time'",
        f"  helix serve {common} --port 8000",
        f"  helix-node join {common} --device cpu --host 127.0.0.1   (a fifth node)",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> int:
    if not args.timeout_s > 0:
        raise DemoError(f"--timeout-s must be > 0, got {args.timeout_s}")
    if args.max_new_tokens < 1:
        raise DemoError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from helix_p2p.demo_gpus import demo_gpus

    gpus = demo_gpus(NUM_LAYERS)
    ports = choose_ports(args.port, len(gpus))
    model = demo_model()
    workdir = Path(tempfile.mkdtemp(prefix="helix-demo-"))
    children = Children(workdir)
    client = None
    ok = False
    serving_until_stopped = False  # --keep-running: then Ctrl-C is the normal way out
    interrupted = False
    _SIGNALLED.clear()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        boot_argv = [
            *python_module("helix_p2p.bootstrap"),
            "--host",
            "127.0.0.1",
            "--port",
            str(ports.bootstrap),
        ]
        boot_argv += ["--identity", str(workdir / "bootstrap.key"), "--swarm", SWARM]
        dashboard = ports.dashboard if bootstrap_supports("--dashboard-port") else None
        if dashboard is not None:
            boot_argv += ["--dashboard-port", str(dashboard)]
        boot = children.start("bootstrap", boot_argv)
        maddrs = wait_for_addresses(boot, children, 60)
        print(f"bootstrap: {' '.join(maddrs)}", flush=True)
        for gpu, port in zip(gpus, ports.nodes, strict=True):
            table = workdir / f"{gpu.name}.throughput.json"
            table.write_text(json.dumps(gpu.throughput_file()))
            argv = [
                *python_module("helix_p2p.node"),
                "join",
                "--initial-peers",
                *maddrs,
                "--model",
                str(model),
            ]
            argv += ["--throughput", str(table), "--public-name", gpu.name, "--swarm", SWARM]
            argv += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
            argv += ["--max-memory", "2"]
            for flag, value in NODE_TIMINGS.items():
                argv += [flag, value]
            children.start(gpu.name, argv)

        from helix_p2p.client.client import ClientOptions, HelixClient

        client = HelixClient(maddrs, str(model), swarm=SWARM, options=ClientOptions(refresh_s=0.5))
        wait_until_ready(client, children, client.model_id, len(gpus), args.timeout_s)
        raise_if_signalled()
        print(format_plan(client.snapshot()), flush=True)
        run_generations(client, PROMPTS, args.max_new_tokens)
        if args.keep_running:
            print(try_lines(maddrs, model, dashboard), flush=True)
            print(f"logs: {workdir}", flush=True)
            serving_until_stopped = True
            while True:
                children.check_alive()
                time.sleep(1)
        raise_if_signalled()
        ok = True
        return 0
    except (KeyboardInterrupt, Interrupted):
        interrupted = not serving_until_stopped
        print("\nhelix demo: stopping every process it started", file=sys.stderr, flush=True)
        ok = True  # nothing failed: the logs need not stay
        return 0 if serving_until_stopped else 130
    except Exception:
        print(f"helix demo: logs kept in {workdir}", file=sys.stderr, flush=True)
        raise
    finally:
        # A second Ctrl-C must not cut the clean-up short (it is bounded by STOP_GRACE_S).
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        stopping = time.monotonic()
        children.terminate()  # they stop while the client closes
        try:
            if client is not None:
                client.close()
        finally:
            # after an interruption nobody waits for a polite goodbye: the whole swarm goes away
            children.stop(STOP_GRACE_S if ok and not interrupted else INTERRUPTED_GRACE_S)
            took_s = time.monotonic() - stopping
            print(f"stopped {len(children.children)} processes in {took_s:.1f} s", flush=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if ok:
                shutil.rmtree(workdir, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    _SIGNALLED.append(signal.Signals(signum).name)
    raise Interrupted(signal.Signals(signum).name)
