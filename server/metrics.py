"""Prometheus metrics and operator log lines, all kept in the API process.

The engine reports each step's `StepStats` and per-request timestamps over the wire, so one
registry here covers both processes without prometheus-client's multiprocess mode. Token
counters are fed from the same numbers as each response's `usage`, so they add up exactly.
"""
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info,
                               ProcessCollector, disable_created_metrics, generate_latest)

from engine.messages import EngineReady, EngineStep, RequestOutput, StepStats

logger = logging.getLogger("tessera.server")

# No `<name>_created` sample beside every counter and histogram (as vLLM): they double the
# exposition and dashboards never read them. Global in prometheus-client, so it is set here,
# before any metric exists.
disable_created_metrics()

# Buckets wide enough for a 135M model on a laptop CPU and an 8B model on a GPU.
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                          0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
                            20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0)


def _tokens_buckets(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


class Metrics:
    def __init__(self, model_name: str, max_model_len: int = 1 << 17) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        reg, labels = self.registry, ["model_name"]

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=reg).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=reg).labels(model_name)

        tokens = _tokens_buckets(max_model_len)
        self.ttft = histogram("tessera:time_to_first_token_seconds",
                              "Arrival to first output token.", _TTFT_BUCKETS)
        self.itl = histogram("tessera:inter_token_latency_seconds",
                             "Time between consecutive outputs of a request.",
                             _TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("tessera:time_per_output_token_seconds",
                              "Mean time per output token after the first.",
                              _TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("tessera:e2e_request_latency_seconds",
                             "Arrival to last output.", _REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("tessera:request_queue_time_seconds",
                               "Arrival to first scheduled.", _REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("tessera:request_prefill_time_seconds",
                                 "First scheduled to first token.", _REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("tessera:request_decode_time_seconds",
                                "First token to last output.", _REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens_hist = histogram("tessera:request_prompt_tokens",
                                            "Prompt tokens per request.", tokens)
        self.generation_tokens_hist = histogram("tessera:request_generation_tokens",
                                                "Generated tokens per request.", tokens)
        self.iteration_tokens = histogram("tessera:iteration_tokens_total",
                                          "Tokens scheduled in one engine step.", tokens)
        self.running = gauge("tessera:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("tessera:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("tessera:kv_cache_usage_perc",
                              "Fraction of KV pages held by live requests (0..1).")
        self.kv_pages_total = gauge("tessera:kv_cache_pages_total", "KV pages allocated.")
        self.prompt_tokens = counter("tessera:prompt_tokens_total", "Prompt tokens of requests.")
        self.generation_tokens = counter("tessera:generation_tokens_total",
                                         "Generated tokens of requests.")
        self.success = Counter("tessera:request_success_total", "Finished requests.",
                               ["model_name", "finished_reason"], registry=reg)
        self.preemptions = counter("tessera:num_preemptions_total", "Preempted requests.")
        self.prefix_queries = counter("tessera:prefix_cache_queries_total",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("tessera:prefix_cache_hits_total",
                                   "Prompt tokens found in the prefix cache.")
        self.rejected = Counter("tessera:requests_rejected_total",
                                "Calls refused before reaching the engine, by reason "
                                "(waiting_requests, queued_prompt_tokens, too_many_choices, "
                                "draining).", ["model_name", "reason"], registry=reg)
        self.engine_restarts = counter("tessera:engine_restarts_total",
                                       "Engine-core processes started to replace one that died.")
        self.engine_pages_used = Gauge(
            "tessera:engine_kv_cache_pages_used", "KV pages held by live requests (and, on a "
            "prefill engine, by handed-off requests under lease), by engine.",
            ["model_name", "engine"], registry=reg)
        self.engine_requests = Counter(
            "tessera:engine_requests_total", "Requests the router sent to each engine first "
            "(a replica, or a prefill engine).", ["model_name", "engine"], registry=reg)
        self.kv_transfer_bytes = counter("tessera:kv_transfer_bytes_total",
                                         "Bytes of KV pages loaded from prefill engines.")
        self.kv_transfer_time = histogram("tessera:kv_transfer_seconds",
                                          "From a prefill engine's send to the decode engine "
                                          "having loaded the pages.", _TOKEN_LATENCY_BUCKETS)
        self.kv_transfers_in_flight = gauge("tessera:kv_transfers_in_flight",
                                            "Handed-off requests whose pages the decode "
                                            "engine has not confirmed yet.")
        self.kv_lease_expiries = counter("tessera:kv_lease_expiries_total",
                                         "Handed-off requests whose pages a prefill engine "
                                         "freed when the lease ran out.")
        self.kv_recomputes = counter("tessera:kv_transfer_recomputes_total",
                                     "Requests recomputed after a failed handoff.")
        self.kv_failures = Counter("tessera:kv_transfer_failures_total",
                                   "Handoffs that failed, by cause (prefill_died, decode_died, "
                                   "timeout, load_failed: the decode engine had no free pages "
                                   "or could not read them).", ["model_name", "cause"],
                                   registry=reg)
        self.info = Info("tessera:engine", "Engine build.", labels, registry=reg)
        self.kernels = Info("tessera:linear_kernels", "The CPU kernel each quantized layer "
                            "shape runs, by step size (tokens), as measured on this machine.",
                            ["model_name", "layer"], registry=reg)
        self.model_name = model_name
        self.window = StepWindow()
        self._engine_stats: dict[str, StepStats] = {}  # each engine's latest

    def on_ready(self, ready: EngineReady) -> None:
        self.info.labels(self.model_name).info({
            "model": ready.model_name, "dtype": ready.dtype, "device": ready.device,
            "page_size": str(ready.page_size), "kv_cache_dtype": ready.kv_cache_dtype,
            "quantization": ready.quantization})
        for layer, plan in ready.kernels.items():
            self.kernels.labels(self.model_name, layer).info({"plan": plan})
        self.kv_pages_total.set(ready.num_kv_pages)

    def on_kv_failure(self, cause: str, recomputed: bool) -> None:
        self.kv_failures.labels(self.model_name, cause).inc()
        if recomputed:
            self.kv_recomputes.inc()

    def on_routed(self, engine: str) -> None:
        self.engine_requests.labels(self.model_name, engine).inc()

    def on_reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def on_step(self, step: EngineStep, engine: str = "engine") -> None:
        """Gauges sum the engines' latest figures; counters add this step's."""
        stats = step.stats
        self._engine_stats[engine] = stats
        every = self._engine_stats.values()
        self.running.set(sum(s.num_running for s in every))
        self.waiting.set(sum(s.num_waiting for s in every))
        self.kv_pages_total.set(sum(s.num_kv_pages_total for s in every))
        self.kv_usage.set(sum(s.num_kv_pages_used for s in every)
                          / max(sum(s.num_kv_pages_total for s in every), 1))
        self.engine_pages_used.labels(self.model_name, engine).set(stats.num_kv_pages_used)
        for arrival in step.kv_arrivals:
            if arrival.outcome == "loaded":
                self.kv_transfer_bytes.inc(arrival.num_bytes)
                self.kv_transfer_time.observe(arrival.seconds)
        self.kv_lease_expiries.inc(step.num_lease_expiries)
        self.preemptions.inc(stats.num_preemptions)
        self.prefix_queries.inc(stats.prefix_cache_queries)
        self.prefix_hits.inc(stats.prefix_cache_hits)
        if stats.num_scheduled_tokens:
            self.iteration_tokens.observe(stats.num_scheduled_tokens)
        self.window.add(step)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class StepWindow:
    """Engine activity since the last periodic log line."""
    start: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    last: EngineStep | None = None

    def add(self, step: EngineStep) -> None:
        self.prompt_tokens += step.stats.num_prompt_tokens
        self.generation_tokens += step.stats.num_generation_tokens
        self.last = step

    def log_and_reset(self) -> None:
        """One line while the engine is busy (or just finished being busy), none when idle."""
        now, stats = time.monotonic(), self.last.stats if self.last else None
        if stats and (self.prompt_tokens or self.generation_tokens or stats.num_running
                      or stats.num_waiting):
            span = max(now - self.start, 1e-9)
            logger.info("engine: prompt %.1f tok/s, generation %.1f tok/s, running %d, "
                        "waiting %d, KV usage %.1f%%", self.prompt_tokens / span,
                        self.generation_tokens / span, stats.num_running, stats.num_waiting,
                        100 * stats.num_kv_pages_used / max(stats.num_kv_pages_total, 1))
        self.start, self.prompt_tokens, self.generation_tokens = now, 0, 0


class RequestTracker:
    """Timestamps of one request as its outputs arrive; observed once when it ends."""

    def __init__(self, metrics: Metrics, request_id: str, arrival_time: float,
                 prompt_text: str | None = None) -> None:
        self.metrics, self.request_id, self.arrival = metrics, request_id, arrival_time
        self.prompt_text = prompt_text
        self.num_prompt_tokens = 0
        self.scheduled: float | None = None
        self.first_token: float | None = None
        self.last_output: float | None = None

    def on_output(self, output: RequestOutput) -> None:
        now = time.time()
        if output.num_prompt_tokens:
            self.num_prompt_tokens = output.num_prompt_tokens
        self.scheduled = self.scheduled or output.scheduled_time
        if output.new_token_ids:
            if self.first_token is None:
                self.first_token = output.first_token_time or now
                self.metrics.ttft.observe(self.first_token - self.arrival)
            elif self.last_output is not None:
                self.metrics.itl.observe(now - self.last_output)
            self.last_output = now

    def finish(self, finish_reason: str, num_output_tokens: int) -> None:
        """`num_output_tokens` is the response's usage figure (a stop string may cut it)."""
        m, now = self.metrics, time.time()
        m.success.labels(m.model_name, finish_reason).inc()
        m.prompt_tokens.inc(self.num_prompt_tokens)
        m.generation_tokens.inc(num_output_tokens)
        m.prompt_tokens_hist.observe(self.num_prompt_tokens)
        m.generation_tokens_hist.observe(num_output_tokens)
        m.e2e.observe(now - self.arrival)
        if self.scheduled is not None:
            m.queue.observe(self.scheduled - self.arrival)
        if self.first_token is not None:
            if self.scheduled is not None:
                m.prefill.observe(self.first_token - self.scheduled)
            m.decode.observe(now - self.first_token)
            if num_output_tokens > 1:
                m.tpot.observe((now - self.first_token) / (num_output_tokens - 1))
        ms = lambda t: f"{1000 * t:.1f}ms" if t is not None else "-"  # noqa: E731
        logger.info(
            "request %s: prompt_tokens=%d output_tokens=%d queue=%s ttft=%s e2e=%s finish=%s%s",
            self.request_id, self.num_prompt_tokens, num_output_tokens,
            ms(self.scheduled - self.arrival if self.scheduled else None),
            ms(self.first_token - self.arrival if self.first_token else None),
            ms(now - self.arrival), finish_reason,
            f" prompt={self.prompt_text!r}" if self.prompt_text is not None else "")
