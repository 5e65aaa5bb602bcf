"""`GET /metrics`: Prometheus text made by prometheus-client (its own registry per server).

Engine state is read at scrape time from AsyncEngine.stats() (a snapshot the engine thread
refreshes after every step, so a scrape never waits for the model):

    labkit_kv_blocks_used / _free / _cached / _held / _total     gauges (KV blocks)
    labkit_requests_running / labkit_requests_waiting            gauges
    labkit_sessions_active                                       gauge (/v1/chat/interactive)
    labkit_generated_tokens_total, labkit_preemptions_total,
    labkit_prefix_cache_hit_blocks_total, labkit_engine_steps_total   counters

Latencies are measured where the client sees them, in the server, per request:

    labkit_time_to_first_token_seconds    request received -> first token sent
    labkit_inter_token_latency_seconds    between two tokens of one request
    labkit_e2e_request_latency_seconds    request received -> last token
    labkit_requests_total{endpoint, finish_reason}, labkit_prompt_tokens_total,
    labkit_prefix_cache_hit_tokens_total
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; CPU steps take tens of ms, GPU steps a few ms, queueing can take many seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_GAUGES = [("labkit_kv_blocks_used", "blocks_used", "KV blocks in use (running requests and held sessions)"),
           ("labkit_kv_blocks_free", "blocks_free", "KV blocks free (cached prefix blocks included)"),
           ("labkit_kv_blocks_cached", "blocks_cached", "free KV blocks still holding a cached prefix"),
           ("labkit_kv_blocks_held", "blocks_held", "KV blocks pinned by interactive sessions"),
           ("labkit_kv_blocks_total", "blocks_total", "KV blocks in the cache"),
           ("labkit_requests_running", "running", "requests being decoded"),
           ("labkit_requests_waiting", "waiting", "requests waiting for (more) prefill")]
_COUNTERS = [("labkit_generated_tokens", "generated_tokens_total", "tokens generated"),
             ("labkit_preemptions", "preemptions", "preemptions by recompute"),
             ("labkit_prefix_cache_hit_blocks", "prefix_cache_hits", "prompt blocks found cached"),
             ("labkit_engine_steps", "steps", "engine steps run")]


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict], sessions: Callable[[], int]):
        self.stats, self.sessions = stats, sessions

    def collect(self):
        st = self.stats()
        for name, key, doc in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=st.get(key, 0))
        yield GaugeMetricFamily("labkit_sessions_active", "interactive sessions kept by the server",
                                value=self.sessions())
        for name, key, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=st.get(key, 0))


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict], sessions: Callable[[], int] = lambda: 0):
        r = self.registry = CollectorRegistry()
        r.register(_EngineCollector(stats, sessions))
        self.ttft = Histogram("labkit_time_to_first_token_seconds", "request received to first "
                              "token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("labkit_inter_token_latency_seconds", "time between two tokens of "
                             "one request", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("labkit_e2e_request_latency_seconds", "request received to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("labkit_requests", "finished requests", ["endpoint", "finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("labkit_prompt_tokens", "prompt tokens received", registry=r)
        self.prefix_hit_tokens = Counter("labkit_prefix_cache_hit_tokens", "prompt tokens whose KV "
                                         "came from the prefix cache", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, endpoint: str) -> "RequestTimer":
        return RequestTimer(self, endpoint)


class RequestTimer:
    """Times one request: call `token()` per output that carries tokens, `done()` at the end."""

    def __init__(self, metrics: ServerMetrics, endpoint: str):
        self.m, self.endpoint = metrics, endpoint
        self.start = self.last = time.perf_counter()
        self.first = True

    def token(self) -> None:
        now = time.perf_counter()
        (self.m.ttft if self.first else self.m.itl).observe(now - self.last)
        self.first, self.last = False, now

    def done(self, finish_reason: str | None, prompt_tokens: int, prefix_hit_tokens: int) -> None:
        self.m.e2e.observe(time.perf_counter() - self.start)
        self.m.requests.labels(self.endpoint, finish_reason or "none").inc()
        self.m.prompt_tokens.inc(prompt_tokens)
        self.m.prefix_hit_tokens.inc(prefix_hit_tokens)
