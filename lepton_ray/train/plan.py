"""The driver's planning step: all a run learns from storage and from its model before any worker starts.

``Trainer(cfg)`` only stores its arguments. :func:`make_plan` (called first thing by ``fit()``, before Ray
starts) reads what there is to read, once: it describes the data (:func:`describe_data`: the splits' files
and columns, the class counts, the columns after ``data.transform``, a two-row sample), checks the run on it
(:func:`check_run`: batch sizes, one forward pass and loss, the strategy's own checks) and finds where the
run's checkpoints go or which one it resumes from. Every error a config can cause comes from here, before
any worker exists.

A sweep describes its data once and hands the :class:`DataPlan` to every trial; a trial then checks only what
its swept keys change (batch size, model kwargs) and finds its own resume point.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from lepton_ray.config import Config, ConfigError
from lepton_ray.data.builders import build_data
from lepton_ray.data.plan import steps_in_epoch
from lepton_ray.data.schema import Column, Schema, decode, resolve_columns
from lepton_ray.data.table import TableInfo, data_exists, describe, load_arrays
from lepton_ray.data.transform import load_transform
from lepton_ray.models import build_model
from lepton_ray.storage import arrow_filesystem, filesystem, is_local, join
from lepton_ray.sync import STRATEGIES
from lepton_ray.train import metrics as M
from lepton_ray.train.checkpoint import CheckpointStore, load_model, open_checkpoint
from lepton_ray.train.context import isolated
from lepton_ray.train.losses import ShapeError, default_loss, make_loss, model_inputs
from lepton_ray.train.placement import node_local_paths

__all__ = ["DataPlan", "RunPlan", "make_plan", "describe_data", "check_run", "initial_model", "unigram_bits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataPlan:
    """What the data holds, found by reading it (plain data: a sweep ships it to its trials)."""

    train: TableInfo
    eval: Optional[TableInfo]
    sample: dict[str, np.ndarray] = field(compare=False, repr=False)
    """The first 2 rows of data.train as the model sees them (after ``data.transform``)."""
    baseline: dict[str, float] = field(default_factory=dict)
    """Reference metrics computed on the driver (the unigram bits per byte of the eval split), reported beside the run's."""
    made_for: str = ""
    """The config values this description depends on (:func:`data_inputs`): a config that differs in them needs its own."""


@dataclass(frozen=True)
class RunPlan:
    """Everything ``fit()`` launches: the described data, the strategy's driver-side services, where the run writes."""

    data: DataPlan
    services: Any  # the strategy's Services (checked)
    run_name: str
    run_dir: Path
    checkpoint_uri: str
    node_local_paths: list[tuple[str, str]]  # resolved against the launch cwd


def data_inputs(cfg: Config) -> str:
    """The config values :func:`describe_data`'s result depends on: the data section, the seed (a transform's), and
    the model keys that decide class counts and the baseline."""
    m = cfg.model
    return json.dumps({"data": cfg.to_dict()["data"], "seed": cfg.train.seed, "loss": m.loss, "task": m.task,
                       "ignore_index": m.ignore_index, "metrics": m.metrics}, sort_keys=True, default=str)


def make_plan(cfg: Config, datasets: Optional[dict[str, Any]] = None, *, resume: bool = False,
              data: Optional[DataPlan] = None) -> RunPlan:
    """Plan the run of ``cfg``: describe its data (or take ``data``, described already for the same data
    inputs), check the run on it and find its run directory and checkpoints (``resume``: the newest one of
    ``run.name``). Raises ``ConfigError`` for anything wrong, before anything starts."""
    if data is None or data.made_for != data_inputs(cfg):
        data = describe_data(cfg, datasets or {})
    services = check_run(cfg, data)
    run_name, run_dir, checkpoint_uri = _resolve_run(cfg, resume)
    return RunPlan(data, services, run_name, run_dir, checkpoint_uri, node_local_paths(cfg, checkpoint_uri))


# ------------------------------------------------------------------ the data


