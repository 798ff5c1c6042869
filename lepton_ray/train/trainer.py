"""The driver side: plan the run (:mod:`lepton_ray.train.plan`), start the Ray Train worker group, watch it, write the result."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import yaml

from lepton_ray.checks import check_config
from lepton_ray.config import Config, ConfigError, load_config
from lepton_ray.console import progress_bar, ray_log_level, say
from lepton_ray.imports import register, registered
from lepton_ray.storage import redact_config
from lepton_ray.sync import STRATEGIES
from lepton_ray.train import metrics as M
from lepton_ray.train.context import WorkerContext
from lepton_ray.train.events import RunEvents, failure_record
from lepton_ray.train.loop import LoopSpec, train_loop
from lepton_ray.train.plan import DataPlan, RunPlan, initial_model, make_plan
from lepton_ray.train.watchdog import Preempted, Watchdog, WorkerGuard
from lepton_ray.train.placement import check_paths_reachable

__all__ = ["Trainer", "Result", "TrainingError", "ensure_ray"]


class TrainingError(RuntimeError):
    """The worker group failed (after any restarts ``scaling.max_failures`` allowed)."""

log = logging.getLogger(__name__)


@dataclass
class Result:
    """What a finished run produced; ``to_dict()`` is ``result.json``.

    >>> Result(metrics={"eval_accuracy": 0.97}, checkpoint="runs/x/checkpoints/step_00000100", run_dir="runs/x").metrics["eval_accuracy"]
    0.97
    """

    metrics: dict[str, Any]
    checkpoint: Optional[str]
    run_dir: str
    resumed_from: Optional[str] = None
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {**self.metrics, "checkpoint": self.checkpoint, "run_dir": self.run_dir}

    def breakdown(self) -> str:
        """Where the steps' time went, per rank (:func:`lepton_ray.train.breakdown.table`); empty for a run without
        ``breakdown`` records."""
        from lepton_ray.train.breakdown import table

        return table(self.records)


def ensure_ray(min_cpus: int = 1, extra_cpus: float = 0, *, verbose: bool = False) -> bool:
    """Connect to the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it); else start a private
    local Ray instance with at least ``min_cpus`` logical CPUs, plus ``extra_cpus`` (the data engine's own).
    Ray's driver-side lines below WARNING are shown only when ``verbose`` (:mod:`lepton_ray.console`).

    Without ``RAY_ADDRESS`` nothing is guessed: Ray's ``address="auto"`` trusts
    /tmp/ray/ray_current_cluster (and running gcs_server processes), which outlive crashed or
    half-stopped clusters and then make ``ray.init`` retry a dead address for many minutes.

    Returns True when this call connected or started Ray (the caller shuts it down when done).
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=ray_log_level(verbose))
    else:
        start_local_ray(num_cpus=max(os.cpu_count() or 1, min_cpus) + math.ceil(extra_cpus), logging_level=ray_log_level(verbose))
    return True


def check_datasets(datasets: dict[str, Any]) -> dict[str, Any]:
    """``Trainer(datasets=...)``: ``train`` and/or ``eval``, each a ``ray.data.Dataset``."""
    for key, ds in datasets.items():
        if key not in ("train", "eval"):
            raise ConfigError(f"datasets: unknown split '{key}'; valid splits are: train, eval")
        if not hasattr(ds, "streaming_split"):
            raise ConfigError(f"datasets['{key}']: expected a ray.data.Dataset, got {type(ds).__name__}")
    return datasets


