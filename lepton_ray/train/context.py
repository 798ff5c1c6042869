"""The worker context: who this worker is and where its reports go, handed to the loop (no global state).

The same loop runs under Ray Train (:meth:`WorkerContext.from_ray`), in the calling process for debugging
or a fast single-worker sweep trial (:meth:`WorkerContext.local`), or under a plain
``torch.multiprocessing`` + gloo harness in unit tests (build it directly).

>>> WorkerContext.local().world
1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["WorkerContext"]


def _no_report(metrics: dict[str, Any]) -> None:
    pass


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world: int
    device: torch.device = torch.device("cpu")
    report: Callable[[dict[str, Any]], None] = field(default=_no_report)
    """Where evaluation results go besides metrics.jsonl (Ray Train's ``report``, for Tune's schedulers)."""

    @classmethod
    def from_ray(cls, *, use_gpu: bool, report: bool) -> "WorkerContext":
        """Inside a Ray Train worker; ``report``: forward evaluations to ``ray.train.report`` (a cross-worker barrier)."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        return cls(ctx.get_world_rank(), ctx.get_world_size(), device, ray.train.report if report else _no_report)

    @classmethod
    def local(cls, device: torch.device = torch.device("cpu")) -> "WorkerContext":
        """One worker in the calling process (no process group needed)."""
        return cls(0, 1, device)
