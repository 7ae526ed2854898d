"""Prometheus metrics: one registry per app, a middleware counting requests, a stream observer.

Label values are route templates (``/v1/cases/{case_id}``), HTTP methods, status codes and
model names -- never a raw path, a body or a header: a case id in a path can identify a patient.
Engine figures (KV-cache usage, queue depth, worker restarts) and the case-index size are read
at scrape time, so a scrape shows the state now rather than the state at the last request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from medserve.accel.base import Backend, BackendError, GenerationChunk
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The classic text format: every Prometheus version scrapes it (our names are all legacy)."""

# Seconds. Token latencies on a 2-core box run from ~5 ms (small model) to ~200 ms (9B int4);
# first tokens include prefill and queueing, so their buckets reach further.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
_HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_SEARCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

UNMATCHED_ROUTE = "<unmatched>"


@dataclass
class EngineSnapshot:
    """What the scrape read from the backend and the case index just before rendering."""

    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per model: the worker's stats (``in_flight``, ``kv_cache_usage``, ``restarts``...)."""
    max_num_seqs: int = 0
    cases_indexed: int | None = None
    """Cases in the similar-case index; None when the case index is off or still loading."""


class MetricsJSON(msgspec.Struct):
    """The JSON view (/metrics.json): each model worker's own stats, as it reports them."""

    models: dict[str, dict[str, Any]]


async def engine_snapshot(
    backend: Backend | None, max_num_seqs: int, cases_indexed: int | None
) -> EngineSnapshot:
    """The engine figures now; admission counts only when a worker does not answer in time."""
    if backend is None:
        return EngineSnapshot(cases_indexed=cases_indexed)
    try:
        models = await backend.stats()
    except (BackendError, TimeoutError):
        # A worker restarting or stuck must not make the scrape fail: report what is known.
        models = {name: {"in_flight": n} for name, n in backend.in_flight().items()}
    return EngineSnapshot(models, max_num_seqs, cases_indexed)


class _SnapshotCollector(Collector):
    """Turns the latest snapshot into metric families when the registry is rendered."""

    def __init__(self) -> None:
        self.snapshot = EngineSnapshot()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        in_flight = GaugeMetricFamily(
            "medserve_requests_in_flight",
            "Generation requests admitted (running or queued) per model.",
            labels=["model"],
        )
        queued = GaugeMetricFamily(
            "medserve_queue_depth",
            "Admitted requests waiting for one of the engine's max_num_seqs slots.",
            labels=["model"],
        )
        kv_usage = GaugeMetricFamily(
            "medserve_kv_cache_usage_ratio",
            "Fraction 0-1 of the model's KV cache in use now.",
            labels=["model"],
        )
        restarts = CounterMetricFamily(
            "medserve_worker_restarts",
            "Times the model's engine worker process was restarted after it died.",
            labels=["model"],
        )
        info = GaugeMetricFamily(
            "medserve_model_info",
            "1 per served model, labelled with the engine that serves it and its precision.",
            labels=["model", "engine", "precision"],
        )
        for model, stats in sorted(snap.models.items()):
            if "engine" in stats:
                info.add_metric([model, str(stats["engine"]), str(stats.get("precision", ""))], 1)
            admitted = int(stats.get("in_flight", 0))
            in_flight.add_metric([model], admitted)
            queued.add_metric([model], max(0, admitted - snap.max_num_seqs))
            if "kv_cache_usage" in stats:
                kv_usage.add_metric([model], float(stats["kv_cache_usage"]))
            if "restarts" in stats:
                restarts.add_metric([model], int(stats["restarts"]))
        yield from (info, in_flight, queued, kv_usage, restarts)
        if snap.cases_indexed is not None:
            yield GaugeMetricFamily(
                "medserve_case_index_size", "Cases in the similar-case index.", snap.cases_indexed
            )


