"""The serving metrics, defined once and recorded twice.

* ``prometheus_client``, in a registry of the replica's own: ``GET /metrics`` on the serving URL
  answers with the numbers of whichever replica took the connection.
* ``ray.util.metrics``: Ray's metrics agent on each node collects every replica's numbers and
  serves them, in Prometheus format, on the node's metrics export port (``ray start
  --metrics-export-port``), named with Ray's ``ray_`` prefix and tagged with ``model`` and
  ``replica`` (the replica's pid, as its ``x-lepton-replica`` response header) beside the labels
  below. Ray exports every few seconds.

=========================================  =========  ===========================================
name                                       labels     what
=========================================  =========  ===========================================
``lepton_ray_serve_requests_total``        path code  HTTP requests by route and status code
``lepton_ray_serve_errors_total``          code       responses with a status code >= 400
``lepton_ray_serve_request_latency_seconds``          time in the replica per inference request
``lepton_ray_serve_batch_size``                       requests per model call
``lepton_ray_serve_batch_rows``                       rows per model call
=========================================  =========  ===========================================
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["ServeMetrics", "INFERENCE_PATHS"]

INFERENCE_PATHS = ("/predict", "/v2/infer")
"""Path labels whose requests are timed (the latency histogram)."""

LATENCY_BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class _Counter:
    """A counter in the replica's registry and in Ray's export (with the replica's default tags)."""

    def __init__(self, registry, tags: dict[str, str], name: str, doc: str, labels: tuple[str, ...]):
        import prometheus_client as prom
        from ray.util import metrics

        self.local = prom.Counter(name, doc, labels, registry=registry)  # both exporters add the _total suffix
        self.cluster = metrics.Counter(name, doc, tag_keys=(*labels, *tags))
        self.cluster.set_default_tags(tags)

    def inc(self, **labels: str) -> None:
        self.local.labels(**labels).inc()
        self.cluster.inc(tags=labels)


class _Histogram:
    """A histogram in the replica's registry and in Ray's export (with the replica's default tags)."""

    def __init__(self, registry, tags: dict[str, str], name: str, doc: str, buckets: tuple[float, ...]):
        import prometheus_client as prom
        from ray.util import metrics

        self.local = prom.Histogram(name, doc, buckets=buckets, registry=registry)
        self.cluster = metrics.Histogram(name, doc, boundaries=list(buckets), tag_keys=tuple(tags))
        self.cluster.set_default_tags(tags)

    def observe(self, value: float) -> None:
        self.local.observe(value)
        self.cluster.observe(value)


class ServeMetrics:
    """One replica's serving metrics (``model``: the v2 model name; ``replica``: default, this process's pid).

    >>> m = ServeMetrics("digits", replica="1")
    >>> m.request("/predict", 200, 0.004); m.batch(1); m.rows(3)
    >>> b'lepton_ray_serve_requests_total{code="200",path="/predict"} 1.0' in m.exposition()
    True
    """

    def __init__(self, model: str, replica: Optional[str] = None):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        tags = {"model": model, "replica": replica or str(os.getpid())}
        self._requests = _Counter(self.registry, tags, "lepton_ray_serve_requests", "HTTP requests by path and status code",
                                  ("path", "code"))
        self._errors = _Counter(self.registry, tags, "lepton_ray_serve_errors", "Error responses by status code", ("code",))
        self._latency = _Histogram(self.registry, tags, "lepton_ray_serve_request_latency_seconds",
                                   "Time in the replica per inference request (/predict and v2 infer)", LATENCY_BUCKETS)
        self._batch = _Histogram(self.registry, tags, "lepton_ray_serve_batch_size", "Requests per model call", BATCH_BUCKETS)
        self._rows = _Histogram(self.registry, tags, "lepton_ray_serve_batch_rows", "Rows per model call", ROWS_BUCKETS)

    def request(self, path: str, code: int, seconds: float) -> None:
        """One HTTP response: counted by path label and status code; timed when ``path`` is an inference path."""
        self._requests.inc(path=path, code=str(code))
        if code >= 400:
            self._errors.inc(code=str(code))
        if path in INFERENCE_PATHS:
            self._latency.observe(seconds)

    def batch(self, requests: int) -> None:
        """One model call of ``requests`` requests (jobs)."""
        self._batch.observe(requests)

    def rows(self, rows: int) -> None:
        """One forward pass over ``rows`` rows."""
        self._rows.observe(rows)

    def exposition(self) -> bytes:
        """This replica's metrics in Prometheus text format (``GET /metrics``)."""
        import prometheus_client as prom

        return prom.generate_latest(self.registry)
