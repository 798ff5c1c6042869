"""The Ray Serve application: ``POST /predict`` with dynamic batching, validation, health, metrics, auth.

Endpoints (one ingress deployment, raw Starlette requests: no per-request FastAPI layer):

* ``POST /predict`` — ``{"instances": [[...], ...]}`` or ``{"instances": [{"px0": ...}, ...]}``
  → ``{"predictions": [{"label": 3, "probabilities": [...]}, ...]}`` (regression: numbers).
  Concurrent requests are batched into one model call (``@serve.batch``; ``max_batch_size``
  requests, waiting at most ``batch_wait_ms`` for more). Client mistakes are a 400 with
  ``{"error": "<what was wrong>"}``; never a 500.
* ``GET /healthz`` — 200 once the model is loaded and warmed up (503 before); ``GET /livez`` — 200.
* ``GET /metrics`` — Prometheus text format, this replica's counters: requests by path and
  code, latency histogram, batch-size histogram, errors by code.
* With ``auth_token_env=NAME``, every endpoint but ``/healthz`` and ``/livez`` needs
  ``Authorization: Bearer $NAME`` (401 otherwise).

Start it with :func:`deploy` / ``lepton-ray serve BUNDLE``, or with Ray's own tools through
the application builder :func:`app`::

    serve run lepton_ray.serve.app:app bundle=bundles/digits max_batch_size=32
"""

from __future__ import annotations

import hmac
import json
import os
import time
from typing import Any, Optional

import numpy as np
from ray import serve

from lepton_ray.config import ServeConfig

__all__ = ["ModelServer", "app", "build_app", "deploy", "replica_urls"]

HEALTH_PATHS = ("/healthz", "/livez")


def _json(status: int, body: Any, headers: Optional[dict[str, str]] = None):
    from starlette.responses import Response

    return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json",
                    headers=headers)


