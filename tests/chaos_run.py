"""Churn under load, shared by `tests/test_chaos.py` and `benchmarks/chaos.py`: a real swarm on
127.0.0.1 (a bootstrap and N `helix-node join` processes with stable identities, each able to hold
half of a tiny Llama, so the plan places every range on several nodes), a `HelixClient` driving a
fixed number of concurrent greedy generations in a closed loop, and a killer that SIGKILLs a
random node (the elected planner among them) every few seconds and restarts it, with the same
identity, a little later.

The run has three phases on one continuous load: `before` (undisturbed), `chaos` (kills and
restarts), `after` (every node back; it ends once throughput is back within `recovered_within` of
`before`, or after `after_s`). The expected output of each prompt is what the undisturbed swarm
generates for it, read at the start of the same run.

The killer never kills the last live serving replica of a layer (it picks another victim or
skips the round), so that every request could be served: a request that fails anyway is a bug.
`ChaosResult` holds each request's outcome and every token's arrival time; `nodes_ok()` checks
that no node process crashed (killed ones are killed by us; the others exit 0 when stopped) and
that no node logged a traceback."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from pathlib import Path

from procs import FAST, Proc, Processes, SwarmObserver, start_bootstrap, start_node, wait_for

MODEL_ID = "tiny-chaos"
PROMPTS = (
    "the quick brown fox",
    "a swarm of volunteer nodes",
    "once upon a time",
    "layers move between peers",
    "hello world",
    "pipelines of replicas",
    "the planner was elected",
    "tokens flow from source to sink",
)


@dataclass(frozen=True)
class ChaosSettings:
    nodes: int = 8
    num_layers: int = 4
    concurrency: int = 32
    max_new_tokens: int = 8
    before_s: float = 10.0
    duration_s: float = 30.0
    kill_every_s: float = 4.0
    #: a killed node is restarted (same identity) this long after its kill
    down_s: float = 5.0
    #: the most nodes down at once
    max_down: int = 2
    #: the after phase ends when a throughput window is within this share of `before`...
    recovered_within: float = 0.2
    #: ...or after this long
    after_s: float = 30.0
    window_s: float = 2.0
    seed: int = 0
    planner_method: str = "milp"
    #: a request running longer than this counts as hung
    request_timeout_s: float = 120.0
    #: record lifetime: nodes refresh every quarter of it and count as gone after half of it. Not
    #: FAST's 8 s: 8 nodes, 32 generations and restarts on 2 busy cores delay refreshes past 4 s
    ttl_s: float = 16.0


@dataclass(frozen=True)
class Outcome:
    prompt: int
    phase: str
    started_s: float
    ended_s: float
    token_ids: tuple[int, ...]
    failovers: int
    #: None when it completed; else "ErrorType: message"
    error: str | None
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class Kill:
    at_s: float
    name: str
    was_planner: bool
    restarted_at_s: float | None


@dataclass
class ChaosResult:
    settings: ChaosSettings
    expected: dict[int, tuple[int, ...]]
    outcomes: list[Outcome]
    token_times_s: list[float]
    kills: list[Kill]
    chaos_start_s: float
    chaos_end_s: float
    #: every node back and serving (after the last restart)
    all_back_s: float | None
    end_s: float
    node_exit_codes: dict[str, int | None]
    tracebacks: dict[str, str]
    skipped_kills: int = 0
    hung: int = 0

    # ------------------------------------------------------------------------- counts

    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is None]

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]

    def failed_by_reason(self) -> Counter:
        return Counter(o.error.split(":", 1)[0] for o in self.failed() if o.error)

    def mismatched(self) -> list[Outcome]:
        return [o for o in self.completed() if o.token_ids != self.expected[o.prompt]]

    def failed_over(self) -> list[Outcome]:
        return [o for o in self.completed() if o.failovers > 0]

    # ----------------------------------------------------------------------- throughput

    def windows(self, start_s: float, end_s: float) -> list[float]:
        """Tokens/s in consecutive `window_s` windows of [start_s, end_s)."""
        w = self.settings.window_s
        n = max(1, int((end_s - start_s) // w))
        counts = [0] * n
        for t in self.token_times_s:
            if start_s <= t < start_s + n * w:
                counts[int((t - start_s) // w)] += 1
        return [c / w for c in counts]

    def before_tokens_per_s(self) -> float:
        # the first window is skipped: the load is still ramping up
        ws = self.windows(0.0, self.chaos_start_s)[1:] or self.windows(0.0, self.chaos_start_s)
        return sum(ws) / len(ws)

    def chaos_min_tokens_per_s(self) -> float:
        return min(self.windows(self.chaos_start_s, self.chaos_end_s))

    def chaos_mean_tokens_per_s(self) -> float:
        ws = self.windows(self.chaos_start_s, self.chaos_end_s)
        return sum(ws) / len(ws)

    def after_tokens_per_s(self) -> float:
        ws = self.windows(self.chaos_end_s, self.end_s)
        return sum(ws[-3:]) / len(ws[-3:])

    def recovery_s(self) -> float | None:
        """From the end of the chaos to the end of the first window back within `recovered_within`
        of the before throughput (None: not within the after phase)."""
        target = (1 - self.settings.recovered_within) * self.before_tokens_per_s()
        for i, tps in enumerate(self.windows(self.chaos_end_s, self.end_s)):
            if tps >= target:
                return (i + 1) * self.settings.window_s
        return None


# ------------------------------------------------------------------------------------------ swarm


class ChurnSwarm:
    """A bootstrap and `settings.nodes` nodes with identity files, and an observer."""

    def __init__(self, procs: Processes, model: Path, settings: ChaosSettings) -> None:
        self.procs = procs
        self.model = model
        self.settings = settings
        self.timings = dict(FAST, **{"--ttl-s": f"{settings.ttl_s:g}", "--connect-timeout-s": "30"})
        half = settings.num_layers // 2
        # tokens/s for holding 1..half layers: k layers give k x 1000 x (1 + 0.1 (k - 1)) layer-tokens/s,
        # more the more layers a node holds, so the best plan fills every node to half the model:
        # nodes/2 replicas of each half
        self.table = [1000.0 * (1 + 0.1 * (k - 1)) / k for k in range(1, half + 1)]
        boot = start_bootstrap(procs)
        self.maddrs = boot.maddrs
        self.bootstrap = boot.proc
        self.names = [f"n{i}" for i in range(settings.nodes)]
        #: every incarnation of each node, the live one last
        self.incarnations: dict[str, list[Proc]] = {name: [] for name in self.names}
        self.killed: set[int] = set()  # pids we killed
        for name in self.names:
            self.start(name)
        self.observer = SwarmObserver(self.maddrs)

    def start(self, name: str) -> Proc:
        n = len(self.incarnations[name])
        extra = ["--identity", str(self.procs.workdir / f"{name}.key"), "--public-name", name]
        extra += ["--planner-method", self.settings.planner_method, "--grace-s", "5"]
        extra += ["--max-layers", str(self.settings.num_layers // 2), "--planner-time-limit-s", "10"]
        proc = start_node(
            self.procs, f"{name}.{n}", self.maddrs, self.model, self.table, *extra, timings=self.timings
        )
        self.incarnations[name].append(proc)
        return proc

    def live_proc(self, name: str) -> Proc:
        return self.incarnations[name][-1]

    def kill(self, name: str) -> None:
        proc = self.live_proc(name)
        self.killed.add(proc.pid)
        self.procs.kill(proc)

    def read(self):
        from helix_p2p.swarm.election import elect_planner

        now = time.time()  # records are judged when the read began (a slow read ages none of them)
        records, _ = self.observer.read()
        live = {p: r for p, r in records.items() if r.is_live(now)}
        return live, elect_planner(records, now, MODEL_ID), records

    def name_of(self, peer_id: str, records) -> str | None:
        r = records.get(peer_id)
        return r.name if r is not None else None

    def ready(self):
        """The followed plan when every running node is in it and serves its range, else None."""
        now = time.time()
        records, plans = self.observer.read()
        plan = self.plan_of(records, plans, now)
        if plan is None:
            return None
        live = {r.name for r in records.values() if r.is_live(now)}
        running = {name for name in self.names if self.live_proc(name).alive()}
        if live != running or len(plan.members) != len(running):
            return None
        for peer, span in plan.placement.items():
            r = records.get(peer)
            if r is None or r.layers != span or r.state.value != "serving":
                return None
        return plan

    def plan_of(self, records, plans, now: float):
        """The plan a node with this view follows."""
        from helix_p2p.swarm.election import choose_plan, elect_planner

        return choose_plan([p.record for p in plans], elect_planner(records, now, MODEL_ID), None, MODEL_ID)

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM every running node, wait; the exit code of every incarnation not killed by us."""
        running = [p for ps in self.incarnations.values() for p in ps if p.alive()]
        for proc in running:
            self.procs.signal(proc, signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for ps in self.incarnations.values():
            for proc in ps:
                if proc.pid in self.killed:
                    continue
                try:
                    codes[proc.name] = self.procs.wait(proc, 60)
                except Exception:  # noqa: BLE001 - still running: reported as None
                    codes[proc.name] = None
        return codes

    def tracebacks(self) -> dict[str, str]:
        found = {}
        for ps in self.incarnations.values():
            for proc in ps:
                err = proc.stderr()
                at = err.find("Traceback (most recent call last)")
                if at >= 0:
                    found[proc.name] = err[max(0, at - 400) : at + 3000]
        return found


def coverage_without(records, victim_peer: str | None, num_layers: int) -> bool:
    """Whether every layer keeps a live serving replica if `victim_peer` dies."""
    held = set()
    for peer, r in records.items():
        if peer != victim_peer and r.layers is not None and r.state.value == "serving":
            held.update(range(*r.layers))
    return held >= set(range(num_layers))


# ------------------------------------------------------------------------------------------- load


class Load:
    """`concurrency` threads, each running one generation after another until stopped."""

    def __init__(self, client, settings: ChaosSettings, t0: float) -> None:
        self.client = client
        self.settings = settings
        self.t0 = t0
        self.phase = "before"
        self.outcomes: list[Outcome] = []
        self.token_times_s: list[float] = []
        self.hung = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._worker, args=(i,), name=f"load-{i}", daemon=True)
            for i in range(settings.concurrency)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.settings.request_timeout_s + 10)

    def _on_token(self, _token) -> None:
        self.token_times_s.append(time.monotonic() - self.t0)

    def _worker(self, index: int) -> None:
        k = index
        while not self._stop.is_set():
            prompt = k % len(PROMPTS)
            k += self.settings.concurrency
            phase = self.phase
            started = time.monotonic() - self.t0
            future = self.client.start(
                PROMPTS[prompt], max_new_tokens=self.settings.max_new_tokens, on_token=self._on_token
            )
            try:
                result = future.result(timeout=self.settings.request_timeout_s)
            except FutureTimeout:
                future.cancel()
                self.hung += 1
                outcome = Outcome(
                    prompt, phase, started, time.monotonic() - self.t0, (), 0, "Hung: no answer"
                )
            except Exception as e:  # noqa: BLE001 - every failure is recorded and checked by the caller
                outcome = Outcome(
                    prompt, phase, started, time.monotonic() - self.t0, (), 0, f"{type(e).__name__}: {e}",
                    tuple(getattr(e, "failures", ())),
                )  # fmt: skip
            else:
                outcome = Outcome(
                    prompt, phase, started, time.monotonic() - self.t0, tuple(result.token_ids),
                    result.failovers, None, tuple(result.failures),
                )  # fmt: skip
            self.outcomes.append(outcome)


