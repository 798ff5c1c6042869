"""Sync strategies, by name."""

from __future__ import annotations

from lepton_ray.sync.allreduce import AllReduce
from lepton_ray.sync.base import Strategy, WorkerInfo

__all__ = ["STRATEGIES", "Strategy", "WorkerInfo"]

STRATEGIES: dict[str, type[Strategy]] = {"allreduce": AllReduce}
