"""Models for the fault-injection suite (tests/faults); importable by Ray workers (tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

from lepton_ray.models.mlp import mlp


class Slow(nn.Module):
    """An MLP whose training forward sleeps ``delay_s`` (so a fault lands mid-run), and whose process writes its
    pid to ``<pid_dir>/rank<r>`` when built (a restarted worker overwrites it), so a test can kill it from outside."""

    def __init__(self, inner: nn.Module, delay_s: float, pid_dir: str):
        super().__init__()
        self.inner, self.delay_s = inner, delay_s
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        path = Path(pid_dir) / f"rank{rank}"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(path)

    def forward(self, x):
        if self.training and self.delay_s:
            time.sleep(self.delay_s)
        return self.inner(x)


def slow_mlp(input_dim: int, num_outputs: int, delay_s: float, pid_dir: str, hidden=(32,)) -> nn.Module:
    return Slow(mlp(input_dim=input_dim, num_outputs=num_outputs, hidden=list(hidden)), delay_s, pid_dir)
