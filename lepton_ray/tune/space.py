"""The search space, pure: which keys may be swept, what a trial's config is, how long a trial is.

Nothing here needs Ray, so the checks run when the config is loaded (before Ray
starts) and are unit-tested without a cluster.

>>> cfg = load_config({"data": {"train": "t.parquet", "eval": "e.parquet"},
...                    "train": {"lr": 0.1, "batch_size": 64},
...                    "sweep": {"space": {"train.batch_size": {"choice": [32, 128]}}, "scale_lr_with_batch": "linear"}})
>>> trial_config(cfg.to_dict(), {"train.batch_size": 128}, cfg.sweep)["train"]["lr"]
0.2
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from typing import Any

from lepton_ray.config import Config, ConfigError, SweepConfig, _show, load_config

__all__ = [
    "sweepable_keys",
    "check_sweep",
    "resolve_mode",
    "trial_config",
    "evaluation_index",
    "max_evaluations",
    "trial_schedule",
    "trial_resources",
    "trial_bundles",
    "concurrent_trials",
    "LR_KEY",
    "BATCH_KEY",
]

LR_KEY, BATCH_KEY = "train.lr", "train.batch_size"
_NOT_SWEPT = ("run", "sweep")  # where a trial's files go, and the sweep itself
_SCHEDULE_KEYS = (BATCH_KEY, "train.epochs", "train.max_steps", "train.eval_every_steps")  # what sets a trial's length
_METRICS = {"classification": ("eval_accuracy", "eval_loss"), "regression": ("eval_mse", "eval_loss")}


def sweepable_keys() -> list[str]:
    """Every leaf key path of the config a sweep may vary (``train.lr``, ``sync.allreduce.bucket_mb``, ...)."""

    from lepton_ray.sync import SECTIONS  # the strategies' own sections: sync.allreduce, sync.fsdp, ...

    def walk(cls: type, prefix: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        keys = []
        for f in dataclasses.fields(cls):
            if not prefix and f.name in _NOT_SWEPT:
                continue
            if f.name == getattr(cls, "OPEN", None):
                keys += [k for key, section in SECTIONS.items() for k in walk(section, f"{prefix}{key}.")]
            elif dataclasses.is_dataclass(hints[f.name]):
                keys += walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                keys.append(f"{prefix}{f.name}")
        return keys

    return walk(Config, "")


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = raw
    for s in sections:
        node = node.setdefault(s, {})
    node[leaf] = value


def _get(raw: dict[str, Any], key: str) -> Any:
    node = raw
    for part in key.split("."):
        node = node[part]
    return node


def _plain(value: Any) -> Any:
    """numpy scalars (what Tune samples) -> Python numbers, so configs stay plain YAML data."""
    return value.item() if hasattr(value, "item") else value


def resolve_mode(sweep: SweepConfig) -> str:
    """``auto`` -> max for accuracy, min for losses and errors."""
    if sweep.mode != "auto":
        return sweep.mode
    return "max" if "accuracy" in sweep.metric else "min"


def trial_config(base: dict[str, Any], params: dict[str, Any], sweep: SweepConfig) -> dict[str, Any]:
    """The config dict of one trial: ``base`` with the sampled ``params`` set, the lr scaled with the
    batch size when ``sweep.scale_lr_with_batch`` says so, and no sweep section."""
    raw = copy.deepcopy(base)
    raw.pop("sweep", None)
    for key, value in params.items():
        _set(raw, key, _plain(value))
    if sweep.scale_lr_with_batch != "none":
        reference = sweep.reference_batch_size or _get(base, BATCH_KEY)
        ratio = _get(raw, BATCH_KEY) / reference
        factor = ratio if sweep.scale_lr_with_batch == "linear" else math.sqrt(ratio)
        _set(raw, LR_KEY, _get(raw, LR_KEY) * factor)
    return raw


def _candidates(dist: dict[str, Any]) -> list[Any]:
    """The values a distribution's checks must pass for: every choice, or both ends of a range."""
    kind, args = next(iter(dist.items()))
    if kind == "choice":
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]  # Tune's randint excludes high
    return list(args)


