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


class KillShardOnce(nn.Module):
    """An MLP whose rank-0 training forward number ``kill_at`` kills one PS shard actor of run ``run_name``
    (``ray.kill``, so Ray restarts it, like a lost process), once per marker file."""

    def __init__(self, inner: nn.Module, kill_at: int, marker: str, run_name: str):
        super().__init__()
        self.inner, self.kill_at, self.marker, self.run_name = inner, kill_at, marker, run_name
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.kill_at:
                import os

                import ray
                import ray.train

                from lepton_ray.sync.param_server import NAMESPACE, SHARD_PREFIX

                if ray.train.get_context().get_world_rank() == 0:
                    try:
                        os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
                    except FileExistsError:
                        return self.inner(x)
                    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                                   if a["namespace"] == NAMESPACE and a["name"].startswith(f"{SHARD_PREFIX}{self.run_name}:"))
                    ray.kill(ray.get_actor(names[-1], namespace=NAMESPACE), no_restart=False)
        return self.inner(x)


def kill_shard_once_mlp(input_dim: int, num_outputs: int, kill_at: int, marker: str, run_name: str, hidden=(64,)) -> nn.Module:
    return KillShardOnce(mlp(input_dim=input_dim, num_outputs=num_outputs, hidden=list(hidden)), kill_at, marker, run_name)
