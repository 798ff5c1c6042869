"""Models for the parameter-server tests; importable by Ray workers (tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import time

from torch import nn

from lepton_ray.models.mlp import mlp


class SlowRank(nn.Module):
    """An MLP whose training forward sleeps ``delay_s`` on world rank ``slow_rank``: a straggler."""

    def __init__(self, inner: nn.Module, slow_rank: int, delay_s: float):
        super().__init__()
        self.inner, self.slow_rank, self.delay_s = inner, slow_rank, delay_s
        self.rank = None

    def forward(self, x):
        if self.training:
            if self.rank is None:
                import ray.train

                self.rank = ray.train.get_context().get_world_rank()
            if self.rank == self.slow_rank:
                time.sleep(self.delay_s)
        return self.inner(x)


def slow_mlp(input_dim: int, num_outputs: int, slow_rank: int = 1, delay_s: float = 0.05, hidden=(32,)) -> nn.Module:
    return SlowRank(mlp(input_dim=input_dim, num_outputs=num_outputs, hidden=list(hidden)), slow_rank, delay_s)