# -------------------------------------------------------------------------------------------- run


def run_chaos(workdir: Path, settings: ChaosSettings, log=print) -> ChaosResult:
    """Start the swarm, measure, churn, recover, stop; always kills every process at the end."""
    from helix_p2p.client import ClientOptions, HelixClient

    from helix_p2p.shard import TinyModelSpec, make_tiny_model

    model = make_tiny_model(
        workdir / MODEL_ID, TinyModelSpec(num_layers=settings.num_layers, initializer_range=0.1)
    )
    rng = random.Random(settings.seed)
    with Processes(workdir) as procs:
        swarm = ChurnSwarm(procs, model, settings)
        try:
            plan = wait_for(
                swarm.ready, 240, "a plan over every node, loaded", interval_s=1, describe=procs.report
            )
            log(f"swarm ready: plan epoch {plan.epoch}, placement {sorted(plan.placement.values())}")
            options = ClientOptions(
                step_timeout_s=10, avoid_s=10, route_wait_s=20, max_failovers=8, refresh_s=1.0
            )
            with HelixClient(swarm.maddrs, model=str(model), options=options) as client:
                # the undisturbed run: each prompt once, all at once
                futures = {
                    i: client.start(p, max_new_tokens=settings.max_new_tokens) for i, p in enumerate(PROMPTS)
                }
                expected = {i: tuple(f.result(timeout=120).token_ids) for i, f in futures.items()}
                t0 = time.monotonic()
                load = Load(client, settings, t0)
                load.start()
                time.sleep(settings.before_s)
                load.phase = "chaos"
                chaos_start = time.monotonic() - t0
                kills, skipped = _churn(swarm, settings, rng, t0, log)
                chaos_end = time.monotonic() - t0
                load.phase = "after"
                all_back = _after(swarm, settings, load, t0, chaos_end, log)
                load.stop()
                end = time.monotonic() - t0
        finally:
            swarm.observer.close()
            codes = swarm.stop_all()
        tracebacks = swarm.tracebacks()
        report = procs.report(15)
    result = ChaosResult(
        settings, expected, list(load.outcomes), sorted(load.token_times_s), kills, chaos_start,
        chaos_end, all_back, end, codes, tracebacks, skipped, load.hung,
    )  # fmt: skip
    result.process_report = report  # type: ignore[attr-defined]
    with open(workdir / "outcomes.jsonl", "w") as f:
        f.writelines(json.dumps(asdict(o)) + "\n" for o in result.outcomes)
    return result


