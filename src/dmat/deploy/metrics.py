"""What `GET /metrics` reports, in the Prometheus text format (prometheus-client).

- dmat_http_requests_total{endpoint, method, status}: answered requests. `endpoint` is the route
  template (e.g. /v2/models/{model_name}/infer) or "unmatched", never the raw path, so clients
  cannot grow the label set.
- dmat_http_request_duration_seconds{endpoint}: time from the request head to the last byte of the answer.
- dmat_http_requests_in_flight: requests being handled now.
- dmat_batch_size: images per onnxruntime call (with dynamic batching, several requests' images).
- dmat_inference_duration_seconds: time of each onnxruntime call.
- dmat_model_info{name, version, sha256}: the model being served.
Plus the process collector (CPU seconds, resident memory, open file descriptors).
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """The instruments, in a registry of their own (not the process-wide default one)."""

    def __init__(self, model: Any) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            Info,
            ProcessCollector,
            disable_created_metrics,
        )

        disable_created_metrics()  # *_created series: one more timestamp per label set, of no use here
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter("dmat_http_requests", "HTTP requests answered, by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("dmat_http_request_duration_seconds", "Time to answer an HTTP request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("dmat_http_requests_in_flight", "HTTP requests being handled",
                               registry=self.registry)
        self.batch_size = Histogram("dmat_batch_size", "Images per onnxruntime call", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.inference = Histogram("dmat_inference_duration_seconds", "Time of one onnxruntime call",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        Info("dmat_model", "The model being served", registry=self.registry).info(
            {"name": model.name, "version": model.version, "sha256": model.metadata.get("sha256") or ""})

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.inference.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
