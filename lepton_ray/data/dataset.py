"""A ``ray.data.Dataset`` the user built, as a run's data: ``Trainer(cfg, datasets={"train": ds, "eval": ds_eval})``.

A Dataset is an arbitrary pipeline (any reader, any transforms, Ray Data's own order), so it gets Ray Data's
guarantees, not the plan's: the driver splits it once per run with ``streaming_split(num_workers, equal=True)``;
every row is used at most once per epoch (``equal`` drops up to num_workers - 1 rows an epoch, and each worker's
last partial batch is dropped); the order is not reproducible; a resumed run takes the steps left in the
interrupted epoch from a fresh pass over the Dataset (rows seen before the checkpoint may be seen again), and
the number of workers is fixed. What the README and the run's ``start`` record say: :data:`GUARANTEES`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import torch

from lepton_ray.config import ConfigError, DataConfig
from lepton_ray.data.schema import Schema, decode
from lepton_ray.data.table import TableInfo

__all__ = ["GUARANTEES", "DatasetStream", "dataset_arrays", "dataset_steps", "describe_dataset"]

GUARANTEES = ("every row at most once per epoch, order not reproducible, a resume takes the rest of the interrupted epoch"
              " from a fresh pass (rows may repeat across it), fixed number of workers")


HEAD_ROWS = 2
"""The first rows of a train Dataset the driver keeps: the sample its planning checks the model and transform on."""


@dataclass(frozen=True)
class Scan:
    """What the driver read of a Dataset while describing it: its first rows (every column) and its target columns
    (every row), so that planning (a sample, the class ids) starts no other execution of it."""

    head: pa.Table
    targets: pa.Table


def describe_dataset(key: str, ds: Any, cfg: DataConfig) -> TableInfo:
    """``ds``'s columns checked against ``data.inputs`` / ``targets`` (or ``features`` / ``label``), its rows counted.

    Two executions of ``ds`` (each costs Ray Data seconds to start, however small the data): its first rows (the
    schema and the sample), then its target columns only (the row count and the class ids), never the whole rows
    through the driver; both are kept on the returned info's ``scan`` for planning (not sent to the workers).
    """
    head = pa.concat_tables(list(ds.limit(HEAD_ROWS).iter_batches(batch_size=None, batch_format="pyarrow")) or [pa.table({})])
    if head.num_rows == 0:
        raise ConfigError(f"{key}: the ray.data.Dataset has no rows")
    typed = Schema.from_arrow(head.schema, inputs=cfg.inputs, targets=cfg.targets, features=cfg.features, label=cfg.label,
                              key=key, uri="the ray.data.Dataset")
    columns = Schema((), typed.targets).parquet_columns()
    targets = pa.concat_tables(list(ds.select_columns(columns).iter_batches(batch_size=None, batch_format="pyarrow")))
    return TableInfo(key=key, uri=f"dataset:{key.removeprefix('data.')}", files=(), num_rows=targets.num_rows, schema=typed,
                     dataset=ds, scan=Scan(head, targets))


def dataset_arrays(info: TableInfo, rows: Optional[int] = None) -> dict[str, np.ndarray]:
    """The Dataset's rows (all, or the first ``rows``), decoded to one array per input and target: from what
    :func:`describe_dataset` read when that has them (on the driver), else from a pass over the Dataset."""
    columns, scan = info.schema.parquet_columns(), info.scan
    if scan is not None and rows is not None and rows <= scan.head.num_rows:
        table = scan.head.select(columns).slice(0, rows)
    elif scan is not None and rows is None and set(columns) <= set(scan.targets.column_names):
        table = scan.targets.select(columns)
    else:
        ds = info.dataset.select_columns(columns)
        if rows is not None:
            ds = ds.limit(rows)
        table = pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    return decode(info.schema, table, key=info.key, uri="the ray.data.Dataset")


def dataset_steps(info: TableInfo, world_size: int, local_batch: int) -> int:
    """Steps per epoch of every worker on a Dataset: ``streaming_split(equal=True)`` gives each the same rows."""
    return info.num_rows // world_size // local_batch


class DatasetStream:
    """A worker's batches from its split of a user's Dataset: the :class:`~lepton_ray.data.stream.WorkerStream`
    interface the loop uses (steps, epoch, cursor, describe, close, stats), with the guarantees of :data:`GUARANTEES`."""

    def __init__(self, info: TableInfo, cfg: DataConfig, split: Any, *, world_size: int, local_batch: int,
                 device: torch.device = torch.device("cpu")):
        self.info, self.cfg, self.split = info, cfg, split
        self.world_size, self.local_batch, self.device = world_size, local_batch, device
        self.stats: dict[str, float] = {"rows": 0, "wait_s": 0.0}

    def describe(self) -> dict[str, Any]:
        return {"engine": "dataset", "reads_in": f"Ray Data: the ray.data.Dataset passed to the Trainer, streaming_split({self.world_size},"
                f" equal=True)", "transform": None, "guarantees": GUARANTEES}

    def steps(self, epoch: int) -> int:
        return dataset_steps(self.info, self.world_size, self.local_batch)

    def cursor(self, epoch: int, step: int) -> dict[str, Any]:
        return {"world_size": self.world_size, "local_batch": self.local_batch, "step_in_segment": step, "segments": []}

    def resume_after(self, epoch: int, history: tuple) -> None:
        raise ValueError(f"{self.info.key}: a run on a ray.data.Dataset keeps its number of workers ({self.world_size}); it"
                         f" was checkpointed at another ({history[-1].world_size})")

    def start(self, epoch: int, start_step: int = 0) -> None:
        """Nothing to begin early: the split's pass starts when the epoch is iterated."""

    def close(self) -> None:
        pass

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Steps ``start_step .. steps(epoch) - 1`` of ``epoch``, from a fresh pass over this worker's split."""
        left = self.steps(epoch) - start_step
        if left <= 0:
            return
        batches = iter(self.split.iter_batches(batch_size=self.local_batch, batch_format="pyarrow", drop_last=True,
                                               prefetch_batches=self.cfg.prefetch_windows))
        for _ in range(left):
            t0 = time.perf_counter()
            table = next(batches, None)
            self.stats["wait_s"] += time.perf_counter() - t0
            if table is None:
                raise RuntimeError(f"{self.info.key}: the ray.data.Dataset ended after {self.stats['rows']:.0f} rows of epoch {epoch};"
                                   f" it counted {self.info.num_rows} rows when the run started (a Dataset must give the same rows"
                                   " every pass)")
            arrays = decode(self.info.schema, table, key=self.info.key, uri="the ray.data.Dataset")
            self.stats["rows"] += self.local_batch
            yield {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