def describe_data(cfg: Config, datasets: dict[str, Any]) -> DataPlan:
    """Build the data if ``data.builder`` says so and it is not there, describe both splits, count the classes and
    run ``data.transform`` on two rows of data.train (a transform that fails fails here)."""
    d = cfg.data
    if d.builder and not data_exists(d.train, d.storage_options) and "train" not in datasets:
        build_data(d.builder, d.train, d.eval, d.storage_options, d.builder_kwargs)
    train, eval = _describe(cfg, "train", datasets), _describe(cfg, "eval", datasets)
    if eval is not None:
        resolve_columns(train.schema, eval.schema, "data.eval", d.eval)
    train, eval, baseline = _with_classes(cfg, train, eval)
    sample = _sample(cfg, train)
    transform = load_transform(d, cfg.train.seed)
    if transform is not None:  # the schema the model sees is the one after it, found by running it on the sample
        transformed, sample = transform.on_sample(train.schema, sample)
        train = replace(train, transformed=transformed)
        eval = None if eval is None else replace(eval, transformed=transformed)
    return DataPlan(train, eval, sample, baseline, data_inputs(cfg))


def _describe(cfg: Config, split: str, datasets: dict[str, Any]) -> Optional[TableInfo]:
    """What ``data.<split>`` holds: the Dataset passed for it, or the files its URI names (None: no such split)."""
    d = cfg.data
    if split in datasets:
        from lepton_ray.data.dataset import GUARANTEES, describe_dataset

        ds = datasets[split]
        if split == "train":
            log.warning("data.train is a ray.data.Dataset: %s (data named by path keeps the exactly-once, reproducible order)", GUARANTEES)
        else:  # every worker loads the eval rows whole: computed once here, not again for its schema, rows, classes, each worker
            ds = ds.materialize()
        return describe_dataset(f"data.{split}", ds, d)
    uri = getattr(d, split)
    return describe(f"data.{split}", uri, d) if uri else None


def _values(cfg: Config, info: TableInfo, column: Column) -> np.ndarray:
    """Every value of one target column of a split, flattened."""
    only = replace(info, schema=Schema((), (column,)))  # read just this column
    return load_arrays(only, cfg.data.storage_options)[column.name].reshape(-1)


def _with_classes(cfg: Config, train: TableInfo, eval: Optional[TableInfo]
                  ) -> tuple[TableInfo, Optional[TableInfo], dict[str, float]]:
    """Classification: each integer target's class count (max + 1 over both splits), checked to be ids 0..K-1;
    and the baseline metrics they give."""
    m = cfg.model
    if (m.loss or default_loss(m.task)) != "cross_entropy":
        return train, eval, {}
    counts, baseline = {}, {}
    for c in train.schema.targets:
        split_values = [_values(cfg, i, c) for i in (train, eval) if i is not None]
        values = np.concatenate(split_values)
        values = values[values != m.ignore_index]
        if not np.issubdtype(values.dtype, np.integer) or (values.size and values.min() < 0):
            raise ConfigError(
                f"data.targets.{c.name}: column '{c.columns[0]}' must hold class ids 0..K-1 for cross_entropy"
                f" (found dtype {values.dtype}, min {values.min() if values.size else 'none'}); for real-valued targets set"
                f" model.task: regression (or model.loss: mse)")
        counts[c.name] = int(values.max()) + 1 if values.size else 1
        if len(split_values) == 2 and "bits_per_byte" in (m.metrics or []):
            baseline[f"{M.EVAL_PREFIX}unigram_bits_per_byte"] = unigram_bits(*split_values, counts[c.name], m.ignore_index)
    train = replace(train, schema=train.schema.with_classes(counts))
    eval = None if eval is None else replace(eval, schema=eval.schema.with_classes(counts))
    return train, eval, baseline


def _sample(cfg: Config, info: TableInfo, rows: int = 2) -> dict[str, np.ndarray]:
    """The first ``rows`` rows of data.train, decoded, before any transform."""
    if info.dataset is not None:
        from lepton_ray.data.dataset import dataset_arrays

        return dataset_arrays(info, rows)
    fs, _ = filesystem(info.uri, cfg.data.storage_options)
    first = pq.ParquetFile(info.shards[0].path, filesystem=arrow_filesystem(fs)).read_row_group(0, columns=info.schema.parquet_columns())
    return decode(info.schema, first.slice(0, rows), key=info.key, uri=info.uri)


def unigram_bits(train: np.ndarray, eval: np.ndarray, classes: int, ignore_index: int = -100) -> float:
    """Bits per token of ``eval`` under the token frequencies of ``train`` (add-one smoothed): the score of a
    model that ignores context, the baseline a sequence model must beat.

    >>> round(unigram_bits(np.array([0, 0, 0, 1]), np.array([0, 1]), 2), 4)  # p = 4/6, 2/6
    1.085
    """
    train, eval = train[train != ignore_index], eval[eval != ignore_index]
    p = (np.bincount(train, minlength=classes) + 1.0) / (len(train) + classes)
    return float(-np.log2(p[eval]).mean())


