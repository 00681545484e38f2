"""The service's Prometheus metrics, in a registry of its own (two services in one process do not collide).

Latencies are histograms: Prometheus reads p50/p95/p99 from them with ``histogram_quantile``; the buckets span
a tiny CPU model's tens of milliseconds to a 128 px job's minutes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("medsyn_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.request_seconds = Histogram("medsyn_request_seconds", "HTTP request latency", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.job_seconds = Histogram("medsyn_job_seconds", "time from a job's submission to its end",
                                     ["model", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images_generated = Counter("medsyn_images_generated_total", "images generated", ["model"],
                                        registry=self.registry)
        self.images_withheld = Counter("medsyn_qa_rejections_total", "images the QA gate withheld", ["model"],
                                       registry=self.registry)
        self.batch_images = Histogram("medsyn_batch_images", "images per network batch", ["model"],
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.queue_depth = Gauge("medsyn_queue_images", "images waiting to be generated", ["model"],
                                 registry=self.registry)
        self.model_load_seconds = Gauge("medsyn_model_load_seconds", "time to load each model", ["model"],
                                        registry=self.registry)
