"""Metric names (defined once) and the sink that carries records from rank 0 to the driver.

Rank 0 buffers its per-step records and ships them to a :class:`MetricsSink`
actor pinned to the driver's node every ``flush_s`` seconds (never once per
step: a remote call per step would cost more than a small model's step). The
sink appends them to ``metrics.jsonl`` as they arrive; the driver drains it to
drive the progress bar and build the result.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import numpy as np
import ray
import torch
import torch.distributed as dist

from lepton_ray.train.sink import MetricsSink, Sink

__all__ = ["LossLog", "MetricsSink", "Sink", "RecordBuffer", "TRAIN_LOSS", "EVAL_PREFIX", "STEP", "SAMPLES_PER_S", "binary_auc",
           "process_started", "since"]

STEP = "step"
EPOCH = "epoch"
TRAIN_LOSS = "train_loss"
LR = "lr"
SAMPLES_PER_S = "samples_per_s"
MODEL_TFLOPS = "model_tflops_per_s"  # the model's training FLOPs done per second, all workers (models that count them)
MFU = "mfu"  # MODEL_TFLOPS over the GPUs' peak (GPU runs whose peak is known)
DATA_WAIT_FRAC = "data_wait_frac"  # share of the logging window the loop spent waiting for its next batch
EVAL_PREFIX = "eval_"  # eval metrics are eval_loss, eval_accuracy, ...


def process_started() -> Optional[float]:
    """When this process started (Unix time, ~10 ms resolution), from ``/proc``; None where there is no ``/proc``.

    >>> 0 <= time.time() - (process_started() or time.time()) < 86400 * 365
    True
    """
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks after boot


def since(start: float, phases: dict[str, Optional[float]]) -> dict[str, float]:
    """Each phase's Unix time as seconds after ``start`` (rounded to ms); phases without a time are left out.

    >>> since(100.0, {"ray": 101.25, "worker": None, "first_step": 104.0})
    {'ray': 1.25, 'first_step': 4.0}
    """
    return {name: round(t - start, 3) for name, t in phases.items() if t is not None}


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
        if self._pending and isinstance(self.sink, Sink):  # a local run: the sink is in this process
            self.sink.log(self._pending)
        elif self._pending and self.sink is not None:
            ref = self.sink.log.remote(self._pending)  # fire and forget, unless the worker is about to exit
            if wait:
                ray.get(ref)
        self._pending = []
        self._last = time.monotonic()


class LossLog:
    """The per-step train-loss records, averaged over workers with one collective per batch of records.

    A collective per step costs ~0.5 ms of launch on CPU (1.2 % of the 43 ms step of
    ``benchmarks/train_overhead.py``), so each rank keeps its window losses and every ``every``
    records one all-reduce averages all of them. ``every`` starts at 1; once ``calibrate_after``
    records are logged, the slowest rank's mean interval between records (one all-reduce, so every rank
    computes the same value) sets it to about ``target_s`` worth of records (1..64): records reach the
    driver at most ~``target_s`` late, and a run of slow steps keeps one collective per step.
    :meth:`flush` (every rank, at the same steps: evaluation, checkpoint, end) reduces what is pending.
    Without ``collective`` (asynchronous strategies) each record carries this rank's own loss, at once.
    """

    def __init__(self, buffer: "RecordBuffer", world: int, collective: bool, *, target_s: float = 0.25,
                 calibrate_after: int = 8, max_every: int = 64, clock: Callable[[], float] = time.perf_counter):
        self.buffer, self.world, self.collective = buffer, world, collective
        self.target_s, self.calibrate_after, self.max_every = target_s, calibrate_after, max_every
        self.every = 1
        self._pending: list[tuple[torch.Tensor, dict[str, Any]]] = []
        self._logged = 0
        self._clock = clock  # a test's own clock makes the calibration independent of the machine's speed
        self._t0 = clock()

    def add(self, loss_sum: torch.Tensor, steps: int, record: dict[str, Any]) -> None:
        # torch.stack makes a new tensor: the caller may reset loss_sum right after
        sums = torch.stack([loss_sum.detach().to(torch.float64), torch.tensor(float(steps), dtype=torch.float64, device=loss_sum.device)])
        self._pending.append((sums, record))
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        sums = torch.stack([p[0] for p in pending])  # [records, (loss sum, steps)]
        reduce = self.collective and self.world > 1
        if reduce:
            dist.all_reduce(sums)
        calibrate = reduce and self._logged < self.calibrate_after <= self._logged + len(pending)
        self._logged += len(pending)
        if calibrate:  # the slowest rank's mean seconds per record, so every rank picks the same batch size
            interval = torch.tensor([(self._clock() - self._t0) / self._logged], dtype=torch.float64, device=sums.device)
            dist.all_reduce(interval, op=dist.ReduceOp.MAX)
            self.every = max(1, min(self.max_every, int(self.target_s / max(interval.item(), 1e-9))))
        for (total, n), (_, record) in zip(sums.tolist(), pending):
            self.buffer.add({**record, TRAIN_LOSS: total / n})
