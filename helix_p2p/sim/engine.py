"""The discrete-event simulator: a cluster, a plan, GPU profiles, a workload and a scheduler in;
throughput, latencies and per-node / per-edge figures out. Pure: simulated time only, seeded.

The model, in the order a request lives it:

- Admission. A request is routed once (`helix_p2p.routing`): a pipeline of hops, each a node and
  the layers it runs. Every hop reserves the request's whole context (prompt + the most tokens it
  may generate) in its KV cache, so the cache can never overflow; a request no route has room for
  waits in a bounded FIFO, or is rejected with a reason.
- A step is one pass through the pipeline: the prompt step carries the prompt (and yields the first
  token); each decode step carries one token. The client side (source and sink) starts the next
  decode step as soon as a step's token arrives. A request lives for `output_tokens` steps.
- Links. Each directed link sends one message at a time, first come first served, and a message
  takes bytes / bytes_per_s to send plus the link's latency to arrive; the link is busy only while
  sending. Node to node a token weighs `activation_bytes`; source to node `token_bytes` per token;
  node to sink one `token_bytes` (the sampled token). What a node finishes in one batch for the
  same next hop travels as one message.
- Nodes. A node runs one batch at a time over all the layers it holds. When idle with work
  waiting, it takes, first come first served, up to the GPU's prompt limits (requests, tokens)
  of prompt work and up to its decode limits (sequences, total context) of decode work; the batch
  takes, per layer, prompt_time(prompt tokens) + decode_time(decode sequences) from the profile
  (Helix's model). A node's own limits and KV budget are those of the number of layers it holds.
- Offline mode keeps the cluster full: new requests (lengths drawn from the trace) are admitted
  whenever the KV caches have room, with at most `offline_prompt_window` requests in their prompt
  step at once (Helix's offline feeder likewise adds one request per prompt finished, so a cold
  start does not flood the first stage with thousands of prompts). Online mode replays arrivals
  at a target rate.
- Churn. When nodes leave or join, the planner re-plans the remaining cluster. Nodes whose range
  changes load the new layers (layers * load_s_per_layer) while still serving the requests they
  hold on the old ones (make before break), and accept new ones once loaded. A request that loses
  a hop (its node left, or switched layers) is routed again ahead of the queue and replays its
  context (prompt and tokens so far) as one prompt step; it is rejected (`node_left`) only when no
  route could ever take it.

Throughput and latencies are measured over [warmup_s, duration_s]; with `drain`, admission stops
at duration_s and the run continues until every admitted request has finished."""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from helix_p2p import planner
from helix_p2p.cluster import SINK, SOURCE, Cluster, NodeId
from helix_p2p.errors import HelixError
from helix_p2p.plan import Plan, PlanError
from helix_p2p.routing import (
    AdmissionQueue,
    Admitted,
    Hop,
    Pipeline,
    Queued,
    Rejected,
    RejectReason,
    RouteGraph,
    Router,
    RouteRequest,
    make_router,
)
from helix_p2p.sim.churn import ChurnEvent, ChurnSchedule
from helix_p2p.sim.profiles import BatchLimits, GpuProfile, ProfileError, profiles_for
from helix_p2p.sim.results import (
    EdgeReport,
    LatencyStats,
    NodeReport,
    PlanChange,
    SimResult,
    TimelinePoint,
)
from helix_p2p.sim.traces import LengthSampler, RequestSpec, load_lengths, online_arrivals

MODES = ("offline", "online")
KV_ADMISSIONS = ("reserve", "expected")


class SimError(HelixError):
    """A simulation that cannot run as asked (bad settings, a plan that does not fit the cluster)."""


class SimInvariantError(RuntimeError):
    """The simulator broke one of its own guarantees (a bug, never the user's input)."""


