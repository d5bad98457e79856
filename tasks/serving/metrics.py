"""Prometheus metrics of a server (`GET /metrics`): requests, latency, time to first token, tokens and
requests in flight, each per served model (base, adapter or A/B version).

Each app has its own registry (not prometheus_client's global one), so two servers in one process (tests,
a front and an engine) never mix their numbers. Names follow Prometheus' conventions (`_total` counters,
`_seconds` histograms); the `model` label takes only names the server serves, so a client cannot grow the
label set by asking for made-up models.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a 10 ms cache hit to a long CPU generation.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
UNKNOWN_MODEL = "unknown"  # requests refused before their model was known to be served


def tunepipe_version() -> str:
    try:
        return version("tunepipe")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "unknown"


class ServingMetrics:
    """The counters one server keeps; `render()` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: str):
        self.registry = CollectorRegistry()
        labels = ("endpoint", "model")
        self.requests = Counter("tunepipe_requests", "Generation requests ended, by endpoint, model and status "
                                "(ok, cancelled, error <http status>)", (*labels, "status"), registry=self.registry)
        self.latency = Histogram("tunepipe_request_latency_seconds", "Seconds from admission to the request's end",
                                 labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("tunepipe_time_to_first_token_seconds", "Seconds from admission to the first "
                                     "generated text", labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("tunepipe_prompt_tokens", "Prompt tokens of finished requests", ("model",),
                                     registry=self.registry)
        self.completion_tokens = Counter("tunepipe_completion_tokens", "Generated tokens of finished requests",
                                         ("model",), registry=self.registry)
        self.in_flight = Gauge("tunepipe_requests_in_flight", "Generation requests admitted and not yet ended",
                               ("model",), registry=self.registry)
        info = Gauge("tunepipe_build_info", "The server's version and engine (value 1)", ("version", "engine"),
                     registry=self.registry)
        info.labels(version=tunepipe_version(), engine=engine).set(1)

    def finished(self, endpoint: str, model: str, status: str, seconds: float, *, prompt_tokens: int = 0,
                 completion_tokens: int = 0, admitted: bool = True) -> None:
        """One request ended (answered, failed or abandoned); `admitted` ones leave the in-flight gauge."""
        self.requests.labels(endpoint=endpoint, model=model, status=status).inc()
        self.latency.labels(endpoint=endpoint, model=model).observe(seconds)
        if admitted:
            self.in_flight.labels(model=model).dec()
        if status == "ok":
            self.prompt_tokens.labels(model=model).inc(prompt_tokens)
            self.completion_tokens.labels(model=model).inc(completion_tokens)

    def refused(self, endpoint: str, model: str, status: int) -> None:
        """A request answered with an error before admission (no latency, no tokens)."""
        self.requests.labels(endpoint=endpoint, model=model, status=f"error {status}").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
