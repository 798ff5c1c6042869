"""The Ray Serve application: KServe v1 ``/predict`` and the Open Inference Protocol (v2), one batching path.

Endpoints (one ingress deployment, raw Starlette requests: no per-request FastAPI layer):

* ``POST /predict`` — ``{"instances": [...]}``, one instance per row, shaped by the model's input
  schema (:mod:`lepton_ray.serve.validate`) → ``{"predictions": [...]}``: ``{"label", "probabilities"}``
  per row for a classifier, ``{"next_token", "probabilities"}`` for a language model, a number
  (or nested lists) for a regressor. A language model also takes ``"max_new_tokens": n`` and
  answers ``{"continuations": [[n token ids], ...]}`` (greedy).
* Open Inference Protocol v2 (:mod:`lepton_ray.serve.v2`), the model named ``model_name``
  (default: the bundle's name): ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``GET /v2/models/<name>`` (metadata), ``/v2/models/<name>/ready``, ``POST /v2/models/<name>/infer``.
  An unknown model name is a 404.
* Both protocols go through one :class:`Batcher`: concurrent requests are batched into one model
  call (``max_batch_size`` requests; a lone request runs at once, and only under load does a call
  wait up to ``batch_wait_ms`` to fill); requests
  whose rows differ in shape (token prompts of different lengths) or in what they ask for
  (generation) share the call but not the forward pass.
* Client mistakes are a 400 with ``{"error": "<what was wrong>"}`` (413 for a body that is too
  large); never a 500.
* ``GET /healthz`` — 200 once the model is loaded and warmed up (503 before); ``GET /livez`` — 200.
* ``GET /metrics`` — Prometheus text format, this replica's counters: requests by path and
  code, latency histogram, batch-size histogram, errors by code. Every replica's numbers also go to
  Ray's metrics endpoint on its node (:mod:`lepton_ray.serve.metrics`).
* With ``auth_token_env=NAME``, every endpoint but ``/healthz``, ``/livez`` and ``/v2/health/*``
  needs ``Authorization: Bearer $NAME`` (401 otherwise).

Start it with :func:`deploy` / ``lepton-ray serve BUNDLE`` (every replica answers on one URL itself,
:mod:`lepton_ray.serve.ingress`; deleting the application drains it: :meth:`Replica.__del__`), or with
Ray's own tools, behind Serve's proxy, through the application builder :func:`app`::

    serve run lepton_ray.serve.app:app bundle=bundles/digits max_batch_size=32
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from ray import serve

from lepton_ray.config import ServeConfig

__all__ = ["Batcher", "Job", "ModelServer", "Replica", "app", "body_limit", "build_app", "deploy", "local_url"]

HEALTH_PATHS = ("/healthz", "/livez", "/v2/health/live", "/v2/health/ready")
_V2_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")


def _json(status: int, body: Any, headers: Optional[dict[str, str]] = None):
    from starlette.responses import Response

    return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json",
                    headers=headers)


class ModelFailed(RuntimeError):
    """The model raised on inputs that passed validation (a 500 that says so, never a traceback)."""


@dataclass(frozen=True)
class Job:
    """Rows for one model call (a request, or one prompt length of it) and what to compute for them."""

    inputs: dict[str, np.ndarray]
    max_new_tokens: int = 0
    scores: bool = True

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))

    def key(self) -> tuple:
        """Jobs with equal keys go through one forward pass together."""
        return (self.max_new_tokens, self.scores, *((k, v.shape[1:]) for k, v in self.inputs.items()))


class Batcher:
    """Concurrent requests in one model call, without making a lone request wait.

    A request that finds the model idle runs at once, alone. Requests that arrive while a call runs
    queue, and the next call takes them together (up to ``max_batch_size`` jobs). Under load (the
    previous call had company) a call that is not full waits up to ``wait_s`` more for it to fill.
    Calls run one at a time in a worker thread, so the event loop keeps reading requests meanwhile.

    >>> import asyncio
    >>> b = Batcher(lambda jobs: [j * 10 for j in jobs], max_batch_size=4, wait_s=0.0)
    >>> asyncio.run(b.submit([1, 2]))
    [10, 20]
    """

    def __init__(self, run: Any, max_batch_size: int, wait_s: float):
        from concurrent.futures import ThreadPoolExecutor

        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.queue: list[tuple[Any, asyncio.Future]] = []
        self.busy = False
        self._last = 0  # jobs in the previous call
        self._full: Optional[asyncio.Event] = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lepton-model")

    async def submit(self, jobs: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self.queue.extend(zip(jobs, futures))
        if len(self.queue) >= self.max_batch_size and self._full is not None:
            self._full.set()
        if not self.busy:
            self.busy = True
            loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.queue:
                if self._last > 1 and self.wait_s > 0 and len(self.queue) < self.max_batch_size:
                    self._full = asyncio.Event()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._full.wait(), self.wait_s)
                    self._full = None
                batch, self.queue = self.queue[:self.max_batch_size], self.queue[self.max_batch_size:]
                self._last = len(batch)
                try:
                    results = await loop.run_in_executor(self._pool, self.run, [job for job, _ in batch])
                except Exception as exc:  # noqa: BLE001 - run_jobs isolates model errors; anything else fails the call's requests
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
        finally:
            self.busy = False


def body_limit(inputs: Any, max_instances: int) -> int:
    """Largest accepted request body: ``max_instances`` rows of generously printed values of the model's ``inputs``
    (4 contexts for a token prompt)."""
    values = sum(4 * s.max_len if s.max_len else math.prod(s.shape) for s in inputs)
    names = sum(len(",".join(s.features)) + len(s.name) for s in inputs)
    return 1024 + max_instances * (values * 32 + names * 2)


def _path_label(path: str) -> str:
    if path in ("/predict", "/healthz", "/livez", "/metrics"):
        return path
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "/v2/infer"
    return "/v2" if path == "/v2" or path.startswith("/v2/") else "other"


class ModelServer:
    """The replica: loads the bundle, warms it up, validates and batches requests.

    The class is plain Python; :func:`build_app` wraps it in ``serve.deployment``.
    """

    def __init__(self, bundle: str, *, model_name: Optional[str] = None, max_batch_size: int = 32,
                 batch_wait_ms: float = 2.0, max_instances: int = 1024, threads: int = 1,
                 auth_token_env: Optional[str] = None, storage_options: Optional[dict] = None):
        from lepton_ray.serve.bundle import load_bundle
        from lepton_ray.serve.metrics import ServeMetrics
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
        self.model_name = model_name or self.predictor.bundle.name
        self.inputs, self.outputs = self.predictor.inputs, self.predictor.outputs
        self.batcher = Batcher(self.run_jobs, max_batch_size, batch_wait_ms / 1000.0)

        self.metrics = ServeMetrics(self.model_name)
        # warm-up: the first calls allocate (and, for `compile`, may specialise); do them now
        for rows in sorted({1, max_batch_size}):
            self.predictor.run(self.predictor.example(rows))
        self.ready = True

    # --------------------------------------------------------------- batching

    def run_jobs(self, jobs: list[Job]) -> list[Any]:
        """One forward pass per group of alike jobs (same per-row shapes and options); each job gets its rows back.

        A group whose forward pass fails is retried job by job, so one request the model cannot
        process fails alone (its result is the exception), not the requests batched with it.
        """
        self.metrics.batch(len(jobs))
        results: list[Any] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.key(), []).append(i)
        for idxs in groups.values():
            group = [jobs[i] for i in idxs]
            try:
                outs: list[Any] = self._run(group)
            except Exception as exc:  # noqa: BLE001 - isolate the failing request: each job of the group alone
                outs = [exc] if len(group) == 1 else [self._run_alone(job) for job in group]
            for i, out in zip(idxs, outs):
                results[i] = out
        return results

    def _run(self, group: list[Job]) -> list[dict[str, np.ndarray]]:
        first = group[0]
        inputs = first.inputs if len(group) == 1 else {k: np.concatenate([j.inputs[k] for j in group]) for k in first.inputs}
        self.metrics.rows(len(next(iter(inputs.values()))))
        out = self.predictor.run(inputs, first.max_new_tokens, first.scores)
        parts, start = [], 0
        for job in group:
            parts.append({k: v[start:start + job.rows] for k, v in out.items()})
            start += job.rows
        return parts

    def _run_alone(self, job: Job) -> Any:
        try:
            return self._run([job])[0]
        except Exception as exc:  # noqa: BLE001 - this job's own failure is its result
            return exc

    async def _infer(self, jobs: list[Job]) -> list[dict[str, np.ndarray]]:
        results = await self.batcher.submit(jobs)
        for r in results:
            if isinstance(r, Exception):
                raise ModelFailed(f"the model failed on this request: {type(r).__name__}: {r}") from r
        return list(results)

    # --------------------------------------------------------------- HTTP

    async def __call__(self, request) -> Any:
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        t0 = time.perf_counter()
        response = await self._route(request, path)
        self.metrics.request(_path_label(path), response.status_code, time.perf_counter() - t0)
        return response

    async def _route(self, request, path: str) -> Any:
        from lepton_ray.serve.validate import BadRequest

        method = request.method
        if path in ("/livez", "/v2/health/live"):
            return _json(200, {"status": "alive"} if path == "/livez" else {"live": True})
        if path in ("/healthz", "/v2/health/ready"):
            ok = {"status": "ready"} if path == "/healthz" else {"ready": True}
            return _json(200, ok) if self.ready else _json(503, {"status": "loading"} if path == "/healthz" else {"ready": False})
        if self.token is not None:
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, self.token):
                return _json(401, {"error": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"},
                             {"WWW-Authenticate": "Bearer"})
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST
            from starlette.responses import Response

            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
        try:
            if path == "/predict":
                if method != "POST":
                    return _json(405, {"error": f"/predict takes POST, not {method}"}, {"Allow": "POST"})
                return await self._predict(request)
            if path == "/v2" or path.startswith("/v2/"):
                return await self._v2(request, path, method)
        except BadRequest as exc:
            return _json(exc.status, {"error": str(exc)})
        except ModelFailed as exc:
            return _json(500, {"error": str(exc)})
        return _json(404, {"error": f"no endpoint {path}; use POST /predict, POST /v2/models/{self.model_name}/infer, "
                                    f"GET /healthz, /livez, /metrics, /v2"})

    async def _body(self, request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:  # refused before a byte of it is read
            raise self._too_large(f"{declared} bytes")
        parts, size = [], 0
        async for chunk in request.stream():  # chunked bodies: stop reading once past the limit
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large(f"more than {size} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def _too_large(self, size: str) -> Exception:
        from lepton_ray.serve.validate import BadRequest

        return BadRequest(f"request body of {size} is larger than {self.max_body} bytes, the limit for {self.max_instances} "
                          f"instances per request; send fewer instances per request or raise the limit with "
                          f"--max-instances (serve.max_instances)", 413)

    async def _predict(self, request) -> Any:
        from lepton_ray.serve.validate import parse_instances

        req = parse_instances(await self._body(request), self.inputs, max_instances=self.max_instances,
                              generates=self.predictor.can_generate)
        jobs = [Job(p.inputs, req.max_new_tokens, scores=not req.max_new_tokens) for p in req.parts]
        out = req.merge(await self._infer(jobs))
        if req.max_new_tokens:
            return _json(200, {"continuations": out["continuation"].tolist()})
        return _json(200, {"predictions": self.predictor.to_json(out)})

    async def _v2(self, request, path: str, method: str) -> Any:
        from starlette.responses import Response

        from lepton_ray.serve import v2

        if path.rstrip("/") == "/v2":
            return _json(200, v2.server_metadata()) if method == "GET" else _json(405, {"error": "/v2 takes GET"}, {"Allow": "GET"})
        m = _V2_MODEL.match(path)
        if m is None:
            return _json(404, {"error": f"no endpoint {path}; the v2 endpoints are /v2, /v2/health/live, /v2/health/ready, "
                                        f"/v2/models/{self.model_name}[/ready|/infer]"})
        name, version, action = m.group(1), m.group(2), m.group(3) or ""
        if name != self.model_name:
            return _json(404, {"error": f"unknown model '{name}'; this server serves '{self.model_name}'"})
        if version is not None and version != v2.VERSION:
            return _json(404, {"error": f"model '{name}' has no version '{version}' (versions: {v2.VERSION})"})
        want = "POST" if action == "/infer" else "GET"
        if method != want:
            return _json(405, {"error": f"{path} takes {want}, not {method}"}, {"Allow": want})
        if action == "/ready":
            return _json(200, {"name": name, "ready": True}) if self.ready else _json(503, {"name": name, "ready": False})
        if not action:
            return _json(200, v2.model_metadata(self.model_name, self.inputs, self.outputs))
        req = v2.parse_infer(await self._body(request), self.inputs, self.outputs, max_instances=self.max_instances,
                             generates=self.predictor.can_generate,
                             header_length=request.headers.get("inference-header-content-length"))
        names = {n for n, _ in req.outputs}
        job = Job(req.inputs, req.max_new_tokens, scores=not req.max_new_tokens or bool(names - {"continuation"}))
        (out,) = await self._infer([job])
        body, headers = v2.encode_response(self.model_name, req, out)
        return Response(body, status_code=200, headers=headers)

    @property
    def max_body(self) -> int:
        return body_limit(self.inputs, self.max_instances)

    def check_health(self) -> None:
        """Ray Serve's own health check: unhealthy until load and warm-up are done."""
        if not self.ready:
            raise RuntimeError("model not loaded yet")


