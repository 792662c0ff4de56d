"""Prometheus metrics of ``vidlang serve`` (``GET /metrics``), one registry per server.

* ``vidlang_requests_total{route, method, status}`` -- answered requests (``route`` is the API route, or
  ``other`` for unknown paths, so that random paths cannot grow the label set);
* ``vidlang_request_seconds{route}`` -- latency histogram, from the request to the end of the answer;
* ``vidlang_queue_depth`` -- model jobs waiting or running; ``vidlang_in_flight_requests``;
* ``vidlang_rejected_total{reason}`` -- refused before any work: ``queue_full``, ``shutting_down``,
  ``too_many_connections``, ``bad_http`` (the HTTP layer's 400/431), ``header_timeout``;
* ``vidlang_timed_out_total{route}`` -- requests answered 408/504 (the deadline passed);
* ``vidlang_jobs_total{outcome}`` -- model jobs by outcome (``ok``, ``error``, ``cancelled``);
* ``vidlang_batch_size{kind}`` -- histogram of the batches the text / clip batchers ran.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The counters, gauges and histograms above, in their own :class:`CollectorRegistry`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, routes: set[str]) -> None:
        self.routes = routes
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vidlang_requests", "Answered HTTP requests", ["route", "method", "status"],
                                registry=r)
        self.latency = Histogram("vidlang_request_seconds", "Request latency (to the end of the answer)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("vidlang_queue_depth", "Model jobs waiting or running", registry=r)
        self.in_flight = Gauge("vidlang_in_flight_requests", "Requests being handled", registry=r)
        self.rejected = Counter("vidlang_rejected", "Requests refused before any work", ["reason"], registry=r)
        self.timed_out = Counter("vidlang_timed_out", "Requests whose deadline passed (408/504)", ["route"],
                                 registry=r)
        self.jobs = Counter("vidlang_jobs", "Model jobs by outcome", ["outcome"], registry=r)
        self.batch = Histogram("vidlang_batch_size", "Batch sizes run by the batchers", ["kind"],
                               buckets=BATCH_BUCKETS, registry=r)

    def watch_queue(self, depth: Any) -> None:
        """``vidlang_queue_depth`` is ``depth()`` at each scrape."""
        self.queue_depth.set_function(depth)

    def route_of(self, path: str) -> str:
        path = path.rstrip("/") or "/"
        return path if path in self.routes else "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def engine_event(self, name: str, value: Any) -> None:
        """The engine's events (see :class:`vidlang.serve.engine.Engine`)."""
        if name == "finished":
            self.jobs.labels(value).inc()
        elif name == "rejected":
            self.rejected.labels(value).inc()
        elif name.startswith("batch_"):
            self.batch.labels(name[len("batch_"):]).observe(value)


class MetricsMiddleware:
    """ASGI middleware: counts every answered request by route, method and status, and times it."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        route, status, recorded = m.route_of(scope["path"]), [500], [False]
        t0 = time.perf_counter()

        def record() -> None:  # once, just before the last byte of the answer goes out (or on failure)
            if recorded[0]:
                return
            recorded[0] = True
            m.requests.labels(route, scope["method"], str(status[0])).inc()
            m.latency.labels(route).observe(time.perf_counter() - t0)
            if status[0] in (408, 504):
                m.timed_out.labels(route).inc()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()
            await send(message)

        m.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            m.in_flight.dec()
            record()
