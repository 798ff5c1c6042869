"""``lepton-ray sweep``: a learning-rate / batch-size search on Ray Tune, each trial a normal training run.

A Tune *function trainable* per trial builds the trial's config and runs
:class:`~lepton_ray.train.Trainer` in a warm worker group (:mod:`lepton_ray.train.group`):
the trial actor itself is rank 0, helper actors in the trial's placement group are the
other ranks, and Tune reuses the actor, its helpers and their process group for the next
trial, so a trial starts in well under a second instead of a Ray Train worker group's ~15 s
(the same loop, so a trial equals the same config under ``lepton-ray train`` to the bit).
Rank 0 reports every evaluation to Tune, so ASHA can stop a poor trial early; a failed
trial is retried up to ``scaling.max_failures`` times from its newest checkpoint.

Layout of a sweep (``<sweep.dir>/<name>/``)::

    config.json         the config the sweep was started with (a re-run must match it)
    tune/               Ray Tune's experiment state (what Tuner.restore continues)
    trials/<trial_id>/  each trial's run: trial.json, metrics.jsonl, result.json, checkpoints/
    sweep_results.csv   one row per trial
    sweep.png           metric vs lr, coloured by batch size, early-stopped trials marked
    best.json           the best trial's config and checkpoint URI

Resume: running the same sweep again continues it. Tune restores the unfinished
trials; a trial whose ``result.json`` exists is not trained again, and an
unfinished trial resumes from its newest committed checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import ray
from ray import tune

from lepton_ray.checks import check_config
from lepton_ray.config import Config, ConfigError, SweepConfig, load_config
from lepton_ray.console import environ, progress_bar, say
from lepton_ray.storage import join
from lepton_ray.train.group import warm_group
from lepton_ray.train.plan import can_resume, check_run, describe_data
from lepton_ray.train.trainer import Trainer, data_cpus, ensure_ray
from lepton_ray.tune import results as R
from lepton_ray.tune.space import (
    BATCH_KEY, LR_KEY, concurrent_trials, evaluation_index, max_evaluations, resolve_mode, trial_bundles, trial_config, trial_schedule,
)

__all__ = ["sweep", "SweepResult"]

EVALUATION = "evaluation"  # ASHA's time axis: evaluations done (one per epoch by default)
REPORTED_AT = "reported_at"  # wall time of the report (the table's ordering of trials in time)


@dataclass
class SweepResult:
    """What a sweep produced. ``best`` is ``best.json``; ``trials`` the rows of ``sweep_results.csv``.

    >>> r = SweepResult(best={"trial": "t1", "eval_accuracy": 0.97, "checkpoint": "sweeps/s/trials/t1/checkpoints/step_00000200"},
    ...                 trials=[], dir="sweeps/s", metric="eval_accuracy", mode="max", max_concurrent_trials=1)
    >>> r.best["checkpoint"].endswith("step_00000200")
    True
    """

    best: Optional[dict[str, Any]]
    trials: list[dict[str, Any]]
    dir: str
    metric: str
    mode: str
    max_concurrent_trials: int
    resumed: bool = False
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**(self.best or {}), "sweep_dir": self.dir, "num_trials": len(self.trials),
                "stopped_early": sum(t["status"] == R.STOPPED for t in self.trials)}


# --------------------------------------------------------------------------- paths


def _local_abs(path: Optional[str]) -> Optional[str]:
    """Trials run in Tune's actors with another working directory: make local paths absolute."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _absolute(cfg: Config) -> dict[str, Any]:
    raw = cfg.to_dict()
    raw["data"]["train"] = _local_abs(raw["data"]["train"])
    raw["data"]["eval"] = _local_abs(raw["data"]["eval"])
    raw["run"]["dir"] = _local_abs(raw["run"]["dir"])
    raw["checkpoint"]["dir"] = _local_abs(raw["checkpoint"]["dir"])
    raw["sweep"]["dir"] = _local_abs(raw["sweep"]["dir"])
    return raw


# --------------------------------------------------------------------------- one trial (runs in a Tune actor)