# ------------------------------------------------------------------ the run on that data


def check_run(cfg: Config, data: DataPlan) -> Any:
    """What depends on the run's own settings (a sweep trial's swept keys): the batch size against the data, one
    forward pass and loss on the sample, the strategy's checks. Returns the strategy's (checked) services."""
    _check_batches(cfg, data.train)
    _check_model(cfg, data)
    services = STRATEGIES[cfg.sync.strategy].Services(cfg)
    services.check(lambda: initial_model(cfg, data.train))
    return services


def _check_batches(cfg: Config, info: TableInfo) -> None:
    if cfg.train.batch_size > info.num_rows:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is larger than data.train ({info.num_rows} rows)")
    for w in range(cfg.scaling.min_workers, cfg.scaling.max_workers + 1):  # elastic: every size the run may take
        local = cfg.train.batch_size // w
        if info.dataset is not None:
            from lepton_ray.data.dataset import dataset_steps

            steps = dataset_steps(info, w, local)
        else:
            steps = steps_in_epoch(info, world_size=w, local_batch=local, epoch=0, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        if steps > 0:
            continue
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} leaves a worker without a full batch of {cfg.train.batch_size // w} rows"
            f" in epoch 0 ({info.num_rows} rows in {len(info.shards)} file(s) dealt to {w} workers);"
            " use a smaller batch or prepare the data with more row groups")


def initial_model(cfg: Config, train: TableInfo) -> torch.nn.Module:
    """The model exactly as every worker initialises it (same seed), for strategy checks and services. Built
    :func:`isolated`: whatever a model's code changes in this process (RNGs, environment) is undone, so a run
    in this process (``fit(local=True)``, a sweep trial) starts from the state a fresh worker has; on the CPU, whatever
    device context the caller is in (a plan made lazily inside a strategy's meta-device build)."""
    with isolated(), torch.device("cpu"):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, train.batch_schema)
    if cfg.train.init_from:  # a seed checkpoint: services (parameter servers) start from its weights too
        load_model(open_checkpoint(cfg.train.init_from, cfg.checkpoint.storage_options), model)
    return model


def _check_model(cfg: Config, data: DataPlan) -> None:
    """One forward pass and loss on the sample (rows of data.train as the model sees them), on the driver: a model
    whose output does not fit its loss fails here, before any worker starts, with both shapes."""
    info, m = data.train, cfg.model
    batch = {k: torch.from_numpy(v) for k, v in data.sample.items()}
    try:
        loss = make_loss(m, info.batch_schema)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    model = initial_model(cfg, info).eval()  # eval mode: no dropout draws, no training-only side effects of a user model
    try:
        with torch.no_grad(), isolated():
            out = model(model_inputs(batch, tuple(c.name for c in info.batch_schema.inputs), loss.name))
            loss(out, batch)
    except ShapeError as exc:
        raise ConfigError(f"model: {exc}") from None
    except Exception as exc:  # the user's model or loss fails on real rows: say so now, not in every worker
        shapes = ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in batch.items())
        raise ConfigError(f"model: a forward pass on 2 rows of data.train ({shapes}) failed: {type(exc).__name__}: {exc}") from None


# ------------------------------------------------------------------ where the run writes


def _store(cfg: Config, name: str) -> CheckpointStore:
    c = cfg.checkpoint
    root = join(c.dir, name) if c.dir else str(Path(cfg.run.dir) / name / "checkpoints")
    if is_local(root):  # absolute: Ray Train's workers run in another working directory
        root = os.path.abspath(os.path.expanduser(root.removeprefix("file://")))
    return CheckpointStore(root, c.storage_options, c.keep_last)


def can_resume(cfg: Config) -> bool:
    """Whether ``run.name`` has a committed checkpoint to resume from."""
    return _store(cfg, cfg.run.name).latest() is not None


def _resolve_run(cfg: Config, resume: bool) -> tuple[str, Path, str]:
    """A fresh run gets a run name nobody used yet (name, name-1, ...); --resume continues ``run.name``."""
    base = cfg.run.name
    if resume:
        if not can_resume(cfg):
            raise ConfigError(f"--resume: run '{base}' has no committed checkpoint under '{_store(cfg, base).uri}'; nothing to resume")
        return base, Path(cfg.run.dir) / base, _store(cfg, base).uri
    name, i = base, 0
    while (Path(cfg.run.dir) / name).exists() or _store(cfg, name).steps():
        i += 1
        name = f"{base}-{i}"
    return name, Path(cfg.run.dir) / name, _store(cfg, name).uri