def _corners(space: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of candidate values (ranges contribute their two ends)."""
    combos: list[dict[str, Any]] = [{}]
    for key, dist in space.items():
        combos = [{**c, key: v} for c in combos for v in _candidates(dist)]
    return combos


def check_sweep(cfg: Config) -> None:
    """Raise :class:`ConfigError` unless every swept key exists and every value a trial can draw
    gives a valid config; the metric must be one the run reports."""
    s = cfg.sweep
    keys = sweepable_keys()
    for key in s.space:
        if key not in keys:
            hint = difflib.get_close_matches(key, keys, n=1)
            near = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"sweep.space.{key}: not a config key{near}; a key is section.field, e.g. train.lr or train.batch_size")
    valid = _METRICS[cfg.model.task]
    if s.metric not in valid:
        raise ConfigError(f"sweep.metric: {_show(s.metric)} is not reported for model.task '{cfg.model.task}'; choose one of: {', '.join(valid)}")
    if cfg.data.eval is None:
        raise ConfigError(f"sweep.metric: {s.metric} comes from evaluation; set data.eval (held-out data) to sweep")
    base = cfg.to_dict()
    if len(s.space) > 6:  # 2^k corner configs: check each key alone instead
        combos = [{k: v} for k, d in s.space.items() for v in _candidates(d)]
    else:
        combos = _corners(s.space)
    from lepton_ray.checks import check_config

    for params in combos:
        try:
            check_config(load_config(trial_config(base, params, s)))
        except ConfigError as exc:
            drawn = ", ".join(f"{k}={_show(v)}" for k, v in params.items())
            raise ConfigError(f"sweep.space: a trial with {drawn} would be invalid: {exc}") from None


def evaluation_index(step: int, interval: int, total: int) -> int:
    """How many evaluations the loop has done after ``step``: one every ``interval`` steps
    (``train.eval_every_steps``, or one epoch of steps) and always one at the last step.

    >>> [evaluation_index(s, 10, 25) for s in (9, 10, 20, 25)]
    [0, 1, 2, 3]
    """
    return step // interval + (1 if step == total and total % interval else 0)


def trial_schedule(raw: dict[str, Any], num_rows: int) -> tuple[int, int]:
    """``(interval, total)`` steps of a trial config, for :func:`evaluation_index`."""
    cfg = load_config(raw)
    steps_per_epoch = num_rows // cfg.train.batch_size
    total = cfg.train.max_steps if cfg.train.max_steps is not None else cfg.train.epochs * steps_per_epoch
    return cfg.train.eval_every_steps or steps_per_epoch, total


def max_evaluations(cfg: Config, num_rows: int) -> int:
    """The most evaluations any trial of the sweep can do (ASHA's horizon)."""
    base = cfg.to_dict()
    timing = {k: d for k, d in cfg.sweep.space.items() if k in _SCHEDULE_KEYS}
    return max(evaluation_index(total, interval, total)
               for interval, total in (trial_schedule(trial_config(base, p, cfg.sweep), num_rows) for p in _corners(timing)))


def trial_bundles(cfg: Config) -> list[dict[str, float]]:
    """A trial's placement group: one bundle per training worker (bundle 0 is the trial actor, rank 0)."""
    s = cfg.scaling
    return [{"CPU": float(s.cpus_per_worker), **({"GPU": 1.0} if s.use_gpu else {})} for _ in range(s.max_workers)]


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial holds while it runs: its training workers (the trial actor is rank 0)."""
    need: dict[str, float] = {}
    for bundle in trial_bundles(cfg):
        for k, v in bundle.items():
            need[k] = need.get(k, 0.0) + v
    return need


def _fits(need: dict[str, float], have: dict[str, float]) -> int:
    return min(int(have.get(k, 0.0) // v) for k, v in need.items())


def concurrent_trials(cfg: Config, total: dict[str, float], free: dict[str, float]) -> int:
    """How many trials to run at once: ``sweep.max_concurrent_trials`` if the cluster can hold that
    many, else as many as its free resources fit now (at least 1, at most ``num_samples``).

    >>> cfg = load_config({"data": {"train": "t", "eval": "e"}, "sweep": {"space": {"train.lr": {"choice": [0.1]}}}})
    >>> concurrent_trials(cfg, total={"CPU": 4.0}, free={"CPU": 4.0})   # each trial: 2 workers
    2
    """
    s, sc = cfg.sweep, cfg.scaling
    need = trial_resources(cfg)
    what = f"{sc.max_workers} workers x {sc.cpus_per_worker:g} CPU"
    have = ", ".join(f"{total.get(k, 0.0):g} {k}" for k in need)
    at_most = _fits(need, total)
    if at_most < 1:
        wants = ", ".join(f"{v:g} {k}" for k, v in need.items())
        raise ConfigError(f"sweep: one trial needs {wants} ({what}); the Ray cluster has {have}")
    if s.max_concurrent_trials is not None:
        if s.max_concurrent_trials > at_most:
            n = s.max_concurrent_trials
            wants = ", ".join(f"{n * v:g} {k}" for k, v in need.items())
            raise ConfigError(
                f"sweep.max_concurrent_trials: {n} trials at once need {wants} (each: {what}); "
                f"the Ray cluster has {have}, enough for {at_most} at a time"
            )
        return s.max_concurrent_trials
    return max(1, min(_fits(need, free), at_most, s.num_samples))
