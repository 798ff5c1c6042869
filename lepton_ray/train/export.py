"""Where the metrics sink sends each batch of records besides ``metrics.jsonl``: TensorBoard event files and
Ray's metrics (the node's Prometheus endpoint and Ray's dashboard).

Torch-free like the sink, whose actor imports it. Both read a record the same way (:func:`scalars`): a train or
eval record (a ``step``, no ``event``) gives each of its numeric fields; a ``breakdown`` event gives each of its
phases (the ``*_s`` fields: seconds over the epoch) for its rank.
"""

from __future__ import annotations

import re
import sys
from typing import Any, NamedTuple, Optional

__all__ = ["BREAKDOWN", "STRAGGLER", "Scalar", "scalars", "TensorBoard", "RayMetrics", "PREFIX"]

BREAKDOWN, STRAGGLER = "breakdown", "straggler"
PREFIX = "lepton_ray_train_"
"""Every Ray metric's name starts with this (Ray's Prometheus endpoint adds its own ``ray_`` in front)."""
_POSITION = ("step", "epoch")  # where a value is (a train and an eval record at one step share them), not a value
_NOT_METRICS = frozenset({*_POSITION, "time"})
_VALID_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")  # Prometheus metric names (Ray drops others with a warning)


class Scalar(NamedTuple):
    name: str  # the record's field: train_loss, lr, eval_accuracy, compute_s, ...
    value: float
    step: int
    rank: Optional[int]  # a breakdown phase's rank; None for the run's own metrics
    time: Optional[float]  # the record's Unix time


def scalars(record: dict[str, Any]) -> list[Scalar]:
    """The numbers a record gives, each at its step.

    >>> [s[:4] for s in scalars({"step": 3, "epoch": 0, "lr": 0.1, "train_loss": 0.5, "time": 9.0})]
    [('lr', 0.1, 3, None), ('train_loss', 0.5, 3, None)]
    >>> [s[:4] for s in scalars({"event": "breakdown", "rank": 1, "host": "h", "epoch": 0, "step": 8, "steps": 4,
    ...                           "time": 9.0, "step_s": 3.0, "compute_s": 2.5})]
    [('step_s', 3.0, 8, 1), ('compute_s', 2.5, 8, 1)]
    >>> scalars({"event": "checkpoint", "step": 10, "checkpoint": "/r/step_00000010"})
    []
    """
    event, step = record.get("event"), record.get("step")
    if event not in (None, BREAKDOWN) or not isinstance(step, int):
        return []
    breakdown = event == BREAKDOWN
    return [Scalar(k, float(v), step, record["rank"] if breakdown else None, record.get("time"))
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_METRICS and (k.endswith("_s") or not breakdown)]


def _summary_writer(logdir: str, purge_step: Optional[int], suffix: str) -> Any:
    """A tensorboardX ``SummaryWriter``, imported without torch where this process has none (the sink actor).

    tensorboardX's writer imports torch if it can, only to accept tensors; the sink writes floats. In the sink actor
    that import would cost ~6 s of CPU and 180 MB (7.0 s / 264 MB against 0.9 s / 85 MB on the 2-core test machine)
    while the workers start beside it, so torch is marked absent for that one import.
    """
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter(logdir, purge_step=purge_step, flush_secs=1, filename_suffix=suffix)


class TensorBoard:
    """Event files in ``logdir``: each scalar under its field's name at its step (a breakdown phase as
    ``breakdown/rank<r>/<phase>``), straggler warnings as text. A ``start`` record (a fresh run, a resume, a
    restarted worker group) begins a new file that hides the steps after it in the earlier ones; an ``end`` record
    closes the file. Each batch is on disk about a second after it arrives (the writer's thread)."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self._writer: Any = None
        self._step = 0  # the newest step seen: where a straggler warning (a per-epoch record, no step) is shown
        self._purge: Optional[int] = None
        self._files = 0

    def log(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            if r.get("event") == "start":
                self.close()
                self._purge = r["step"] + 1
            for s in scalars(r):
                tag = s.name if s.rank is None else f"breakdown/rank{s.rank}/{s.name}"
                self._open().add_scalar(tag, s.value, s.step, walltime=s.time)
            if r.get("event") == STRAGGLER:
                self._open().add_text("straggler", r["message"], self._step)
            self._step = r.get("step", self._step)
            if r.get("event") == "end":
                self.close()

    def _open(self) -> Any:
        if self._writer is None:  # the file's name has its second and host: a suffix tells (and orders) files of one second
            self._writer = _summary_writer(self.logdir, self._purge, f".{self._files:04d}")
            self._files += 1
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # writes what is queued, then closes the file
            self._writer = None


class RayMetrics:
    """The records as Ray metrics of the process holding the sink, tagged ``run``: a gauge per field of the train
    and eval records (``lepton_ray_train_`` + the field without its ``train_``: ``lepton_ray_train_loss``,
    ``lepton_ray_train_lr``, ``lepton_ray_train_eval_accuracy``, ..., ``lepton_ray_train_step`` and ``_epoch``),
    ``lepton_ray_train_breakdown_seconds`` (tags ``rank``, ``phase``) and the counter
    ``lepton_ray_train_stragglers`` (tag ``rank``)."""

    def __init__(self, run: str) -> None:
        self.run = run
        self._metrics: dict[str, Any] = {}

    def log(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            run = {"run": self.run}
            for s in scalars(r):
                if s.rank is not None:
                    self._metric("Gauge", "breakdown_seconds", "seconds per phase of the rank's last epoch (metrics.jsonl "
                                 "breakdown records)", ("rank", "phase")).set(s.value, {**run, "rank": str(s.rank), "phase": s.name[:-2]})
                elif _VALID_NAME.match(s.name):
                    name = s.name.removeprefix("train_")
                    self._metric("Gauge", name, f"the newest '{s.name}' of metrics.jsonl").set(s.value, run)
            for key in _POSITION if "event" not in r and isinstance(r.get("step"), int) else ():
                self._metric("Gauge", key, f"the newest '{key}' of metrics.jsonl").set(r[key], run)
            if r.get("event") == STRAGGLER:
                self._metric("Counter", "stragglers", "straggler warnings (metrics.jsonl straggler records)",
                             ("rank",)).inc(1, {**run, "rank": str(r["rank"])})

    def _metric(self, kind: str, name: str, description: str, tags: tuple[str, ...] = ()) -> Any:
        if name not in self._metrics:
            from ray.util import metrics

            self._metrics[name] = getattr(metrics, kind)(PREFIX + name, description, tag_keys=("run", *tags))
        return self._metrics[name]

    def close(self) -> None:
        pass
