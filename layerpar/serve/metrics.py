"""Prometheus metrics of one server, in its own registry (several servers can live in one process).

Served as text on http://127.0.0.1:<serve.metrics_port>/metrics:

    layerpar_requests_total{method, status}     calls by gRPC status code name (Open Inference Protocol:
                                                ModelInfer, ...; over REST http:ModelInfer, ...)
    layerpar_rows_total                         input rows answered
    layerpar_batch_rows                         histogram: rows per engine call (the batch size)
    layerpar_batch_requests                     histogram: requests merged into one engine call
    layerpar_queue_depth                        requests waiting for the engine now
    layerpar_phase_seconds{phase}               histogram: queue, broadcast, compute, reduce, backend, total
    layerpar_workers / layerpar_workers_alive   branch workers expected / answering (0/0: one process)
    layerpar_serving                            1 while health says SERVING
    layerpar_degraded_responses_total           answers computed from the surviving branches only
    layerpar_backend_errors_total               failed engine calls (each retried up to serve.retries)
    layerpar_replica_batches_total{replica}     engine calls each replica group answered
    layerpar_replica_ready{replica}             1 while the group is whole (in rotation)
    layerpar_branches_used                      histogram: branches that answered each request
    layerpar_slo_prefix_responses_total         answers from a prefix chosen to meet serve.latency_slo_ms
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def batch_buckets(max_batch: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to max_batch: a histogram that shows whether merging happens at all."""
    out, b = [], 1
    while b < max_batch:
        out.append(float(b))
        b *= 2
    return (*out, float(max_batch))


class ServerMetrics:
    def __init__(self, *, max_batch: int, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("layerpar_requests", "gRPC calls by method and status code",
                                ["method", "status"], registry=r)
        self.rows = Counter("layerpar_rows", "Input rows answered", registry=r)
        buckets = batch_buckets(max_batch)
        self.batch_rows = Histogram("layerpar_batch_rows", "Rows per engine call", buckets=buckets,
                                    registry=r)
        self.batch_requests = Histogram("layerpar_batch_requests", "Requests merged into one engine call",
                                        buckets=buckets, registry=r)
        self.queue_depth = Gauge("layerpar_queue_depth", "Requests waiting for the engine", registry=r)
        self.phase = Histogram("layerpar_phase_seconds", "Server-side latency per phase", ["phase"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.workers = Gauge("layerpar_workers", "Branch workers the engine expects", registry=r)
        self.workers_alive = Gauge("layerpar_workers_alive", "Branch workers answering", registry=r)
        self.placement_fallbacks = Gauge(
            "layerpar_placement_fallbacks", "Times a replica group left its pinned node (gone or full) "
            "and was placed on any node with room", registry=r)
        self.serving = Gauge("layerpar_serving", "1 while the health service says SERVING", registry=r)
        self.degraded = Counter("layerpar_degraded_responses", "Answers from the surviving branches only",
                                registry=r)
        self.backend_errors = Counter("layerpar_backend_errors", "Failed engine calls", registry=r)
        self.expired = Counter("layerpar_expired_requests", "Requests dropped unseen in the queue because "
                               "their deadline passed (each also answered DEADLINE_EXCEEDED)", registry=r)
        self.replica_batches = Counter("layerpar_replica_batches", "Engine calls answered per replica group",
                                       ["replica"], registry=r)
        self.replica_ready = Gauge("layerpar_replica_ready", "1 while the replica group is whole",
                                   ["replica"], registry=r)
        self.branches_used = Histogram("layerpar_branches_used", "Branches that answered each request",
                                       buckets=tuple(float(b) for b in range(1, 65)), registry=r)
        self.slo_prefix = Counter("layerpar_slo_prefix_responses", "Answers from a prefix of the branches "
                                  "chosen to meet serve.latency_slo_ms", registry=r)
        self._http = None
        self._request_children: dict[tuple[str, str], object] = {}

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)  # read at scrape time

    def request(self, method: str, status: str) -> None:
        child = self._request_children.get((method, status))
        if child is None:  # labels() takes a lock and builds a key: once per (method, status), not per call
            child = self._request_children[(method, status)] = self.requests.labels(method=method,
                                                                                   status=status)
        child.inc()

    def batch(self, rows: int, requests: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def phases(self, seconds: dict[str, float]) -> None:
        for name, s in seconds.items():
            self.phase.labels(phase=name).observe(s)

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
