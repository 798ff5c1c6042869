"""Models for benchmarks/param_server.py (importable by the Ray workers: the benchmark puts this folder
on their PYTHONPATH): an MLP with a fixed artificial compute time per step and a straggler pattern."""

from __future__ import annotations

import time

from torch import nn

from lepton_ray.models.mlp import mlp


class Straggler(nn.Module):
    """Each training forward takes ``step_s`` more seconds; twice that when this rank is slowed.

    ``pattern``: ``none``; ``rank1`` (rank 1 at half speed, always); ``moving`` (one worker at half speed
    at any time: rank ``(step // phase) % world`` is the slow one, so the straggler moves around).
    """

    def __init__(self, inner: nn.Module, step_s: float, pattern: str, phase: int):
        super().__init__()
        self.inner, self.step_s, self.pattern, self.phase = inner, step_s, pattern, phase
        self.rank, self.world, self.calls = None, 1, 0

    def forward(self, x):
        if self.training:
            if self.rank is None:
                import ray.train

                ctx = ray.train.get_context()
                self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            slow = (self.pattern == "rank1" and self.rank == 1) or (
                self.pattern == "moving" and (self.calls // self.phase) % self.world == self.rank)
            time.sleep(self.step_s * (2 if slow else 1))
            self.calls += 1
        return self.inner(x)


def straggler_mlp(input_dim: int, num_outputs: int, step_s: float = 0.03, pattern: str = "rank1", phase: int = 2,
                  hidden=(64,)) -> nn.Module:
    return Straggler(mlp(input_dim=input_dim, num_outputs=num_outputs, hidden=list(hidden)), step_s, pattern, phase)