def _churn(swarm: ChurnSwarm, settings: ChaosSettings, rng: random.Random, t0: float, log):
    """Kill and restart nodes for `duration_s`; the elected planner is the second victim. A node
    counts as down from its kill until its new incarnation is live in the registry again (a
    restart takes a while on a busy machine), and at most `max_down` are down at once."""
    kills: list[Kill] = []
    down: dict[str, float] = {}  # name -> restart at (monotonic)
    returning: dict[str, float] = {}  # name -> restarted at (wall clock)
    skipped = 0
    end = time.monotonic() + settings.duration_s
    next_kill = time.monotonic()
    planner_killed = False

    def restart(name: str) -> None:
        returning[name] = time.time()
        swarm.start(name)
        down.pop(name, None)
        i = max(i for i, k in enumerate(kills) if k.name == name)
        kills[i] = Kill(kills[i].at_s, name, kills[i].was_planner, time.monotonic() - t0)
        log(f"{time.monotonic() - t0:6.1f} s: restarted {name}")

    while True:
        now = time.monotonic()
        for name, at in list(down.items()):
            if now >= at:
                restart(name)
        if now >= end:
            break
        if now >= next_kill:
            try:
                records, planner, seen = swarm.read()
            except Exception as e:  # noqa: BLE001 - the observer's lookup timed out: try again soon
                log(f"{now - t0:6.1f} s: could not read the swarm ({e})")
                time.sleep(0.5)
                continue
            by_name = {r.name: p for p, r in records.items()}
            for name, since in list(returning.items()):
                peer = by_name.get(name)
                if peer is not None and records[peer].joined_at >= since - 1:
                    del returning[name]
                    log(f"{now - t0:6.1f} s: {name} is back")
            if len(down) + len(returning) >= settings.max_down:
                time.sleep(0.2)
                continue
            next_kill = now + settings.kill_every_s
            wall = time.time()
            ages = " ".join(
                f"{r.name}:{wall - r.updated_at:.1f}" for r in sorted(seen.values(), key=lambda r: r.name)
            )
            log(f"{now - t0:6.1f} s: view: {len(records)} live (record ages {ages}), {_plan_line(swarm)}")
            candidates = [n for n in swarm.names if n not in down and n not in returning]
            planner_name = swarm.name_of(planner, records) if planner else None
            if not planner_killed and len(kills) >= 1 and planner_name in candidates:
                order = [planner_name]
            else:
                order = rng.sample(candidates, len(candidates))
            victim = next(
                (n for n in order if coverage_without(records, by_name.get(n), settings.num_layers)), None
            )
            if victim is None:
                log(f"{now - t0:6.1f} s: every candidate holds the last replica of some layer; no kill")
                skipped += 1
                continue
            was_planner = victim == planner_name
            planner_killed |= was_planner
            swarm.kill(victim)
            down[victim] = time.monotonic() + settings.down_s
            kills.append(Kill(now - t0, victim, was_planner, None))
            log(f"{now - t0:6.1f} s: killed {victim}{' (the planner)' if was_planner else ''}")
        time.sleep(0.2)
    # restart whatever is still down: the after phase has every node back
    for name in list(down):
        restart(name)
    return kills, skipped