def _trial_raw(plan: dict[str, Any], params: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """The config of trial ``trial_id``: the sweep's, with ``params`` set, run in ``<trials>/<trial_id>``."""
    raw = trial_config(plan["config"], params, plan["sweep"])
    raw["run"] = {"name": trial_id, "dir": plan["trials_dir"]}
    if raw["checkpoint"]["dir"] is not None:
        raw["checkpoint"]["dir"] = join(raw["checkpoint"]["dir"], plan["name"])
    return raw


def _run_trial(params: dict[str, Any], plan: dict[str, Any]) -> None:
    """Tune's function trainable: one trial = one lepton_ray training run with ``params`` set, in this
    (reused) trial actor's warm worker group: rank 0 is this process, and it reports every evaluation
    to Tune, with the evaluation count (ASHA's time axis; counted from the step, so a trial resumed from
    a checkpoint carries on counting where it stopped)."""
    import ray.tune

    launched = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    raw = _trial_raw(plan, params, trial_id)
    cfg = load_config(raw)
    s = cfg.scaling
    group = warm_group(s.max_workers, s.cpus_per_worker, s.use_gpu, cfg.train.process_group_timeout_s)  # a new actor's helpers start while the trial plans
    interval, total = trial_schedule(raw, plan["num_rows"])
    run_dir = Path(plan["trials_dir"]) / trial_id

    def report(metrics: dict[str, Any]) -> None:
        ray.tune.report({**metrics, EVALUATION: evaluation_index(int(metrics["step"]), interval, total), REPORTED_AT: time.time()})

    done = run_dir / "result.json"
    if done.exists():  # it finished before the sweep was interrupted: hand Tune its result, train nothing
        final = json.loads(done.read_text())
        report({**{k: v for k, v in final.items() if k.startswith("eval_")}, "step": final["steps"]})
        return

    resume = can_resume(cfg)  # from its newest committed checkpoint; else afresh, in its own cleared directory
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    # planned on the sweep's data description (no storage listed for the data again): this trial checks only what its
    # swept keys change
    trainer = Trainer(cfg, resume=resume, progress=False, data_plan=plan["data"])
    if trainer.run_name != trial_id:  # explicit per-trial names: nothing else may claim this directory
        raise RuntimeError(f"trial {trial_id}: its run directory is taken ({trainer.run_dir})")
    info_path = run_dir / "trial.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"trial": trial_id, "params": params, "config": raw,
                                                                        "checkpoint_uri": trainer.checkpoint_uri, "launches": []}
    info["launches"].append(launched)
    info.setdefault("pids", []).append(os.getpid())  # a reused (warm) trial actor shows up as a repeated pid
    run_dir.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(info, indent=1, default=str) + "\n")
    trainer.fit(group=group, report=report)


# --------------------------------------------------------------------------- the driver


class _Progress(tune.Callback):
    """The sweep's progress: a bar on stderr (trials done of ``num_samples``, the best ``metric`` reported so far and
    its trial), and the trials table on stdout whenever a trial ends."""

    def __init__(self, trials_dir: str, space: list[str], metric: str, mode: str, num_samples: int, name: str):
        self.trials_dir, self.space, self.metric, self.mode = trials_dir, space, metric, mode
        self.num_samples, self.name = num_samples, name
        self.bar: Any = None  # made at the first trial's result: Tune pickles its callbacks with the experiment state
        self.ended: set[str] = set()  # Tune calls on_trial_complete before it marks the trial TERMINATED

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "bar": None}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def done(self, trials: list[Any]) -> int:
        return len(self.ended | {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")})

    def _update(self, trials: list[Any]) -> None:
        if self.bar is None:
            self.bar = progress_bar(self.num_samples, f"sweep {self.name}", "trial")
        scores = [(t.last_result[self.metric], t.trial_id) for t in trials
                  if isinstance((t.last_result or {}).get(self.metric), (int, float))]
        if scores:
            value, trial = (max if self.mode == "max" else min)(scores)
            self.bar.set_postfix({f"best {self.metric}": f"{value:.4f}", "trial": trial}, refresh=False)
        self.bar.update(self.done(trials) - self.bar.n)

    def _ended(self, trials: list[Any], trial: Any) -> None:
        self.ended.add(trial.trial_id)
        self._update(trials)
        rows = [_row(Path(self.trials_dir), t, self.space, self.metric) for t in trials]
        say(f"\n== sweep: {self.done(trials)}/{self.num_samples} trials done ==\n{R.format_table(rows, self.metric)}", file=sys.stdout)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._update(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()  # Tune may run a copy of this callback: the copy's bar ends here


def _row(trials_dir: Path, trial: Any, space: list[str], metric: str) -> R.TrialRow:
    """A table row from a live Tune ``Trial``."""
    params = {k: trial.config.get(k) for k in space}
    return R.trial_row(trials_dir, trial.trial_id, params, trial.last_result or {}, metric, trial.status,
                       error=trial.status == "ERROR")


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _tune_space(space: dict[str, Any]) -> dict[str, Any]:
    make = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}
    out = {}
    for key, dist in space.items():
        kind, args = next(iter(dist.items()))
        out[key] = tune.choice(list(args)) if kind == "choice" else make[kind](*args)
    return out


def _search(cfg: Config, concurrency: int) -> Any:
    """The search algorithm, holding at most ``concurrency`` trials at once (TuneConfig's
    max_concurrent_trials is silently ignored for BasicVariantGenerator, so it is set here)."""
    s = cfg.sweep
    if s.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("sweep.search: 'optuna' needs the optuna package (pip install optuna); or use 'random'") from None
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=s.seed), max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrency)