@dataclass(frozen=True)
class SimConfig:
    scheduler: str = "iwrr"
    mode: str = "offline"
    duration_s: float = 600.0
    #: excluded from the measurements; None = min(60 s, a tenth of the duration)
    warmup_s: float | None = None
    #: online mode: offered load, prompt + output tokens per second
    rate_tokens_per_s: float | None = None
    seed: int = 0
    #: requests that may wait for KV cache before new ones are rejected
    queue_capacity: int = 10_000
    #: offline mode: requests in their prompt step at once; None = twice what the first stage
    #: can batch (sum of prompt_max_requests over the nodes holding layer 0), at least 8
    offline_prompt_window: int | None = None
    #: offline mode: cap on requests in flight (None: only the KV caches limit it)
    max_in_flight: int | None = None
    churn: ChurnSchedule | None = None
    #: stop admitting at duration_s and run until every admitted request has finished
    drain: bool = False
    #: (input, output) pairs to draw from; None = the Azure conversation trace
    lengths: tuple[tuple[int, int], ...] | None = None
    #: online mode: an explicit list of arrivals instead of the trace at `rate_tokens_per_s`
    arrivals: tuple[RequestSpec, ...] | None = None
    #: how admission counts KV cache: "reserve" (every hop reserves the request's whole final
    #: context, prompt + output, so a cache can never overflow) or "expected" (Helix's simulator:
    #: reserve prompt + the workload's mean output x expected_output_ratio, up to kv_high_water of
    #: each budget; the cache then fills token by token, and any overflow is counted in
    #: SimResult.extra, not prevented). Helix ran offline with ratio 1.0, high water 0.85.
    kv_admission: str = "reserve"
    kv_high_water: float = 0.85
    expected_output_ratio: float = 1.0
    #: called once per simulated second with the fraction of duration_s done (progress bars)
    progress: Callable[[float], None] | None = field(default=None, compare=False)

    def resolved_warmup_s(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(60.0, self.duration_s / 10)


# Event kinds; the heap holds (time, sequence number, kind, payload) so equal times keep FIFO order.
_ARRIVAL, _BATCH_DONE, _LINK_FREE, _DELIVER, _CHURN, _NODE_READY, _TICK = range(7)


class _Request:
    __slots__ = (
        "arrival_s",
        "epoch",
        "generated",
        "hops",
        "id",
        "in_prompt",
        "kv_actual",
        "kv_tokens",
        "output_tokens",
        "prompt_tokens",
        "route_request",
        "step_start_s",
    )

    def __init__(self, rid: int, arrival_s: float, prompt_tokens: int, output_tokens: int) -> None:
        self.id = rid
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.generated = 0
        self.hops: tuple[Hop, ...] = ()
        self.kv_tokens = 0
        #: tokens this request has in each hop's cache now ("expected" admission only)
        self.kv_actual = 0
        #: bumped whenever the request loses its route; work items of older epochs are void
        self.epoch = 0
        self.step_start_s = arrival_s
        self.in_prompt = False
        self.route_request = RouteRequest(prompt_tokens, output_tokens)


class _Work:
    """One step of one request travelling its pipeline."""

    __slots__ = ("context", "epoch", "hop", "prompt", "req", "sent_s", "tokens")

    def __init__(self, req: _Request, tokens: int, prompt: bool, context: int) -> None:
        self.req = req
        self.epoch = req.epoch
        self.hop = -1  # -1: at the source; i: at req.hops[i]
        self.tokens = tokens
        self.prompt = prompt
        self.context = context
        self.sent_s = 0.0


class _Node:
    """A node's state; also what routers read as its NodeLoad."""

    __slots__ = (
        "alive",
        "batch_token",
        "busy",
        "busy_s",
        "decode_q",
        "gpu",
        "id",
        "kv_actual",
        "kv_actual_peak",
        "kv_area",
        "kv_budget_tokens",
        "kv_last_s",
        "kv_peak",
        "kv_reserved",
        "layers",
        "limits",
        "load_token",
        "pending_layers",
        "profile",
        "prompt_q",
        "queued_tokens",
        "ready",
    )

    def __init__(self, node_id: NodeId, gpu: str, profile: GpuProfile) -> None:
        self.id = node_id
        self.gpu = gpu
        self.profile = profile
        self.layers: tuple[int, int] | None = None
        self.pending_layers: tuple[int, int] | None = None
        self.load_token = 0
        self.limits: BatchLimits | None = None
        self.kv_budget_tokens = 0
        self.kv_reserved = 0
        #: tokens actually cached (prompt + generated so far), tracked in "expected" admission
        self.kv_actual = 0
        self.kv_actual_peak = 0
        self.kv_peak = 0
        self.kv_area = 0.0
        self.kv_last_s = 0.0
        self.prompt_q: deque[_Work] = deque()
        self.decode_q: deque[_Work] = deque()
        self.queued_tokens = 0
        self.busy = False
        #: identifies the batch running now; a batch of a node that left and came back is void
        self.batch_token = 0
        self.busy_s = 0.0
        self.alive = True
        self.ready = True

    @property
    def free_kv_tokens(self) -> int:
        return self.kv_budget_tokens - self.kv_reserved

    @property
    def accepting(self) -> bool:
        return self.alive and self.ready and self.layers is not None


class _Link:
    __slots__ = ("busy", "bytes_per_s", "dst", "latency_s", "queue", "src")

    def __init__(self, src: str, dst: str, bytes_per_s: float, latency_s: float) -> None:
        self.src = src
        self.dst = dst
        self.bytes_per_s = bytes_per_s
        self.latency_s = latency_s
        self.busy = False
        self.queue: deque[tuple[list[_Work], float]] = deque()


class Simulator:
    def __init__(
        self,
        cluster: Cluster,
        plan: Plan,
        config: SimConfig,
        profiles: Mapping[NodeId, GpuProfile] | None = None,
    ) -> None:
        self.cluster = cluster
        self.config = config
        self._check_config()
        self._expected_kv = config.kv_admission == "expected"
        #: "expected" admission: the output tokens every request is assumed to generate
        self._expected_output = 0
        #: "expected" admission: node -> times its cache grew past its whole budget
        self._kv_overflows: dict[str, int] = {}
        if self._expected_kv:
            outputs = [o for _, o in (config.lengths or load_lengths())]
            self._expected_output = round(sum(outputs) / len(outputs) * config.expected_output_ratio)
        try:
            self.profiles = dict(profiles) if profiles is not None else profiles_for(cluster)
        except ProfileError as e:
            raise SimError(str(e)) from e
        missing = [n.id for n in cluster.nodes if n.id not in self.profiles]
        if missing:
            raise SimError(f"no GPU profile for nodes {missing[:5]}")
        unknown = [n for n in plan.placement if n not in cluster.node_by_id]
        if unknown:
            raise SimError(f"the plan places nodes that are not in cluster {cluster.name!r}: {unknown[:5]}")
        self.warmup_s = config.resolved_warmup_s()
        self.end_s = config.duration_s
        self.now = 0.0
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self.nodes: dict[NodeId, _Node] = {
            n.id: _Node(n.id, n.gpu, self.profiles[n.id]) for n in cluster.nodes
        }
        #: the routers' view: nodes that are present (absent = gone for good)
        self.live: dict[NodeId, _Node] = {}
        absent = set(config.churn.initially_absent) if config.churn else set()
        for node in self.nodes.values():
            node.alive = node.id not in absent
            if node.alive:
                self.live[node.id] = node
        self._links: dict[tuple[str, str], _Link] = {}
        self.requests_in_flight: dict[int, _Request] = {}
        self._next_id = 0
        # counters
        self.arrived = 0
        self.admitted = 0
        self.completed = 0
        self.rerouted = 0
        self.rejected: dict[str, int] = {}
        self.rejections: list[tuple[int, str, str]] = []  # (request id, reason, detail), first 1000
        self._decode_tokens_window = 0
        self._decode_tokens_tick = 0
        self._prompt_latencies: list[float] = []
        self._decode_latencies: list[float] = []
        self._carried: dict[tuple[str, str], int] = {}
        self._timeline: list[TimelinePoint] = []
        self._plan_changes: list[PlanChange] = []
        self._in_prompt = 0
        self._feeding = config.mode == "offline"
        self._events = 0
        self.plan = plan
        self.router: Router = self._make_router(plan, 0)
        self._observe = self.router.name == "swarm"
        self.queue: AdmissionQueue[_Request] = AdmissionQueue(self.router, config.queue_capacity)
        self._plan_epoch = 0
        self._install_plan(plan, initial=True)
        self._sampler = LengthSampler(config.lengths or load_lengths(), config.seed)
        self._prompt_window = self._default_prompt_window()

    # ------------------------------------------------------------------ set-up

    def _check_config(self) -> None:
        c = self.config
        if c.mode not in MODES:
            raise SimError(f"unknown mode {c.mode!r}; choose one of {', '.join(MODES)}")
        if not (c.duration_s > 0 and math.isfinite(c.duration_s)):
            raise SimError(f"the duration must be a positive number of seconds, got {c.duration_s}")
        warmup = c.resolved_warmup_s()
        if not 0 <= warmup < c.duration_s:
            raise SimError(
                f"the warm-up ({warmup} s) must be >= 0 and shorter than the duration ({c.duration_s} s)"
            )
        if c.mode == "online" and c.arrivals is None and c.rate_tokens_per_s is None:
            raise SimError("online mode needs a rate (tokens/s) or an explicit list of arrivals")
        if c.rate_tokens_per_s is not None and not (
            c.rate_tokens_per_s > 0 and math.isfinite(c.rate_tokens_per_s)
        ):
            raise SimError(f"the rate must be a positive number of tokens/s, got {c.rate_tokens_per_s}")
        if c.queue_capacity < (1 if c.mode == "offline" else 0):
            raise SimError(
                "the queue capacity must be >= 0 (>= 1 offline, where the next request waits in it)"
            )
        if c.kv_admission not in KV_ADMISSIONS:
            raise SimError(
                f"unknown KV admission {c.kv_admission!r}; choose one of {', '.join(KV_ADMISSIONS)}"
            )
        if not 0 < c.kv_high_water <= 1 or not 0 <= c.expected_output_ratio < math.inf:
            raise SimError(
                f"kv_high_water must be in (0, 1] and expected_output_ratio >= 0, got {c.kv_high_water} "
                f"and {c.expected_output_ratio}"
            )
        if c.churn is not None:
            c.churn.check_against(self.cluster)

    def _default_prompt_window(self) -> int:
        if self.config.offline_prompt_window is not None:
            return max(1, self.config.offline_prompt_window)
        first = sum(
            n.limits.prompt_max_requests
            for n in self.live.values()
            if n.layers is not None and n.layers[0] == 0 and n.limits is not None
        )
        return max(8, 2 * first)

    def _make_router(self, plan: Plan, epoch: int) -> Router:
        try:
            return make_router(
                self.config.scheduler, RouteGraph(plan, self.cluster), seed=self.config.seed + epoch
            )
        except HelixError as e:
            raise SimError(str(e)) from e

    def _set_layers(self, node: _Node, layers: tuple[int, int] | None) -> None:
        node.layers = layers
        if layers is None:
            node.limits = None
            node.kv_budget_tokens = 0
            return
        try:
            node.limits = node.profile.limits_for(layers[1] - layers[0])
        except ProfileError as e:
            raise SimError(f"node {node.id}: {e}") from e
        node.kv_budget_tokens = node.limits.kv_tokens
        if self._expected_kv:
            node.kv_budget_tokens = int(node.limits.kv_tokens * self.config.kv_high_water)

    def _install_plan(self, plan: Plan, initial: bool = False, reason: str = "initial") -> None:
        self.plan = plan
        if not initial:
            self._plan_epoch += 1
            self.router = self._make_router(plan, self._plan_epoch)
            self.queue.set_router(self.router)
        reloading = 0
        load_per_layer = self.config.churn.load_s_per_layer if self.config.churn else None
        for node in self.live.values():
            new = plan.placement.get(node.id)
            if initial:
                self._set_layers(node, new)
                continue
            if new == node.layers:
                node.pending_layers = None
                node.ready = True
                node.load_token += 1  # cancels a load in progress for a range it no longer gets
            elif new is None:
                # Out of the plan: it finishes what it holds and takes nothing new.
                node.pending_layers = None
                node.ready = False
                node.load_token += 1
            else:
                node.pending_layers = new
                node.ready = False
                node.load_token += 1
                per_layer = node.profile.load_s_per_layer if load_per_layer is None else load_per_layer
                reloading += 1
                self._push(self.now + (new[1] - new[0]) * per_layer, _NODE_READY, (node, node.load_token))
        self._plan_changes.append(
            PlanChange(self.now, reason, plan.method, plan.objective_tokens_per_s, reloading)
        )

    # ------------------------------------------------------------------ events

    def _push(self, time_s: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time_s, self._seq, kind, payload))

    def run(self) -> SimResult:
        config = self.config
        if config.mode == "online":
            arrivals = config.arrivals
            if arrivals is None:
                rate = config.rate_tokens_per_s
                if rate is None:
                    raise SimError("online mode needs a rate (tokens/s) or an explicit list of arrivals")
                arrivals = tuple(online_arrivals(rate, config.duration_s, config.seed, config.lengths))
            for spec in arrivals:
                if spec.prompt_tokens < 1 or spec.output_tokens < 1:
                    raise SimError(f"arrival {spec}: prompt and output must be at least one token")
                if spec.arrival_s < config.duration_s:
                    self._push(spec.arrival_s, _ARRIVAL, spec)
        if config.churn is not None:
            for event in config.churn.events:
                self._push(event.time_s, _CHURN, (config.churn, event))
        self._push(1.0, _TICK, None)
        self._feed()
        heap = self._heap
        end = self.end_s
        drain = config.drain
        while heap:
            t, _, kind, payload = heapq.heappop(heap)
            if t > end and not drain:
                break
            self.now = t
            self._events += 1
            if kind == _DELIVER:
                self._deliver(*payload)  # type: ignore[misc]
            elif kind == _LINK_FREE:
                link: _Link = payload  # type: ignore[assignment]
                link.busy = False
                if link.queue:
                    self._start_send(link)
            elif kind == _BATCH_DONE:
                self._batch_done(*payload)  # type: ignore[misc]
            elif kind == _ARRIVAL:
                self._arrival(payload)  # type: ignore[arg-type]
            elif kind == _TICK:
                self._tick()
            elif kind == _CHURN:
                self._churn(*payload)  # type: ignore[misc]
            elif kind == _NODE_READY:
                self._node_ready(*payload)  # type: ignore[misc]
        if not drain or self.now < end:
            self.now = max(self.now, end)
        return self._result()

    def _tick(self) -> None:
        self._timeline.append(
            TimelinePoint(self.now, self._decode_tokens_tick, len(self.requests_in_flight), len(self.queue))
        )
        self._decode_tokens_tick = 0
        if self.config.progress is not None:
            self.config.progress(min(1.0, self.now / self.end_s))
        if self.now + 1.0 <= self.end_s:
            self._push(self.now + 1.0, _TICK, None)

    def _in_window(self) -> bool:
        return self.warmup_s <= self.now <= self.end_s

    # ------------------------------------------------------------------ admission

    def _new_request(self, arrival_s: float, prompt_tokens: int, output_tokens: int) -> _Request:
        req = _Request(self._next_id, arrival_s, prompt_tokens, output_tokens)
        if self._expected_kv:
            # Admission sees the expected length, not the true one (which no server knows).
            req.route_request = RouteRequest(prompt_tokens, self._expected_output)
        self._next_id += 1
        self.arrived += 1
        return req

    def _arrival(self, spec: RequestSpec) -> None:
        req = self._new_request(self.now, spec.prompt_tokens, spec.output_tokens)
        self._handle(req, self.queue.offer(req, req.route_request, self.live))

    def _feed(self) -> None:
        """Admit what the KV caches now have room for: first the waiting queue, then (offline)
        new requests."""
        for req, outcome in self.queue.drain(self.live):
            self._handle(req, outcome)
        if not self._feeding:
            return
        cap = self.config.max_in_flight
        refused_in_a_row = 0
        while (
            not len(self.queue)
            and self._in_prompt < self._prompt_window
            and (cap is None or len(self.requests_in_flight) < cap)
            and (self.now < self.end_s)
        ):
            prompt, output = self._sampler.draw()
            req = self._new_request(self.now, prompt, output)
            outcome = self.queue.offer(req, req.route_request, self.live)
            self._handle(req, outcome)
            if isinstance(outcome, Rejected):
                refused_in_a_row += 1
                if outcome.reason == RejectReason.NO_PATH or refused_in_a_row >= 100:
                    # Nothing can be served over this plan; wait for the next one.
                    self._feeding = False
                    return
            else:
                refused_in_a_row = 0

    def _handle(self, req: _Request, outcome: Admitted | Queued | Rejected) -> None:
        if isinstance(outcome, Admitted):
            self._start(req, outcome.pipeline)
        elif isinstance(outcome, Rejected):
            reason = outcome.reason.value
            if req.generated > 0 or req.epoch > 0:
                reason = RejectReason.NODE_LEFT.value
            self._reject(req, reason, outcome.detail)

    def _reject(self, req: _Request, reason: str, detail: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if len(self.rejections) < 1000:
            self.rejections.append((req.id, reason, detail))

    def _start(self, req: _Request, pipeline: Pipeline) -> None:
        """Reserve KV on every hop and send the prompt (or, after losing a route, the whole
        context so far) from the source."""
        if req.epoch == 0 and req.generated == 0:
            self.admitted += 1
        req.hops = pipeline.hops
        req.kv_tokens = pipeline.kv_tokens
        for hop in pipeline.hops:
            self._kv_change(self.nodes[hop.peer], pipeline.kv_tokens)
        self.requests_in_flight[req.id] = req
        context = req.prompt_tokens + req.generated
        if self._expected_kv:
            self._kv_grow(req, context)
        work = _Work(req, context, True, context)
        req.step_start_s = self.now
        req.in_prompt = True
        self._in_prompt += 1
        self._send(SOURCE, pipeline.hops[0].peer, [work])

    def _kv_change(self, node: _Node, delta: int) -> None:
        window_start, window_end = self.warmup_s, self.end_s
        lo, hi = max(node.kv_last_s, window_start), min(self.now, window_end)
        if hi > lo:
            node.kv_area += node.kv_reserved * (hi - lo)
        node.kv_last_s = self.now
        node.kv_reserved += delta
        if node.kv_reserved > node.kv_budget_tokens or node.kv_reserved < 0:
            raise SimInvariantError(
                f"node {node.id}: {node.kv_reserved} KV tokens reserved, budget {node.kv_budget_tokens}"
            )
        node.kv_peak = max(node.kv_peak, node.kv_reserved)

    def _kv_grow(self, req: _Request, tokens: int) -> None:
        """ "expected" admission: the request now caches `tokens` more on every hop."""
        req.kv_actual += tokens
        for hop in req.hops:
            node = self.nodes[hop.peer]
            node.kv_actual += tokens
            if node.kv_actual > node.kv_actual_peak:
                node.kv_actual_peak = node.kv_actual
                if node.limits is not None and node.kv_actual > node.limits.kv_tokens:
                    self._kv_overflows[node.id] = self._kv_overflows.get(node.id, 0) + 1

    def _release(self, req: _Request) -> None:
        for hop in req.hops:
            node = self.nodes[hop.peer]
            if node.alive:
                node.kv_actual -= req.kv_actual
                self._kv_change(node, -req.kv_tokens)
        if req.in_prompt:
            req.in_prompt = False
            self._in_prompt -= 1
        req.hops = ()
        req.kv_actual = 0
        del self.requests_in_flight[req.id]

    # ------------------------------------------------------------------ data path

    def _link(self, src: str, dst: str) -> _Link:
        link = self._links.get((src, dst))
        if link is None:
            if src == SOURCE:
                c = self.cluster.coordinator_by_node[NodeId(dst)]
                link = _Link(src, dst, c.out_bytes_per_s, c.latency_s)
            elif dst == SINK:
                c = self.cluster.coordinator_by_node[NodeId(src)]
                link = _Link(src, dst, c.in_bytes_per_s, c.latency_s)
            else:
                spec = self.cluster.link_by_pair[(NodeId(src), NodeId(dst))]
                link = _Link(src, dst, spec.bytes_per_s, spec.latency_s)
            self._links[(src, dst)] = link
        return link

    def _send(self, src: str, dst: str, works: list[_Work]) -> None:
        tokens = 0
        for w in works:
            tokens += w.tokens
        model = self.cluster.model
        if dst == SINK:
            nbytes = len(works) * model.token_bytes
        elif src == SOURCE:
            nbytes = tokens * model.token_bytes
        else:
            nbytes = tokens * model.activation_bytes
        if self.warmup_s <= self.now <= self.end_s:
            key = (src, dst)
            self._carried[key] = self._carried.get(key, 0) + tokens
        if self._observe:
            for w in works:
                w.sent_s = self.now
        link = self._link(src, dst)
        link.queue.append((works, nbytes))
        if not link.busy:
            self._start_send(link)

    def _start_send(self, link: _Link) -> None:
        works, nbytes = link.queue.popleft()
        done = self.now + nbytes / link.bytes_per_s
        link.busy = True
        self._push(done, _LINK_FREE, link)
        self._push(done + link.latency_s, _DELIVER, (link.dst, works))

    def _deliver(self, dst: str, works: list[_Work]) -> None:
        if dst == SINK:
            self._at_sink(works)
            return
        node = self.nodes[NodeId(dst)]
        for w in works:
            if w.epoch != w.req.epoch:
                continue  # the request lost this route meanwhile
            w.hop += 1
            (node.prompt_q if w.prompt else node.decode_q).append(w)
            node.queued_tokens += w.tokens
        if not node.busy:
            self._start_batch(node)

    def _start_batch(self, node: _Node) -> None:
        limits = node.limits
        if limits is None or not node.alive:
            return
        batch: list[_Work] = []
        # A prompt longer than the token limit still runs, alone, rather than blocking the queue.
        prompt_tokens = self._take(
            node,
            node.prompt_q,
            batch,
            limits.prompt_max_requests,
            limits.prompt_max_tokens,
            lambda w: w.tokens,
        )
        before = len(batch)
        self._take(
            node,
            node.decode_q,
            batch,
            limits.decode_max_sequences,
            limits.decode_max_context_tokens,
            lambda w: w.context,
        )
        decode_seqs = len(batch) - before
        if not batch:
            return
        node.queued_tokens -= prompt_tokens + decode_seqs
        seconds = self._batch_seconds(node, batch, prompt_tokens, decode_seqs)
        lo, hi = max(self.now, self.warmup_s), min(self.now + seconds, self.end_s)
        if hi > lo:
            node.busy_s += hi - lo
        node.busy = True
        node.batch_token += 1
        self._push(self.now + seconds, _BATCH_DONE, (node, batch, node.batch_token))

    @staticmethod
    def _take(node: _Node, queue, batch: list[_Work], max_items: int, max_size: int, size) -> int:
        """Move work from the front of `queue` into `batch` while under both limits (the first item
        always fits), dropping stale work of re-routed requests; returns the size taken."""
        taken = total = 0
        while queue and taken < max_items:
            w = queue[0]
            if w.epoch != w.req.epoch:
                queue.popleft()
                node.queued_tokens -= w.tokens
                continue
            if taken and total + size(w) > max_size:
                break
            queue.popleft()
            batch.append(w)
            taken += 1
            total += size(w)
        return total

    def _batch_seconds(self, node: _Node, batch: list[_Work], prompt_tokens: int, decode_seqs: int) -> float:
        profile = node.profile
        if not self.plan.partial_inference:
            # Every request runs all the node's layers (only nodes holding layers start batches).
            start, end = node.layers or (0, 0)
            per_layer = profile.prompt_layer_s(prompt_tokens) + profile.decode_layer_s(decode_seqs)
            return (end - start) * per_layer
        # With partial inference a hop may run only the node's last layers: sum layer by layer
        # over the requests that need each one.
        delta: dict[int, list[int]] = {}
        for w in batch:
            hop = w.req.hops[w.hop]
            for at, sign in ((hop.start, 1), (hop.end, -1)):
                d = delta.setdefault(at, [0, 0])
                d[0] += sign * (w.tokens if w.prompt else 0)
                d[1] += sign * (0 if w.prompt else 1)
        seconds, p, d, last = 0.0, 0, 0, None
        for at in sorted(delta):
            if last is not None and (p or d):
                seconds += (at - last) * (profile.prompt_layer_s(p) + profile.decode_layer_s(d))
            p += delta[at][0]
            d += delta[at][1]
            last = at
        return seconds

    def _batch_done(self, node: _Node, batch: list[_Work], token: int) -> None:
        if token != node.batch_token:
            return
        node.busy = False
        groups: dict[str, list[_Work]] = {}
        observe = self._observe
        for w in batch:
            req = w.req
            if w.epoch != req.epoch:
                continue
            if observe:
                prev = req.hops[w.hop - 1].peer if w.hop > 0 else SOURCE
                self.router.observe_hop(prev, node.id, self.now - w.sent_s)
            nxt = w.hop + 1
            dst = req.hops[nxt].peer if nxt < len(req.hops) else SINK
            group = groups.get(dst)
            if group is None:
                groups[dst] = [w]
            else:
                group.append(w)
        for dst, works in groups.items():
            self._send(node.id, dst, works)
        if node.prompt_q or node.decode_q:
            self._start_batch(node)

    def _at_sink(self, works: list[_Work]) -> None:
        """A step's token reached the client: record it, and start the next step or finish."""
        restart: dict[str, list[_Work]] = {}
        in_window = self.warmup_s <= self.now <= self.end_s
        freed = False
        for w in works:
            req = w.req
            if w.epoch != req.epoch:
                continue
            if w.prompt:
                if req.generated == 0 and in_window:
                    self._prompt_latencies.append(self.now - req.arrival_s)
                req.in_prompt = False
                self._in_prompt -= 1
                freed = True
                if req.generated > 0:
                    self._count_decode_token(in_window)  # a replay yields the next token too
            else:
                self._count_decode_token(in_window)
                if in_window:
                    self._decode_latencies.append(self.now - req.step_start_s)
            req.generated += 1
            if self._expected_kv:
                self._kv_grow(req, 1)
            if req.generated >= req.output_tokens:
                self._release(req)
                self.completed += 1
                freed = True
                continue
            w.hop = -1
            w.tokens = 1
            w.prompt = False
            w.context = req.prompt_tokens + req.generated
            req.step_start_s = self.now
            first = req.hops[0].peer
            if first in restart:
                restart[first].append(w)
            else:
                restart[first] = [w]
        for dst, group in restart.items():
            self._send(SOURCE, dst, group)
        if freed:
            self._feed()

    def _count_decode_token(self, in_window: bool) -> None:
        self._decode_tokens_tick += 1
        if in_window:
            self._decode_tokens_window += 1

    # ------------------------------------------------------------------ churn

    def _churn(self, churn: ChurnSchedule, event: ChurnEvent) -> None:
        for node_id in event.leave:
            node = self.nodes[node_id]
            if not node.alive:
                continue
            node.alive = False
            node.ready = False
            node.busy = False
            node.batch_token += 1
            node.load_token += 1
            del self.live[node_id]
            node.prompt_q.clear()
            node.decode_q.clear()
            node.queued_tokens = 0
            self._kv_change(node, -node.kv_reserved)
            node.kv_actual = 0
            self._set_layers(node, None)
            node.pending_layers = None
        for node_id in event.join:
            node = self.nodes[node_id]
            if node.alive:
                continue
            node.alive = True
            node.ready = True
            node.busy = False
            self._set_layers(node, None)
            self.live[node_id] = node
        lost = [
            req
            for req in self.requests_in_flight.values()
            if any(not self.nodes[h.peer].alive for h in req.hops)
        ]
        for req in lost:
            self._interrupt(req)
        what = ", ".join([f"{n} left" for n in event.leave] + [f"{n} joined" for n in event.join])
        self._replan(churn, what)
        self._reroute(lost)
        self._feeding = self.config.mode == "offline"
        self._feed()

    def _interrupt(self, req: _Request) -> None:
        self._release(req)
        req.epoch += 1

    def _reroute(self, lost: list[_Request]) -> None:
        # Ahead of the queue, oldest first: pushing to the front in reverse keeps arrival order.
        for req in reversed(lost):
            self.rerouted += 1
            self._handle(req, self.queue.offer(req, req.route_request, self.live, front=True))

    def _replan(self, churn: ChurnSchedule, reason: str) -> None:
        method = churn.replan_method or self.plan.method
        present = [n for n in self.cluster.nodes if self.nodes[n.id].alive]
        ids = {n.id for n in present}
        sub = replace(
            self.cluster,
            nodes=tuple(present),
            links=tuple(link for link in self.cluster.links if link.src in ids and link.dst in ids),
            coordinator=tuple(c for c in self.cluster.coordinator if c.node in ids),
        )
        options = planner.PlanOptions(
            method=method,
            time_limit_s=churn.replan_time_limit_s,
            partial_inference=self.plan.partial_inference,
            seed=self.config.seed,
        )
        try:
            new_plan = planner.plan(sub, options, previous=self.plan)
        except PlanError as e:
            new_plan = Plan(
                self.cluster.name,
                method,
                {},
                (),
                0.0,
                None,
                0.0,
                self.plan.partial_inference,
                details={"error": str(e)},
            )
        self._install_plan(new_plan, reason=reason)

    def _node_ready(self, node: _Node, token: int) -> None:
        if token != node.load_token or not node.alive or node.pending_layers is None:
            return
        new = node.pending_layers
        # Requests still on the old layers lose this hop now (the old weights are dropped).
        lost = [
            req
            for req in self.requests_in_flight.values()
            if any(h.peer == node.id and h.layers != new for h in req.hops)
        ]
        for req in lost:
            self._interrupt(req)
        node.prompt_q.clear()
        node.decode_q.clear()
        node.queued_tokens = 0
        self._set_layers(node, new)
        node.pending_layers = None
        node.ready = True
        self._reroute(lost)
        self._feeding = self.config.mode == "offline"
        self._feed()

    # ------------------------------------------------------------------ results

    def _result(self) -> SimResult:
        measured_s = self.end_s - self.warmup_s
        nodes = []
        for node in self.nodes.values():
            if node.alive:
                self._kv_change(node, 0)  # close the time-average at the end
            nodes.append(
                NodeReport(
                    id=node.id,
                    gpu=node.gpu,
                    layers=self.plan.placement.get(node.id) if node.alive else None,
                    kv_budget_tokens=node.kv_budget_tokens,
                    kv_peak_tokens=node.kv_peak,
                    kv_mean_tokens=node.kv_area / measured_s,
                    busy_fraction=node.busy_s / measured_s,
                )
            )
        planned = {(f.src, f.dst): f.tokens_per_s for f in self.plan.flows}
        edges = [
            EdgeReport(src, dst, value, self._carried.get((src, dst), 0) / measured_s)
            for (src, dst), value in planned.items()
        ]
        edges += [
            EdgeReport(src, dst, 0.0, count / measured_s)
            for (src, dst), count in self._carried.items()
            if (src, dst) not in planned
        ]
        carried = sum(count for (src, _), count in self._carried.items() if src == SOURCE) / measured_s
        initial = self._plan_changes[0].max_flow_tokens_per_s if self._plan_changes else 0.0
        return SimResult(
            cluster=self.cluster.name,
            plan_method=self._plan_changes[0].method if self._plan_changes else self.plan.method,
            scheduler=self.config.scheduler,
            mode=self.config.mode,
            seed=self.config.seed,
            duration_s=self.config.duration_s,
            warmup_s=self.warmup_s,
            end_s=self.now,
            decode_tokens_per_s=self._decode_tokens_window / measured_s,
            carried_tokens_per_s=carried,
            max_flow_tokens_per_s=initial,
            prompt_latency_s=LatencyStats.of(self._prompt_latencies),
            decode_latency_s=LatencyStats.of(self._decode_latencies),
            arrived=self.arrived,
            admitted=self.admitted,
            completed=self.completed,
            rejected=dict(sorted(self.rejected.items())),
            in_flight_at_end=len(self.requests_in_flight),
            waiting_at_end=len(self.queue),
            rerouted=self.rerouted,
            nodes=tuple(nodes),
            edges=tuple(edges),
            timeline=tuple(self._timeline),
            plan_changes=tuple(self._plan_changes),
            events_processed=self._events,
            extra=self._kv_extra(),
        )

    def _kv_extra(self) -> dict[str, object]:
        if not self._expected_kv:
            return {}
        peaks = {
            node.id: node.kv_actual_peak / node.limits.kv_tokens
            for node in self.nodes.values()
            if node.limits is not None and node.limits.kv_tokens > 0
        }
        return {
            "kv_admission": "expected",
            "expected_output_tokens": self._expected_output,
            #: the fullest any cache got, as a fraction of its whole budget (> 1: it overflowed)
            "kv_actual_peak_fraction": max(peaks.values(), default=0.0),
            "kv_overflows": dict(sorted(self._kv_overflows.items())),
        }


def simulate(
    cluster: Cluster,
    plan: Plan,
    config: SimConfig | None = None,
    profiles: Mapping[NodeId, GpuProfile] | None = None,
) -> SimResult:
    """Run one simulation; see the module docstring for the model."""
    return Simulator(cluster, plan, config or SimConfig(), profiles).run()