class Replica(ModelServer):
    """A Serve replica of :class:`ModelServer` that also answers HTTP itself on the application's one URL
    (``listen=(host, port)``, shared by every replica: :mod:`lepton_ray.serve.ingress`)."""

    async def __init__(self, bundle: str, *, listen: Optional[tuple[str, int]] = None, root_path: str = "", **kwargs: Any):
        super().__init__(bundle, **kwargs)
        self._http: Any = None
        if listen is not None:
            from lepton_ray.serve.ingress import listen as serve_http

            self._http = await serve_http(self, listen[0], listen[1], root_path)

    def check_health(self) -> None:
        super().check_health()
        if self._http is not None and self._http[1].done():
            raise RuntimeError(f"the HTTP server stopped: {self._http[1].exception()!r}")

    async def __del__(self) -> None:
        """Serve's graceful stop of this replica (``serve.delete`` / ``serve.shutdown``, a scale-down): the HTTP server
        stops accepting (new connections are refused once every replica on the port has stopped), closes its idle
        connections and lets the requests in flight finish; Serve kills the replica after
        ``graceful_shutdown_timeout_s`` (20 s) whatever is left."""
        if getattr(self, "_http", None) is not None:  # None: __init__ failed, or no listen
            server, task = self._http
            server.should_exit = True
            await task