def with_passed(config: Union[Config, dict, str, os.PathLike], datasets: dict[str, Any], *,
                model: Optional[Callable[..., Any]] = None, loss: Optional[Callable[..., Any]] = None,
                transform: Optional[Callable[..., Any]] = None) -> Config:
    """``config`` completed by what was passed to the ``Trainer`` beside it (the caller's own config is left as it was):

    * Python callables in place of ``model.factory``, ``model.loss`` and ``data.transform``: each is registered
      (:func:`lepton_ray.imports.register`) and the config records its name, ``"callable:module.qualname"``;
    * ``data.train`` / ``data.eval`` naming the Datasets passed for them (``"dataset:train"``): a split given both ways is
      an error; one given as a Dataset may be left out of the config.
    """
    if not datasets or isinstance(config, Config):
        raw = load_config(config).to_dict()
    elif isinstance(config, dict):
        raw = json.loads(json.dumps(config))
    else:  # a YAML file that may leave data.train out
        raw = yaml.safe_load(Path(config).read_text()) or {}
        raw.setdefault("run", {}).setdefault("name", Path(config).stem)
    data, model_section = raw.setdefault("data", {}), raw.setdefault("model", {})
    for fn, section, key in ((model, model_section, "factory"), (loss, model_section, "loss"), (transform, data, "transform")):
        if fn is not None:
            section[key] = register(fn)
    for split in datasets:
        if data.get(split) not in (None, "", f"dataset:{split}"):
            raise ConfigError(f"data.{split}: given twice, as '{data[split]}' in the config and as datasets['{split}']; give one")
        data[split] = f"dataset:{split}"
    if "train" in datasets:
        for key, option, why in (("transform", "transform" if transform is not None else "data.transform",
                                  "apply it to the Dataset (ds.map_batches(fn)) before passing it"),
                                 ("builder", "data.builder", "a Dataset is built by its own code")):
            if data.get(key):
                raise ConfigError(f"{option}: does not apply to a ray.data.Dataset passed as datasets['train']; {why}")
        if data.get("engine", "native") != "native":
            raise ConfigError("data.engine: a ray.data.Dataset passed as datasets['train'] is read by Ray Data already; leave data.engine out")
        if isinstance(raw.get("scaling", {}).get("num_workers"), list):
            raise ConfigError("scaling.num_workers: a run on a ray.data.Dataset keeps its number of workers (its streaming_split is"
                              " made once); give one number")
    return load_config(raw)


def data_cpus(cfg: Config) -> float:
    """Logical CPUs the data engine's tasks need beside the workers' (``data.cpus`` with ``data.engine: ray_data``)."""
    return cfg.data.cpus if cfg.data.engine == "ray_data" else 0


_API_SERVER_SET_BY_US: Optional[str] = None


def start_local_ray(**init_kwargs: Any) -> None:
    """``ray.init(address="local", ...)`` whose processes can find their own cluster's state API.

    Ray Train's PlacementGroupCleaner (one per ``TorchTrainer.fit``) asks the state API whether
    the controller is alive. Without ``RAY_ADDRESS`` the state client resolves "the latest
    cluster" from /tmp/ray/ray_current_cluster, which the last ``ray start`` on the machine
    wrote: a stale or foreign cluster there made every run end with a 12 s wait and a GCS
    timeout in the log. Here the dashboard gets a known free port, and ``RAY_API_SERVER_ADDRESS``
    (inherited by every Ray process this call starts) points the state client at it.
    """
    import ray

    global _API_SERVER_SET_BY_US
    current = os.environ.get("RAY_API_SERVER_ADDRESS")
    if current is None or current == _API_SERVER_SET_BY_US:  # never override a user's own setting
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        _API_SERVER_SET_BY_US = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        init_kwargs.setdefault("dashboard_port", port)
    ray.init(address="local", **init_kwargs)


def _planned(path: str) -> Any:
    """A read-only ``Trainer`` attribute that is part of its plan (``"data.train"``: ``trainer.plan.data.train``)."""
    get = operator.attrgetter(path)
    return property(lambda self: get(self.plan), doc=f"``self.plan.{path}`` (makes the plan on first use).")