def _scheduler(cfg: Config, mode: str, num_rows: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.sweep.scheduler == "fifo":
        return FIFOScheduler()
    a = cfg.sweep.asha
    horizon = max_evaluations(cfg, num_rows)
    grace = a.grace_period or max(1, horizon // a.reduction_factor**2)
    # max_t one past the longest trial: ASHA must never cut a trial at its own last evaluation
    return ASHAScheduler(time_attr=EVALUATION, max_t=horizon + 1, grace_period=grace, reduction_factor=a.reduction_factor)


def _plan(raw: dict[str, Any], sweep_cfg: SweepConfig, name: str, trials_dir: Path) -> dict[str, Any]:
    """What every trial gets: the sweep's config and where it writes, and its data described once, here (built
    here too, not by racing trials), with the base config's checks (columns, batch size, the model on 2 rows) run
    before any trial starts. A trial re-checks only what its swept keys change."""
    base = load_config(trial_config(raw, {}, sweep_cfg))
    data = describe_data(base, {})
    check_run(base, data)
    return {"config": raw, "sweep": sweep_cfg, "name": name, "trials_dir": str(trials_dir), "num_rows": data.train.num_rows,
            "data": data}


def sweep(config: Union[Config, dict, str, os.PathLike], *, resume: Optional[bool] = None, progress: bool = True,
          verbose: bool = False) -> SweepResult:
    """Run (or continue) the sweep that ``config``'s ``sweep:`` section describes.

    ``resume``: None = continue the sweep if ``<sweep.dir>/<name>`` holds one, else start it;
    True = it must exist; False = it must not. ``progress``: a bar of the trials done and the best so far, and the
    trials table as trials end. ``verbose``: Ray's INFO lines too (:mod:`lepton_ray.console`).

    >>> import lepton_ray
    >>> cfg = lepton_ray.load_config("examples/digits_sweep.yaml")  # doctest: +SKIP
    >>> result = lepton_ray.sweep(cfg)  # doctest: +SKIP
    >>> result.best["eval_accuracy"] > 0.93, result.best["checkpoint"]  # doctest: +SKIP
    (True, '.../sweeps/digits_sweep/trials/..._00002/checkpoints/step_00000180')
    """
    cfg = check_config(config if isinstance(config, Config) else load_config(config))
    s = cfg.sweep
    if not s.enabled:
        raise ConfigError("sweep.space: nothing to sweep; add e.g. sweep: {space: {train.lr: {loguniform: [1.0e-4, 1.0]}}}")
    raw = _absolute(cfg)
    name = s.name or cfg.run.name
    sweep_dir = Path(raw["sweep"]["dir"]) / name
    tune_dir, trials_dir = sweep_dir / "tune", sweep_dir / "trials"
    metric, mode = s.metric, resolve_mode(s)

    plan = _plan(raw, s, name, trials_dir)
    num_rows = plan["num_rows"]
    batches = [v for v in (s.space.get(BATCH_KEY, {}).get("choice") or []) if isinstance(v, int)]
    for b in batches or [cfg.train.batch_size]:
        if b > num_rows:
            raise ConfigError(f"sweep.space.{BATCH_KEY}: {b} is larger than data.train ({num_rows} rows)")

    saved = sweep_dir / "config.json"
    exists = tune.Tuner.can_restore(str(tune_dir))
    if resume and not exists:
        raise ConfigError(f"--resume: there is no sweep '{name}' to resume under '{sweep_dir}'")
    if exists and resume is False:
        raise ConfigError(f"sweep '{name}' already exists under '{sweep_dir}'; run it again to continue it, or set sweep.name")
    if exists and saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(raw)):
        raise ConfigError(f"sweep '{name}' under '{sweep_dir}' was started with a different config; "
                          "run it with the same config to continue it, or set another sweep.name")

    started = ensure_ray(min_cpus=cfg.scaling.max_workers * cfg.scaling.cpus_per_worker, extra_cpus=data_cpus(cfg), verbose=verbose)
    # Tuner.restore takes no new callbacks: a continued sweep shows the table at its end only
    shown = _Progress(str(trials_dir), list(s.space), metric, mode, s.num_samples, name) if progress and not exists else None
    try:
        concurrency = concurrent_trials(cfg, ray.cluster_resources(), ray.available_resources())
        trainable = tune.with_resources(tune.with_parameters(_run_trial, plan=plan), tune.PlacementGroupFactory(trial_bundles(cfg)))
        if exists:
            print(f"continuing sweep '{name}' from {sweep_dir}", flush=True)
            tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(raw, indent=1) + "\n")
            callbacks = [shown] if shown else []
            tuner = tune.Tuner(
                trainable,
                param_space=_tune_space(s.space),
                tune_config=tune.TuneConfig(
                    metric=metric, mode=mode, num_samples=s.num_samples,
                    search_alg=_search(cfg, concurrency), scheduler=_scheduler(cfg, mode, num_rows),
                    trial_dirname_creator=_trial_dirname, reuse_actors=True,  # the next trial starts in a warm actor
                ),
                run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), callbacks=callbacks, verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=cfg.scaling.max_failures)),
            )
        with environ({} if verbose else {"RAY_AIR_NEW_OUTPUT": "0"}):  # Tune's old output engine: silent at verbose=0
            grid = tuner.fit()
    finally:
        if shown:
            shown.close()
        if started:
            ray.shutdown()

    rows = []
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name  # Tune may suffix a restored trial's dir
        params = {k: r.config.get(k) for k in s.space}
        rows.append(R.trial_row(trials_dir, trial_id, params, r.metrics or {}, metric, "TERMINATED", error=r.error is not None))
    frame = R.results_frame(rows)
    rows = frame.to_dict("records")
    csv_path = sweep_dir / "sweep_results.csv"
    frame.to_csv(csv_path, index=False)
    plot_x = LR_KEY if LR_KEY in s.space else next(iter(s.space))
    log_x = next(iter(s.space[plot_x])) == "loguniform" or plot_x == LR_KEY
    plot_path = R.write_plot(rows, metric, sweep_dir / "sweep.png", x="lr" if plot_x == LR_KEY else plot_x, log_x=log_x)
    best = R.best_row(rows, metric, mode)
    best_out = None
    if best is not None:
        info = json.loads((trials_dir / best["trial"] / "trial.json").read_text())
        best_out = {"trial": best["trial"], "metric": metric, "mode": mode, metric: best[metric], "status": best["status"],
                    "params": {k: best[k] for k in s.space}, "checkpoint": best["checkpoint"],
                    "run_dir": str(trials_dir / best["trial"]), "config": info["config"]}
    (sweep_dir / "best.json").write_text(json.dumps(best_out, indent=1, default=str) + "\n")
    print(f"\n== sweep '{name}': {len(rows)} trials ==\n{R.format_table(rows, metric)}", flush=True)
    return SweepResult(best=best_out, trials=rows, dir=str(sweep_dir), metric=metric, mode=mode,
                       max_concurrent_trials=concurrency, resumed=exists,
                       files={"csv": str(csv_path), "plot": str(plot_path), "best": str(sweep_dir / "best.json")})
