"""Every Prometheus object of the service, in one place, on its own registry.

Prefix `gpt2_serve_`, snake_case, base units in names, `_total` counters, help text on all. Engine
metrics carry the model name and version as labels, so a hot reload shows in every series. The three
gauges inference gateways route on: `gpt2_serve_num_requests_running`, `..._num_requests_waiting`,
`..._kv_cache_usage_ratio`. Observers take plain engine data (`RequestStats`, `StepStats`); nothing
here knows HTTP or tensors.
"""

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from service.engine import FinishReason, RequestStats, StepStats

PREFIX = "gpt2_serve_"
CONTENT_TYPE = CONTENT_TYPE_LATEST
MODEL = ("model", "version")

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_E2E = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)

disable_created_metrics()  # the `_created` series only double the scrape size

REJECTION_REASONS = ("overload", "validation", "auth", "draining", "not_ready", "body_too_large")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.requests = Counter(
            p + "requests", "HTTP requests by endpoint and status code", ("endpoint", "status"), registry=r
        )
        self.rejections = Counter(p + "rejections", "Requests refused, by reason", ("reason",), registry=r)
        self.aborts = Counter(p + "aborts", "Requests aborted (client gone, drain timeout)", MODEL, registry=r)
        self.finished = Counter(
            p + "request_success", "Sequences finished, by finish reason", (*MODEL, "finish_reason"), registry=r
        )
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished sequences", MODEL, registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens", MODEL, registry=r)
        self.scored_tokens = Counter(p + "scored_tokens", "Tokens scored (prompt logprobs returned)", MODEL, registry=r)
        self.prefix_queries = Counter(
            p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache", MODEL, registry=r
        )
        self.prefix_hits = Counter(
            p + "prefix_cache_hits", "Prompt tokens served from the prefix cache", MODEL, registry=r
        )
        self.preemptions = Counter(p + "num_preemptions", "Sequences preempted for KV memory", MODEL, registry=r)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Arrival to first generated token", MODEL, buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds", "Time between generated tokens", MODEL, buckets=_LATENCY, registry=r
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds",
            "HTTP request received to response complete",
            MODEL,
            buckets=_E2E,
            registry=r,
        )
        self.queue_time = Histogram(
            p + "request_queue_time_seconds", "Arrival to first scheduled", MODEL, buckets=_LATENCY, registry=r
        )
        self.prompt_len = Histogram(
            p + "request_prompt_tokens", "Prompt length per sequence", MODEL, buckets=_TOKENS, registry=r
        )
        self.generation_len = Histogram(
            p + "request_generation_tokens", "Generated length per sequence", MODEL, buckets=_TOKENS, registry=r
        )
        self.batch_size = Histogram(
            p + "iteration_sequences", "Sequences per engine step", MODEL, buckets=_BATCH, registry=r
        )
        self.iteration_tokens = Histogram(
            p + "iteration_tokens", "Tokens computed per engine step", MODEL, buckets=_TOKENS, registry=r
        )
        self.running = Gauge(p + "num_requests_running", "Sequences running in the engine", MODEL, registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Sequences waiting for admission", MODEL, registry=r)
        self.kv_usage = Gauge(
            p + "kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0 to 1)", MODEL, registry=r
        )
        self.model_info = Gauge(
            p + "model_info", "The model being served (value 1)", (*MODEL, "dtype", "device"), registry=r
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- observers ------------------------------------------------------------------------------------------
    def serving(self, model: tuple[str, str], dtype: str, device: str) -> None:
        """`model` (name, version) is now the one served: model_info and the gauges show only it."""
        self.model_info.clear()
        self.model_info.labels(*model, dtype, device).set(1)
        for gauge in (self.running, self.waiting, self.kv_usage):
            gauge.clear()
            gauge.labels(*model).set(0)

    def step(self, model: tuple[str, str], stats: StepStats) -> None:
        if stats.num_seqs:  # a state report without a step (after an abort) moves only the gauges
            self.batch_size.labels(*model).observe(stats.num_seqs)
            self.iteration_tokens.labels(*model).observe(stats.num_tokens)
        self.running.labels(*model).set(stats.num_running)
        self.waiting.labels(*model).set(stats.num_waiting)
        self.kv_usage.labels(*model).set(stats.kv_usage)
        if stats.num_preempted:
            self.preemptions.labels(*model).inc(stats.num_preempted)

    def sequence_finished(self, model: tuple[str, str], stats: RequestStats, reason: FinishReason, scored: int) -> None:
        self.finished.labels(*model, reason.value).inc()
        self.prompt_tokens.labels(*model).inc(stats.num_prompt_tokens)
        self.generation_tokens.labels(*model).inc(stats.num_generated_tokens)
        self.scored_tokens.labels(*model).inc(scored)
        self.prefix_queries.labels(*model).inc(stats.num_prompt_tokens)
        self.prefix_hits.labels(*model).inc(stats.num_cached_tokens)
        self.prompt_len.labels(*model).observe(stats.num_prompt_tokens)
        self.generation_len.labels(*model).observe(stats.num_generated_tokens)
        if stats.queue_time is not None:
            self.queue_time.labels(*model).observe(stats.queue_time)
        if stats.time_to_first_token is not None:
            self.ttft.labels(*model).observe(stats.time_to_first_token)
        for latency in stats.inter_token_latencies:
            self.itl.labels(*model).observe(latency)