class Trainer:
    """Data-parallel training of one config on a Ray cluster.

    Constructing a Trainer checks the config and does no I/O; ``fit()`` first plans the run
    (:func:`~lepton_ray.train.plan.make_plan`: the data paths and columns, the model on two rows, the
    checkpoint directory), before Ray starts, then launches it. ``train_info``, ``run_name`` and the
    other planned attributes make the plan on first use.

    >>> result = Trainer("examples/digits.yaml").fit()  # doctest: +SKIP
    >>> result.metrics["eval_accuracy"] > 0.95  # doctest: +SKIP
    True
    """

    def __init__(
        self,
        config: Union[Config, dict, str, os.PathLike],
        *,
        resume: bool = False,
        progress: bool = True,
        verbose: bool = False,
        model: Optional[Callable[..., Any]] = None,
        loss: Optional[Callable[..., Any]] = None,
        transform: Optional[Callable[..., Any]] = None,
        datasets: Optional[dict[str, Any]] = None,
        data_plan: Optional[DataPlan] = None,
    ):
        """``progress``: a progress bar on stderr. ``verbose``: Ray's INFO lines too (its start-up, Ray Train's worker
        group lines); by default only its warnings (:mod:`lepton_ray.console`). ``data_plan``: the data described
        already (a sweep's, shared with its trials); used where it was made for the same data inputs, else described
        again."""
        self._created = time.time()  # the start-up phases are timed from here (see LoopSpec.phases)
        self._datasets = check_datasets(datasets or {})
        self.config = check_config(with_passed(config, self._datasets, model=model, loss=loss, transform=transform))
        self.resume = resume
        self.progress, self.verbose = progress, verbose
        self._data_plan = data_plan
        self._plan: Optional[RunPlan] = None
        self._planning = threading.Lock()  # one plan, also when another thread reads run_dir while fit() plans

    @property
    def plan(self) -> RunPlan:
        """The run's plan (:func:`~lepton_ray.train.plan.make_plan`), made on first use — ``fit()`` makes it first: reads
        storage, runs the model on 2 rows."""
        with self._planning:
            if self._plan is None:
                self._plan = make_plan(self.config, self._datasets, resume=self.resume, data=self._data_plan)
            return self._plan

    # what the plan found, planned on first use
    train_info = _planned("data.train")
    eval_info = _planned("data.eval")
    baseline = _planned("data.baseline")  # reference metrics computed on the driver, reported beside the run's
    services = _planned("services")
    run_name = _planned("run_name")
    run_dir = _planned("run_dir")
    checkpoint_uri = _planned("checkpoint_uri")
    node_local_paths = _planned("node_local_paths")

    def _model(self) -> torch.nn.Module:
        """The model as every worker initialises it (what the strategy's services start from)."""
        return initial_model(self.config, self.train_info)

    # ------------------------------------------------------------------ run

    def fit(self, *, local: bool = False, group: Any = None, report: Optional[Callable[[dict[str, Any]], None]] = None,
            keep_warm: bool = False) -> Result:
        """Train to the end (or resume to the end) and return the :class:`Result`.

        By default the workers are a Ray Train worker group. ``local``: run the one worker in this process,
        without Ray (breakpoints and ``pdb`` work, nothing to start): needs ``scaling.num_workers: 1`` and a
        strategy without services of its own (not the parameter server). ``group``: run in a worker group of
        :mod:`lepton_ray.train.group` with this process as rank 0 (a sweep trial's warm group); ``report``
        is then called on rank 0 after every evaluation, and an exception from it stops the run on every rank.
        ``keep_warm`` (several fits in one process: a notebook, a script over configs): after a run through Ray
        Train, keep Ray up and start a warm group of this run's shape (this process as rank 0, the others helper
        actors, started beside the run at its first step when there are CPUs free for them, else when it ends); the
        next ``fit(keep_warm=True)`` of the same shape runs there, its first step in about a second instead of a Ray
        Train start-up, and a worker that dies is replaced and the run resumed from its newest
        checkpoint, at most ``scaling.max_failures`` times, as Ray Train would. Elastic and GPU runs always go
        through Ray Train. The loop, checkpoints and records are the same in all of these.
        """
        phases = {"driver_process": M.process_started(), "trainer": self._created, "fit": time.time()}
        self.plan  # plan first: every check, before Ray starts or any worker runs
        phases["planned"] = time.time()
        if local:
            s = self.config.scaling
            if s.num_workers != 1 or self.services.starts_actors():  # an elastic [min, max] is not 1 either
                plain = ", ".join(n for n, c in STRATEGIES.items() if not c.Services.starts_actors())
                raise ConfigError(f"--local: trains one worker in this process, without Ray: needs scaling.num_workers 1 (got {s.num_workers}) "
                                  f"and a strategy without services ({plain}; got sync.strategy '{self.config.sync.strategy}')")
            from lepton_ray.train.group import LocalGroup

            group = LocalGroup(s.use_gpu)
        if group is not None:
            return self._fit_in(lambda: group, report, phases)
        warm = keep_warm and not self.config.scaling.elastic and not self.config.scaling.use_gpu
        if warm:
            from lepton_ray.train.group import is_warm

            if is_warm(**self._warm_shape()):
                return self._fit_warm(phases)
        return self._fit_ray_train(phases, keep_warm=warm)

    def _fit_ray_train(self, phases: dict[str, Optional[float]], *, keep_warm: bool) -> Result:
        """A run in a Ray Train worker group; ``keep_warm``: then start this process's warm group of the run's shape."""
        import ray
        import ray.train
        import ray.util.scheduling_strategies
        from ray.train.torch import TorchConfig, TorchTrainer

        cfg = self.config
        s = cfg.scaling
        helpers = (s.num_workers - 1) * s.cpus_per_worker if keep_warm else 0  # a local instance gets CPUs for them too
        started = ensure_ray(min_cpus=s.max_workers * s.cpus_per_worker, extra_cpus=data_cpus(self.config) + helpers, verbose=self.verbose)
        phases["ray"] = time.time()
        try:
            if s.use_gpu and ray.cluster_resources().get("GPU", 0) < s.min_workers:
                raise ConfigError(f"scaling.use_gpu: {s.min_workers} workers need {s.min_workers} GPUs; the Ray cluster has {ray.cluster_resources().get('GPU', 0):g}")
            check_paths_reachable(cfg, self.node_local_paths)  # a worker on another node could not read a local path
            workers, cpus, extra = s.max_workers * s.cpus_per_worker, ray.cluster_resources().get("CPU", 0), data_cpus(cfg)
            if extra and cpus < workers + extra and not cfg.data.transform_resources.resources:
                log.warning("data.cpus: the Ray cluster has %g CPUs; the workers take %g and data.engine ray_data asks %g more:"
                            " its tasks will wait for CPUs (add nodes, or pin them with data.transform_resources.resources)",
                            cpus, workers, extra)
            self._start_run_dir()
            here = ray.get_runtime_context().get_node_id()
            sink = M.MetricsSink.options(
                scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(here, soft=False)
            ).remote(str((self.run_dir / "metrics.jsonl").resolve()), cfg.run.tensorboard)
            services = self.services.start(self._model, self.checkpoint_uri, self.run_name)
            spec = LoopSpec(cfg.to_dict(), self.train_info, self.eval_info, self.checkpoint_uri, sink, services=services, phases=phases,
                            callables=self._callables(), splits=self._splits())
            resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
            trainer = TorchTrainer(
                _worker_entry,
                train_loop_config={"spec": spec},
                torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo", timeout_s=math.ceil(cfg.train.process_group_timeout_s)),
                scaling_config=ray.train.ScalingConfig(num_workers=(s.min_workers, s.max_workers) if s.elastic else s.num_workers,
                                                       elastic_resize_monitor_interval_s=s.resize_check_s, use_gpu=s.use_gpu,
                                                       resources_per_worker=resources),
                run_config=ray.train.RunConfig(
                    name=self.run_name,
                    storage_path=str((self.run_dir / "ray").resolve()),
                    # a worker group that cannot start (a lost node's CPUs) fails the run after max_failures tries, not never
                    failure_config=ray.train.FailureConfig(max_failures=s.max_failures, controller_failure_limit=s.max_failures),
                    logging_config=ray.train.LoggingConfig(log_level=logging.getLevelName(ray_log_level(self.verbose))),
                ),
            )
            watcher = _Watcher(sink, self.progress, self.run_name, on_first_step=self._warm_beside if keep_warm else None)
            watcher.start()
            watchdog = Watchdog(sink, cfg.train.collective_timeout_s, self.run_dir / "stacks")
            watchdog.start()
            phases["ray_train"] = time.time()  # TorchTrainer.fit() called
            try:
                with _ray_train_env(s):
                    trainer.fit()
            except Exception as exc:  # Ray wraps worker errors; keep the worker's message, after the watchdog's
                stuck = f"{watchdog.diagnosis}\n" if watchdog.diagnosis else ""
                raise TrainingError(f"training run '{self.run_name}' failed: {stuck}{exc}") from exc
            finally:
                watchdog.stop()
                watcher.stop()
                with contextlib.suppress(Exception):  # a failed run's TensorBoard file too (an "end" record closes it)
                    ray.get(sink.close.remote(), timeout=10)
                ray.kill(sink)  # drained; not left to garbage collection (an error's traceback keeps the handle alive)
                self.services.stop(services)
            result = self._result(watcher.records, phases["fit"])
            if keep_warm:  # the next fit(keep_warm=True) of this shape: its helpers (started at the first step if there was room)
                from lepton_ray.train.group import warm_group

                warm_group(**self._warm_shape())
            return result
        finally:
            if started and not keep_warm:
                ray.shutdown()  # kept for a warm group: Ray shuts its instance down when this process exits

    def _splits(self) -> Optional[list[Any]]:
        """A user's train Dataset split once per run, one iterator per worker (None: data named by path)."""
        ds = self.train_info.dataset
        return None if ds is None else ds.streaming_split(self.config.scaling.num_workers, equal=True)

    def _callables(self) -> dict[str, Callable[..., Any]]:
        """The Python callables this run's config names (shipped with the run: a worker cannot import them)."""
        c = self.config
        return registered(c.model.factory, c.model.loss, c.data.transform)

    def _start_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(json.dumps(redact_config(self.config.to_dict()), indent=1))  # JSON is YAML

    def _warm_beside(self) -> None:
        """``keep_warm``, at the run's first step: start the warm group's helpers now, beside the run, when the cluster has
        CPUs free for them (a local instance was given them), so that the next ``fit`` finds them up. Without room they
        start when the run ends: a helper waiting for CPUs could take those of a group Ray Train restarts."""
        import ray

        from lepton_ray.train.group import warm_group

        s = self.config.scaling
        if ray.available_resources().get("CPU", 0) >= (s.num_workers - 1) * s.cpus_per_worker:
            log.info("keep_warm: the warm group's helpers start beside the run")
            warm_group(**self._warm_shape())

    def _fit_warm(self, phases: dict[str, Optional[float]]) -> Result:
        """A run in this process's warm group; a failed group is replaced by a fresh one and the run resumes from
        its newest checkpoint, at most ``scaling.max_failures`` times (what Ray Train does for its groups)."""
        from lepton_ray.train.group import warm_group

        check_paths_reachable(self.config, self.node_local_paths)
        return self._fit_in(lambda: warm_group(**self._warm_shape()), None, phases, retries=self.config.scaling.max_failures)

    def _warm_shape(self) -> dict[str, Any]:
        """The warm group a run of this config trains in: its workers, their CPUs, and how long a collective may wait
        (no watchdog runs there: a stuck rank fails its collective then, a failure like any other)."""
        s = self.config.scaling
        return {"world": s.num_workers, "cpus_per_worker": s.cpus_per_worker, "timeout_s": self.config.train.process_group_timeout_s}

    def _fit_in(self, group_of: Callable[[], Any], report: Optional[Callable[[dict[str, Any]], None]],
                phases: dict[str, Optional[float]], retries: int = 0) -> Result:
        self._start_run_dir()
        sink = M.Sink(str((self.run_dir / "metrics.jsonl").resolve()), self.config.run.tensorboard)
        services = self.services.start(self._model, self.checkpoint_uri, self.run_name)
        spec = LoopSpec(self.config.to_dict(), self.train_info, self.eval_info, self.checkpoint_uri, sink, services=services, phases=phases,
                        callables=self._callables(), splits=self._splits())
        try:
            for attempt in range(retries + 1):
                group = group_of()
                if group.world != self.config.scaling.num_workers:
                    raise ConfigError(f"scaling.num_workers: {self.config.scaling.num_workers}, but the worker group has {group.world}")
                try:
                    group.run(spec, report)
                    break
                except ConfigError:
                    raise
                except Exception as exc:  # a worker died or failed: the group closed itself; a fresh one resumes the run
                    if not retries:
                        raise  # a sweep trial's group, a local run: its own error (for Tune, for the debugger)
                    if attempt == retries:
                        raise TrainingError(f"training run '{self.run_name}' failed in its warm worker group after {retries}"
                                            f" restart(s): {type(exc).__name__}: {exc}") from exc
                    print(f"lepton_ray: the warm worker group of run '{self.run_name}' failed ({type(exc).__name__}: {exc});"
                          f" restarting it from the newest checkpoint ({attempt + 1} of {retries})", file=sys.stderr, flush=True)
        finally:
            self.services.stop(services)
            sink.close()
        records = sink.drain()
        warn_stragglers(records)
        return self._result(records, phases["fit"])

    def _result(self, records: list[dict[str, Any]], fit_called: float) -> Result:
        end = next((r for r in reversed(records) if r.get("event") == "end"), None)
        if end is None:
            raise TrainingError(f"training run '{self.run_name}' ended without its final record; see the worker logs above")
        starts = [r for r in records if r.get("event") == "start"]
        first = next((r for r in reversed(records) if r.get("event") == "first_step"), None)
        losses = [r for r in records if M.TRAIN_LOSS in r]
        metrics: dict[str, Any] = {
            M.TRAIN_LOSS: losses[-1][M.TRAIN_LOSS] if losses else None,
            **{k: v for k, v in end.items() if k.startswith(M.EVAL_PREFIX)},
            "steps": end[M.STEP],
        }
        done = end[M.STEP] - (first[M.STEP] if first else 0)
        last_time = losses[-1]["time"] if losses else None
        if first and last_time and done > 0 and last_time > first["time"]:
            metrics[M.SAMPLES_PER_S] = done * self.config.train.batch_size / (last_time - first["time"])
        else:
            metrics[M.SAMPLES_PER_S] = None
        metrics["time_to_first_step_s"] = (first["time"] - fit_called) if first else None
        metrics.update(self.baseline)
        result = Result(
            metrics=metrics,
            checkpoint=end.get("checkpoint"),
            run_dir=str(self.run_dir),
            resumed_from=starts[-1].get("resumed_from") if starts else None,
            records=records,
        )
        (self.run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        return result


RAY_TRAIN_ENV = {"poll_interval_s": "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                 "worker_start_timeout_s": "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"}
"""``scaling`` keys that are Ray Train settings it reads from the environment (its driver hands them to its controller)."""


@contextlib.contextmanager
def _ray_train_env(scaling: Any) -> Iterator[None]:
    """:data:`RAY_TRAIN_ENV` from ``scaling`` for the ``fit()`` inside; a variable the user set wins."""
    ours = {var: repr(float(getattr(scaling, key))) for key, var in RAY_TRAIN_ENV.items() if var not in os.environ}
    os.environ.update(ours)
    try:
        yield
    finally:
        for var in ours:
            os.environ.pop(var, None)


def _worker_entry(config: dict[str, Any]) -> None:
    spec: LoopSpec = config["spec"]
    spec.phases.update(worker_process=M.process_started(), worker_entry=time.time())  # this worker's copy of the spec
    ctx = WorkerContext.from_ray(use_gpu=spec.config["scaling"]["use_gpu"])
    guard = WorkerGuard(spec.sink, ctx.rank)  # heartbeats to the sink's board; SIGTERM -> a just-in-time checkpoint
    guard.install_sigterm()
    try:
        train_loop(spec, ctx, guard)
    except Exception as exc:  # the driver says why this attempt ended (Ray Train logs it at INFO only)
        if not isinstance(exc, Preempted):  # a preemption has its own record
            import ray

            with contextlib.suppress(Exception):
                ray.get(spec.sink.log.remote([failure_record(ctx.rank, exc, time.time())]), timeout=5)
        raise
    finally:
        guard.close()


def warn_stragglers(records: list[dict[str, Any]], bar: Any = None) -> None:
    """Print each ``straggler`` record's warning (beside a progress bar without breaking it)."""
    for r in records:
        if r.get("event") == "straggler":
            text = f"lepton_ray: warning: {r['message']}"
            bar.write(text, file=sys.stderr) if bar is not None else print(text, file=sys.stderr, flush=True)


class _Watcher(threading.Thread):
    """Drains the metrics sink (which appends metrics.jsonl itself): keeps the records, drives the progress bar, and
    shows what they say about stalls and restarts (:class:`~lepton_ray.train.events.RunEvents`), bar or no bar."""

    def __init__(self, sink: Any, progress: bool, name: str, on_first_step: Optional[Callable[[], None]] = None):
        super().__init__(daemon=True)
        self.sink, self.progress, self.name, self._on_first_step = sink, progress, name, on_first_step
        self.records: list[dict[str, Any]] = []
        self.events = RunEvents(name)
        self._stop_event = threading.Event()
        self._bar: Any = None
        self._post: dict[str, str] = {}

    def run(self) -> None:
        while not self._stop_event.wait(1.0):  # each drain is an actor call: 1 Hz keeps the bar live without stealing CPU from training
            self._drain()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self._drain()
        if self._bar is not None:
            self._bar.close()

    def _drain(self) -> None:
        import ray

        try:
            new = ray.get(self.sink.drain.remote(), timeout=30)
        except Exception:  # the sink is gone (cluster shutting down): nothing more to read
            return
        if not new:
            return
        self.records.extend(new)
        if self.progress:
            self._update_bar(new)
        warn_stragglers(new, self._bar)
        for line in self.events.lines(new):
            say(line)
        if self._on_first_step is not None and any(r.get("event") == "first_step" for r in new):
            call, self._on_first_step = self._on_first_step, None
            try:
                call()
            except Exception as exc:  # an optional head start: the run goes on, the helpers start after it instead
                log.warning("keep_warm: could not start the warm group beside the run (%s); it starts when the run ends", exc)

    def _update_bar(self, new: list[dict[str, Any]]) -> None:
        for r in new:
            if r.get("event") == "start":
                if self._bar is None:
                    self._bar = progress_bar(r["total_steps"], self.name, "step")
                self._bar.n = self._bar.last_print_n = r[M.STEP]
            elif self._bar is not None and M.STEP in r:
                if M.TRAIN_LOSS in r:
                    self._post.update({"loss": f"{r[M.TRAIN_LOSS]:.4f}", "samples/s": f"{r[M.SAMPLES_PER_S]:.0f}"})
                acc = r.get(f"{M.EVAL_PREFIX}accuracy")
                if acc is not None:
                    self._post["eval_acc"] = f"{acc:.4f}"
                self._bar.set_postfix(self._post, refresh=False)
                self._bar.update(r[M.STEP] - self._bar.n)  # redraws only when mininterval has passed