def _plan_line(swarm: ChurnSwarm) -> str:
    now = time.time()
    records, plans = swarm.observer.read()
    plan = swarm.plan_of(records, plans, now)
    if plan is None:
        return "no plan"
    return f"plan epoch {plan.epoch}: {len(plan.members)} members, {len(plan.placement)} holding layers"


def _after(swarm: ChurnSwarm, settings: ChaosSettings, load: Load, t0: float, chaos_end: float, log):
    """Keep the load running until throughput is back and every node serves, or `after_s`."""
    deadline = time.monotonic() + settings.after_s
    all_back = None
    while time.monotonic() < deadline:
        time.sleep(settings.window_s)
        if all_back is None:
            try:
                if swarm.ready():
                    all_back = time.monotonic() - t0
                    log(f"{all_back:6.1f} s: every node back and serving the plan")
            except Exception as e:  # noqa: BLE001 - a slow lookup: try again next window
                log(f"reading the swarm failed ({type(e).__name__}); trying again")
        now = time.monotonic() - t0
        before = _mean_window(load.token_times_s, settings.window_s, settings.before_s)
        last = (
            sum(1 for t in list(load.token_times_s) if now - settings.window_s <= t < now) / settings.window_s
        )
        if all_back is not None and before and last >= (1 - settings.recovered_within) * before:
            break
    return all_back


def _mean_window(times: list[float], window_s: float, before_s: float) -> float:
    span = before_s - window_s  # the first window is the ramp-up
    if span <= 0:
        return 0.0
    return sum(1 for t in list(times) if window_s <= t < before_s) / span
