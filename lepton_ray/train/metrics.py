"""Metric names (defined once) and the sink that carries records from rank 0 to the driver.

Rank 0 buffers its per-step records and ships them to a :class:`MetricsSink`
actor pinned to the driver's node every ``flush_s`` seconds (never once per
step: a remote call per step would cost more than a small model's step). The
sink appends them to ``metrics.jsonl`` as they arrive; the driver drains it to
drive the progress bar and build the result.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import ray

__all__ = ["MetricsSink", "RecordBuffer", "TRAIN_LOSS", "EVAL_PREFIX", "STEP", "SAMPLES_PER_S", "binary_auc"]

STEP = "step"
EPOCH = "epoch"
TRAIN_LOSS = "train_loss"
LR = "lr"
SAMPLES_PER_S = "samples_per_s"
DATA_WAIT_FRAC = "data_wait_frac"  # share of the logging window the loop spent waiting for its next batch
EVAL_PREFIX = "eval_"  # eval metrics are eval_loss, eval_accuracy, ...


def binary_auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U, ties counted half) of scores for binary labels; NaN if one class is absent.

    >>> binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    label = np.asarray(label).astype(bool)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.asarray(score, dtype=np.float64), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # average 1-based rank of each tie group
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@ray.remote(num_cpus=0)
class MetricsSink:
    """Collects records from the workers: appends each batch to ``path`` (``metrics.jsonl``) as it
    arrives, and keeps it for the driver to drain (progress bar, result).

    Writing here, not in the driver, keeps the records of a run whose driver is killed (a sweep
    trial that ASHA stops): everything rank 0 shipped is on disk. The actor runs on the driver's
    node, so ``path`` is the driver's local run directory.
    """

    def __init__(self, path: str) -> None:
        self._records: list[dict[str, Any]] = []
        self._path = path

    def log(self, records: list[dict[str, Any]]) -> None:
        with open(self._path, "a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
        self._records.extend(records)

    def drain(self) -> list[dict[str, Any]]:
        out, self._records = self._records, []
        return out


class RecordBuffer:
    """Worker-side buffer: ``add`` is a list append; ``flush`` ships to the sink."""

    def __init__(self, sink: Any, flush_s: float = 1.0):
        self.sink, self.flush_s = sink, flush_s
        self._pending: list[dict[str, Any]] = []
        self._last = time.monotonic()

    def add(self, record: dict[str, Any], *, now: bool = False) -> None:
        self._pending.append(record)
        if now or time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        if self._pending and self.sink is not None:
            ref = self.sink.log.remote(self._pending)  # fire and forget, unless the worker is about to exit
            if wait:
                ray.get(ref)
        self._pending = []
        self._last = time.monotonic()
