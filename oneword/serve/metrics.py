"""``/metrics`` in Prometheus's text format (prometheus_client, one registry per service)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_SECONDS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """The service's measurements; the gauges are read from the service when scraped."""

    def __init__(self, service) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        reg = self.registry
        self.responses = Counter(
            "oneword_http_responses", "HTTP responses by status code", ["code"], registry=reg
        )
        self.refine_steps = Counter(
            "oneword_refine_steps", "refinement steps made, summed over the words of the group", registry=reg
        )
        self.histograms = {
            "job_seconds": Histogram(
                "oneword_job_seconds",
                "time from acceptance to the refined word",
                buckets=_SECONDS,
                registry=reg,
            ),
            "provisional_seconds": Histogram(
                "oneword_provisional_seconds",
                "time from acceptance to the provisional (encoder) word",
                buckets=_SECONDS,
                registry=reg,
            ),
            "generation_seconds": Histogram(
                "oneword_generation_seconds",
                "time from acceptance to the images of a generation request",
                buckets=_SECONDS,
                registry=reg,
            ),
        }
        reg.register(_Gauges(service))

    def observe(self, name: str, value: float) -> None:
        if name == "refine_steps":
            self.refine_steps.inc(value)
        else:
            self.histograms[name].observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Gauges:
    def __init__(self, service) -> None:
        self.service = service

    def describe(self):
        return []

    def collect(self):
        s = self.service
        counts = s.store.counts()
        yield GaugeMetricFamily("oneword_queue_depth", "jobs waiting", value=counts["queued"])
        jobs = GaugeMetricFamily("oneword_jobs", "jobs by state", labels=["state"])
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs
        worker = s.worker
        yield GaugeMetricFamily(
            "oneword_group_occupancy", "words in the refinement group now", value=worker.occupancy
        )
        yield GaugeMetricFamily(
            "oneword_group_capacity", "slots of the refinement group", value=s.settings.group
        )
        yield GaugeMetricFamily(
            "oneword_refine_group_steps_per_second",
            "group steps per second (moving average); each running word advances one step per group step",
            value=worker.steps_per_second or 0.0,
        )
        yield GaugeMetricFamily(
            "oneword_generation_queue_depth",
            "generation requests waiting",
            value=worker.waiting_images(),
        )
        yield GaugeMetricFamily(
            "oneword_worker_alive", "1 while the worker runs", value=float(worker.healthy)
        )