def build_app(bundle: str, config: Optional[ServeConfig] = None, *, name: str = "lepton_ray",
              model_name: Optional[str] = None, storage_options: Optional[dict] = None, listen: bool = False,
              route_prefix: str = "/"):
    """The Ray Serve application (``serve.run``-able) for ``bundle`` with ``config``'s settings.

    ``name``: the Serve application; ``model_name``: the model's name in the v2 protocol
    (``/v2/models/<model_name>``; default: the bundle's name, i.e. the training run's). ``listen``: every
    replica also answers HTTP on ``config.host``:``config.port`` itself (the one URL, :mod:`lepton_ray.serve.ingress`),
    under ``route_prefix``.
    """
    from lepton_ray.serve.bundle import check_name

    if model_name is not None:
        check_name(model_name, "--name")

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
        Replica, name=f"{name}-model", ray_actor_options=actor_options,
        # enough in flight per replica to fill batches from many clients
        max_ongoing_requests=max(64, 4 * cfg.max_batch_size), max_queued_requests=-1,
        logging_config={"enable_access_log": cfg.access_log, "log_level": "INFO" if cfg.access_log else "WARNING"},
        **scaling,
    )
    return deployment.bind(bundle, model_name=model_name, max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms,
                           max_instances=cfg.max_instances, threads=cfg.threads_per_replica,
                           auth_token_env=cfg.auth_token_env, storage_options=storage_options,
                           listen=(cfg.host, cfg.port) if listen else None, root_path=route_prefix.rstrip("/"))


