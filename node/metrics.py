"""What a node counts while serving, for `/metrics` (`helix-node join --metrics-port`) and for the
counters in its record (`requests_started`, `tokens_generated`, which status pages turn into rates).
The data plane calls the hooks; the gauges read the node's own state when scraped."""

from __future__ import annotations

from collections.abc import Callable

from helix_p2p.metrics import Registry


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = r = Registry()
        self.sessions_opened = r.counter(
            "helix_node_sessions_opened_total", "Sessions opened on this node, at any hop of their route."
        )
        self.requests = r.counter(
            "helix_node_requests_started_total", "Sessions opened with this node as the first hop (requests)."
        )
        self.sessions_open = r.gauge("helix_node_sessions_open", "Sessions open on this node now.")
        self.tokens = r.counter(
            "helix_node_tokens_processed_total",
            "Tokens run through this node's layers (prefill: steps of more than one token).",
            ["phase"],
        )
        self.generated = r.counter(
            "helix_node_tokens_generated_total", "Tokens sampled on this node (it held the last layers)."
        )
        self.step_latency = r.histogram(
            "helix_node_step_seconds",
            "Time from a step's arrival to its result on this node's layers.",
            ["phase"],
        )
        self.kv_used = r.gauge("helix_node_kv_tokens_used", "KV cache positions reserved by open sessions.")
        self.kv_free = r.gauge("helix_node_kv_tokens_free", "KV cache positions a new session may reserve.")
        self.errors = r.counter(
            "helix_node_errors_total", "Requests this node refused or failed, by error code.", ["kind"]
        )

    def watch(
        self, sessions_open: Callable[[], int], kv_used: Callable[[], int], kv_free: Callable[[], int]
    ) -> None:
        """Read these gauges from the node's own state at each scrape."""
        self.sessions_open.set_function(sessions_open)
        self.kv_used.set_function(kv_used)
        self.kv_free.set_function(kv_free)

    # hooks called by the data plane

    def opened(self, first_hop: bool) -> None:
        self.sessions_opened.inc()
        if first_hop:
            self.requests.inc()

    def stepped(self, num_tokens: int, latency_s: float, sampled: bool) -> None:
        phase = "prefill" if num_tokens > 1 else "decode"
        self.tokens.labels(phase=phase).inc(num_tokens)
        self.step_latency.labels(phase=phase).observe(latency_s)
        if sampled:
            self.generated.inc()

    def failed(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    @property
    def requests_started(self) -> int:
        return int(self.requests.value)

    @property
    def tokens_generated(self) -> int:
        return int(self.generated.value)