class Metrics:
    """Every metric of one app, in a registry of its own (tests run several apps per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.http_requests = Counter(
            "medserve_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_seconds = Histogram(
            "medserve_http_request_duration_seconds",
            "Time from request to the last byte of the response, by route template.",
            ["method", "route"],
            buckets=_HTTP_BUCKETS,
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            "medserve_time_to_first_token_seconds",
            "Time from admission to the first generated text, queueing and prefill included.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.itl_seconds = Histogram(
            "medserve_inter_token_latency_seconds",
            "Time between generated tokens after the first, per token.",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=registry,
        )
        self.e2e_seconds = Histogram(
            "medserve_generation_duration_seconds",
            "Time from admission to the last token of a generation that finished.",
            ["model"],
            buckets=_E2E_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "medserve_prompt_tokens",
            "Prompt tokens of finished generations.",
            ["model"],
            registry=registry,
        )
        self.generation_tokens = Counter(
            "medserve_generation_tokens",
            "Tokens generated (finished and cancelled generations).",
            ["model"],
            registry=registry,
        )
        self.case_search_seconds = Histogram(
            "medserve_case_search_duration_seconds",
            "Similar-case search, query embedding included.",
            buckets=_SEARCH_BUCKETS,
            registry=registry,
        )
        self._snapshot = _SnapshotCollector()
        registry.register(self._snapshot)

    def render(self, snapshot: EngineSnapshot) -> bytes:
        """The Prometheus text exposition, with the engine figures of ``snapshot``."""
        # No await between setting and rendering: concurrent scrapes cannot mix snapshots.
        self._snapshot.snapshot = snapshot
        return generate_latest(self.registry)

    async def observe_generation(
        self, model: str, chunks: AsyncIterator[GenerationChunk]
    ) -> AsyncIterator[GenerationChunk]:
        """Pass ``chunks`` through, timing first token, each later token and the whole run.

        Closing the returned iterator closes ``chunks`` (which aborts the generation), so it is
        a drop-in wrapper around ``backend.generate``.
        """
        started = previous = time.perf_counter()
        tokens = 0
        finished = False
        try:
            async for chunk in chunks:
                now = time.perf_counter()
                new_tokens = chunk.num_completion_tokens - tokens
                if new_tokens > 0:
                    if tokens == 0:
                        self.ttft_seconds.labels(model).observe(now - started)
                        new_tokens -= 1
                    if new_tokens > 0:
                        # One chunk may carry several tokens (one engine step, stop strings).
                        per_token = (now - previous) / new_tokens
                        itl = self.itl_seconds.labels(model)
                        for _ in range(new_tokens):
                            itl.observe(per_token)
                    tokens = chunk.num_completion_tokens
                    previous = now
                if chunk.finish_reason is not None:
                    finished = True
                    self.e2e_seconds.labels(model).observe(now - started)
                    self.prompt_tokens.labels(model).inc(chunk.num_prompt_tokens)
                yield chunk
        finally:
            if tokens:
                self.generation_tokens.labels(model).inc(tokens)
            if not finished:
                await _close(chunks)

    async def count_unrouted(self, exc: Exception, scope: dict[str, Any]) -> None:
        """Litestar ``after_exception`` hook: counts 404/405 answered before any route ran.

        Route middleware (MetricsMiddleware) never sees those; everything else it counts.
        """
        if scope.get("type") != "http" or scope.get("route_handler") is not None:
            return
        status = getattr(exc, "status_code", 500)
        template = scope.get("path_template")
        route = str(template) if template else UNMATCHED_ROUTE
        self.http_requests.labels(_method(scope.get("method")), route, str(status)).inc()

    def time_case_search(self) -> _Timer:
        return _Timer(self.case_search_seconds)


class _Timer:
    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self.started = 0.0

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.histogram.observe(time.perf_counter() - self.started)


async def _close(chunks: AsyncIterator[GenerationChunk]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


class MetricsMiddleware:
    """ASGI middleware: one count and one duration per HTTP request, by route template.

    Litestar runs it per route, after routing, so the route template is known; requests no
    route matched are counted by ``Metrics.count_unrouted`` as ``<unmatched>``.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_with_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            template = scope.get("path_template")
            route = str(template) if template else UNMATCHED_ROUTE
            method = _method(scope.get("method"))
            self.metrics.http_requests.labels(method, route, str(status[0])).inc()
            self.metrics.http_seconds.labels(method, route).observe(time.perf_counter() - started)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _method(method: object) -> str:
    # A client can send any token as a method; bound the label set.
    return method if isinstance(method, str) and method in _METHODS else "OTHER"