def app(args: dict[str, str]):
    """Application builder for ``serve run`` / ``serve deploy``: ``bundle=URI``, optionally ``model_name=NAME``,
    plus any ``serve`` config key.

    >>> app({"bundle": "bundles/digits", "max_batch_size": "16"})  # doctest: +SKIP
    """
    import yaml

    args = dict(args)
    bundle = args.pop("bundle", None)
    model_name = args.pop("model_name", None)
    if not bundle:
        raise ValueError("lepton_ray.serve.app:app needs bundle=URI (a serving bundle or a checkpoint)")
    values = {k: (yaml.safe_load(v) if isinstance(v, str) else v) for k, v in args.items()}
    if "auth_token_env" in values and values["auth_token_env"] is not None:
        values["auth_token_env"] = str(args["auth_token_env"])
    from lepton_ray.config import _build

    return build_app(bundle, _build(ServeConfig, values, "serve"), model_name=model_name)  # unknown keys: a ConfigError with a hint


def deploy(bundle: str, config: Optional[ServeConfig] = None, *, name: str = "lepton_ray", route_prefix: str = "/",
           model_name: Optional[str] = None, storage_options: Optional[dict] = None, timeout_s: float = 300.0,
           verbose: bool = False) -> str:
    """Deploy ``bundle`` on Serve, every replica answering on ``config.host``:``config.port`` (one URL however
    many replicas, no proxy hop: :mod:`lepton_ray.serve.ingress`), and wait until ``/healthz`` is 200.

    Returns the base URL as this machine reaches it (:func:`local_url`). Uses the Ray cluster of ``ray.init`` / ``RAY_ADDRESS`` (or starts one). One
    application per port. ``model_name``: the v2 protocol's name for the model (default: the bundle's name).
    ``verbose``: Ray's and Serve's INFO lines too (by default their warnings only: :mod:`lepton_ray.console`).

    >>> url = deploy("bundles/digits", ServeConfig(port=8000))  # doctest: +SKIP
    >>> requests.post(url + "/predict", json={"instances": [[0.0] * 64]}).json()  # doctest: +SKIP
    {'predictions': [{'label': 1, 'probabilities': [...]}]}
    """
    import requests

    from lepton_ray.train.trainer import ensure_ray

    cfg = config or ServeConfig()
    from lepton_ray.console import ray_log_level

    ensure_ray(verbose=verbose)  # RAY_ADDRESS, else a private local instance (never a guessed, possibly dead, cluster)
    # the replicas answer HTTP themselves; the controller's lines at Ray's level
    serve.start(proxy_location="Disabled", logging_config={"log_level": logging.getLevelName(ray_log_level(verbose))})
    serve.run(build_app(bundle, cfg, name=name, model_name=model_name, storage_options=storage_options, listen=True,
                        route_prefix=route_prefix), name=name, route_prefix=None, blocking=False)
    url = local_url(cfg.host, cfg.port) + route_prefix.rstrip("/")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200 and _replicas_ready(name):
                return url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.2)


def local_url(host: str, port: int) -> str:
    """The URL this machine reaches a server bound to ``host:port`` at (``0.0.0.0``: 127.0.0.1, ``::``: ``[::1]``).

    >>> local_url("0.0.0.0", 8000), local_url("::", 8000), local_url("10.0.0.5", 80)
    ('http://127.0.0.1:8000', 'http://[::1]:8000', 'http://10.0.0.5:80')
    """
    import ipaddress

    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"


def _replicas_ready(name: str) -> bool:
    """Every replica of application ``name`` is running (so every one listens on the URL)."""
    status = serve.status().applications.get(name)
    return status is not None and str(getattr(status.status, "value", status.status)) == "RUNNING"