class ModelServer:
    """The replica: loads the bundle, warms it up, validates and batches requests.

    The class is plain Python; :func:`build_app` wraps it in ``serve.deployment``.
    """

    def __init__(self, bundle: str, *, max_batch_size: int = 32, batch_wait_ms: float = 2.0,
                 max_instances: int = 1024, threads: int = 1, auth_token_env: Optional[str] = None,
                 storage_options: Optional[dict] = None):
        import prometheus_client as prom

        from lepton_ray.serve.bundle import load_bundle
        from lepton_ray.serve.predictor import Predictor

        self.ready = False
        self.token: Optional[bytes] = None
        if auth_token_env:
            token = os.environ.get(auth_token_env)
            if not token:
                raise RuntimeError(f"auth_token_env: environment variable {auth_token_env} is not set in the replica")
            self.token = f"Bearer {token}".encode()
        self.max_instances = max_instances
        self.predictor = Predictor(load_bundle(bundle, storage_options), threads=threads)
        b = self.predictor.bundle
        self.features, self.dim = list(b.features), b.input_dim
        self._predict_batch.set_max_batch_size(max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)

        self.registry = prom.CollectorRegistry()
        self.m_requests = prom.Counter("lepton_ray_serve_requests", "HTTP requests by path and status code",
                                       ["path", "code"], registry=self.registry)
        self.m_errors = prom.Counter("lepton_ray_serve_errors", "Error responses by status code", ["code"],
                                     registry=self.registry)
        self.m_latency = prom.Histogram("lepton_ray_serve_request_latency_seconds", "Time in the replica per /predict",
                                        buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5),
                                        registry=self.registry)
        self.m_batch = prom.Histogram("lepton_ray_serve_batch_size", "Requests per model call",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.m_rows = prom.Histogram("lepton_ray_serve_batch_rows", "Rows per model call",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
                                     registry=self.registry)
        # warm-up: the first calls allocate (and, for `compile`, may specialise); do them now
        for rows in sorted({1, max_batch_size}):
            self.predictor.predict(np.zeros((rows, self.dim), dtype=np.float32))
        self.ready = True

    # --------------------------------------------------------------- batching

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _predict_batch(self, xs: list[np.ndarray]) -> list[list[Any]]:
        """One model call for every request in the batch; each gets its own rows back."""
        self.m_batch.observe(len(xs))
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        self.m_rows.observe(len(x))
        pred = self.predictor.predict(x)
        out, start = [], 0
        for part in xs:
            out.append(self.predictor.to_json(pred, start, start + len(part)))
            start += len(part)
        return out

    # --------------------------------------------------------------- HTTP

    async def __call__(self, request) -> Any:
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        t0 = time.perf_counter()
        response = await self._route(request, path)
        code = str(response.status_code)
        label = path if path in ("/predict", "/healthz", "/livez", "/metrics") else "other"
        self.m_requests.labels(label, code).inc()
        if response.status_code >= 400:
            self.m_errors.labels(code).inc()
        if label == "/predict":
            self.m_latency.observe(time.perf_counter() - t0)
        return response

    async def _route(self, request, path: str) -> Any:
        from lepton_ray.serve.validate import BadRequest, parse_instances

        method = request.method
        if path == "/livez":
            return _json(200, {"status": "alive"})
        if path == "/healthz":
            return _json(200, {"status": "ready"}) if self.ready else _json(503, {"status": "loading"})
        if self.token is not None:
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, self.token):
                return _json(401, {"error": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"},
                             {"WWW-Authenticate": "Bearer"})
        if path == "/metrics":
            import prometheus_client as prom
            from starlette.responses import Response

            return Response(prom.generate_latest(self.registry), media_type=prom.CONTENT_TYPE_LATEST)
        if path != "/predict":
            return _json(404, {"error": f"no endpoint {path}; use POST /predict, GET /healthz, /livez, /metrics"})
        if method != "POST":
            return _json(405, {"error": f"/predict takes POST, not {method}"}, {"Allow": "POST"})
        try:
            body = await request.body()
            if len(body) > self.max_body:
                raise BadRequest(f"request body of {len(body)} bytes is larger than {self.max_body} bytes", 413)
            x = parse_instances(body, features=self.features, dim=self.dim, max_instances=self.max_instances)
        except BadRequest as exc:
            return _json(exc.status, {"error": str(exc)})
        return _json(200, {"predictions": await self._predict_batch(x)})

    @property
    def max_body(self) -> int:
        """Largest accepted body: ``max_instances`` rows of ``dim`` generously printed numbers."""
        return 1024 + self.max_instances * self.dim * 32 + self.max_instances * len(",".join(self.features)) * 2

    def check_health(self) -> None:
        """Ray Serve's own health check: unhealthy until load and warm-up are done."""
        if not self.ready:
            raise RuntimeError("model not loaded yet")


def build_app(bundle: str, config: Optional[ServeConfig] = None, *, name: str = "lepton_ray",
              storage_options: Optional[dict] = None):
    """The Ray Serve application (``serve.run``-able) for ``bundle`` with ``config``'s settings."""

    cfg = config or ServeConfig()
    actor_options: dict[str, Any] = {"num_cpus": cfg.threads_per_replica}
    if cfg.auth_token_env:
        token = os.environ.get(cfg.auth_token_env)
        if not token:
            from lepton_ray.config import ConfigError

            raise ConfigError(f"serve.auth_token_env: environment variable {cfg.auth_token_env} is not set")
        actor_options["runtime_env"] = {"env_vars": {cfg.auth_token_env: token}}
    scaling: dict[str, Any] = ({"autoscaling_config": dict(cfg.autoscaling)} if cfg.autoscaling
                               else {"num_replicas": cfg.replicas})
    deployment = serve.deployment(
        ModelServer, name=f"{name}-model", ray_actor_options=actor_options,
        # enough in flight per replica to fill batches from many clients
        max_ongoing_requests=max(64, 4 * cfg.max_batch_size), max_queued_requests=-1,
        logging_config={"enable_access_log": cfg.access_log, "log_level": "INFO" if cfg.access_log else "WARNING"},
        **scaling,
    )
    return deployment.bind(bundle, max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms,
                           max_instances=cfg.max_instances, threads=cfg.threads_per_replica,
                           auth_token_env=cfg.auth_token_env, storage_options=storage_options)


def app(args: dict[str, str]):
    """Application builder for ``serve run`` / ``serve deploy``: ``bundle=URI`` plus any ``serve`` config key.

    >>> app({"bundle": "bundles/digits", "max_batch_size": "16"})  # doctest: +SKIP
    """
    import yaml

    args = dict(args)
    bundle = args.pop("bundle", None)
    if not bundle:
        raise ValueError("lepton_ray.serve.app:app needs bundle=URI (a serving bundle or a checkpoint)")
    values = {k: (yaml.safe_load(v) if isinstance(v, str) else v) for k, v in args.items()}
    if "auth_token_env" in values and values["auth_token_env"] is not None:
        values["auth_token_env"] = str(args["auth_token_env"])
    from lepton_ray.config import _build

    return build_app(bundle, _build(ServeConfig, values, "serve"))  # unknown keys: a ConfigError with a hint


def deploy(bundle: str, config: Optional[ServeConfig] = None, *, name: str = "lepton_ray", route_prefix: str = "/",
           storage_options: Optional[dict] = None, timeout_s: float = 300.0) -> str:
    """Start Serve on 127.0.0.1 (``config.port``), deploy ``bundle`` and wait until ``/healthz`` is 200.

    Returns the base URL. Uses the Ray cluster of ``ray.init`` / ``RAY_ADDRESS`` (or starts one).

    >>> url = deploy("bundles/digits", ServeConfig(port=8000))  # doctest: +SKIP
    >>> requests.post(url + "/predict", json={"instances": [[0.0] * 64]}).json()  # doctest: +SKIP
    {'predictions': [{'label': 1, 'probabilities': [...]}]}
    """
    import requests

    cfg = config or ServeConfig()
    from lepton_ray.train.trainer import ensure_ray

    ensure_ray()  # RAY_ADDRESS, else a private local instance (never a guessed, possibly dead, cluster)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    serve.run(build_app(bundle, cfg, name=name, storage_options=storage_options), name=name,
              route_prefix=route_prefix, blocking=False)
    url = f"http://127.0.0.1:{cfg.port}{route_prefix.rstrip('/')}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.2)


def replica_urls(name: str = "lepton_ray") -> list[str]:
    """Direct-ingress URLs of application ``name``'s replicas (empty unless the cluster runs direct ingress).

    With ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the Ray cluster's environment, each ingress
    replica also listens on its own port (30000-31000, on the HTTP host: 127.0.0.1) and answers
    there without the proxy hop. Read from the Serve controller's target groups (a Ray-internal
    call, hence the defensive ``except``).
    """
    import ray
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client()
        groups = ray.get(client._controller.get_target_groups.remote(name))
        proxy_port = client.http_config.port
    except Exception:  # noqa: BLE001 - not available in this Ray version / mode
        return []
    urls = []
    for g in groups:
        if str(getattr(g.protocol, "value", g.protocol)).upper() != "HTTP":
            continue
        for t in g.targets:
            if t.port != proxy_port:
                urls.append(f"http://{t.ip}:{t.port}{g.route_prefix.rstrip('/')}")
    return urls
