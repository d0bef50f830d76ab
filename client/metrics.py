"""What the OpenAI gateway counts, for its `/metrics` (Prometheus text format)."""

from __future__ import annotations

from helix_p2p.metrics import Registry

from .client import GenerationResult


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = Registry()
        self.requests = r.counter(
            "helix_gateway_requests_total", "Completion requests received, by endpoint.", ["endpoint"]
        )
        self.in_flight = r.gauge("helix_gateway_requests_in_flight", "Completion requests being served now.")
        self.tokens = r.counter(
            "helix_gateway_tokens_total", "Tokens of served requests: prompt and completion.", ["kind"]
        )
        self.first_token = r.histogram(
            "helix_gateway_time_to_first_token_seconds",
            "From a request's arrival at the client to its first token.",
        )
        self.per_token = r.histogram(
            "helix_gateway_time_per_output_token_seconds",
            "Mean time per generated token after the first, one observation per request.",
        )
        self.failovers = r.counter("helix_gateway_failovers_total", "Re-routes after a failed hop.")
        self.errors = r.counter(
            "helix_gateway_errors_total", "Requests answered with an error, by error code or type.", ["kind"]
        )

    def received(self, endpoint: str) -> None:
        self.requests.labels(endpoint=endpoint).inc()

    def served(self, result: GenerationResult) -> None:
        self.tokens.labels(kind="prompt").inc(len(result.prompt_token_ids))
        self.tokens.labels(kind="completion").inc(len(result.token_ids))
        self.first_token.observe(result.timings.first_token_s)
        if len(result.token_ids) > 1:
            decode_s = result.timings.total_s - result.timings.first_token_s
            self.per_token.observe(max(0.0, decode_s) / (len(result.token_ids) - 1))
        self.failovers.inc(result.failovers)

    def failed(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()
